//! What a manifest's own bytes say: the media type it declares and the digests it references
//! (config, layers, child manifests of an index, artifact blobs, its subject). The content rule
//! links those digests to the repository the manifest was fetched for.

use serde::Deserialize;

use super::{Digest, media_type};

/// Most references taken from one manifest: more than any real image has, few enough that a
/// hostile registry cannot flood the repository index with one answer.
pub const MAX_REFERENCES: usize = 4096;

/// The parts of a manifest (image manifest, index, or artifact) that matter here.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestRefs {
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
    subject: Option<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
}

impl ManifestRefs {
    /// Reads a manifest's JSON; anything that is not a JSON object of this shape yields nothing.
    pub fn parse(bytes: &[u8]) -> ManifestRefs {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    /// The manifest media type the document declares (`mediaType`), if it is one.
    pub fn media_type(&self) -> Option<&str> {
        self.media_type
            .as_deref()
            .filter(|t| media_type::is_manifest(t))
    }

    /// The child manifests of an index (or manifest list), at most [`MAX_REFERENCES`].
    pub fn manifests(&self) -> Vec<Digest> {
        valid(self.manifests.iter())
    }

    /// The blobs an image manifest needs: its config, layers and artifact blobs.
    pub fn blobs(&self) -> Vec<Digest> {
        valid(self.config.iter().chain(&self.layers).chain(&self.blobs))
    }

    /// Every valid digest the manifest references, at most [`MAX_REFERENCES`].
    pub fn digests(&self) -> Vec<Digest> {
        valid(
            self.config
                .iter()
                .chain(&self.layers)
                .chain(&self.manifests)
                .chain(&self.blobs)
                .chain(&self.subject),
        )
    }
}

fn valid<'a>(descriptors: impl Iterator<Item = &'a Descriptor>) -> Vec<Digest> {
    descriptors
        .filter_map(|d| d.digest.parse().ok())
        .take(MAX_REFERENCES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(x: &str) -> String {
        format!("sha256:{}", x.repeat(64))
    }

    #[test]
    fn an_image_manifest_references_its_config_and_layers() {
        let text = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"{}"}},{{"digest":"not-a-digest"}}]}}"#,
            media_type::OCI_MANIFEST,
            d("a"),
            d("b"),
            d("c")
        );
        let refs = ManifestRefs::parse(text.as_bytes());
        assert_eq!(refs.media_type(), Some(media_type::OCI_MANIFEST));
        let got: Vec<String> = refs.digests().iter().map(ToString::to_string).collect();
        assert_eq!(got, [d("a"), d("b"), d("c")]);
    }

    #[test]
    fn an_index_references_its_manifests_and_odd_documents_reference_nothing() {
        let text = format!(
            r#"{{"mediaType":"text/html","manifests":[{{"digest":"{}"}}],"subject":{{"digest":"{}"}}}}"#,
            d("e"),
            d("f")
        );
        let refs = ManifestRefs::parse(text.as_bytes());
        assert_eq!(refs.media_type(), None);
        assert_eq!(refs.digests().len(), 2);
        assert_eq!(refs.manifests().len(), 1);
        assert!(refs.blobs().is_empty());
        for odd in [&b"[1,2]"[..], b"not json", b"{\"layers\":\"x\"}", b""] {
            assert!(ManifestRefs::parse(odd).digests().is_empty());
        }
    }

    #[test]
    fn references_are_bounded() {
        let layers: Vec<String> = (0..MAX_REFERENCES + 5)
            .map(|i| format!(r#"{{"digest":"sha256:{i:064x}"}}"#))
            .collect();
        let text = format!(r#"{{"layers":[{}]}}"#, layers.join(","));
        assert_eq!(
            ManifestRefs::parse(text.as_bytes()).digests().len(),
            MAX_REFERENCES
        );
    }
}
