//! Image references as people write them (`nginx`, `quay.io/team/app:1.2`,
//! `registry.k8s.io/pause@sha256:...`), resolved the way container runtimes resolve them: no
//! registry means Docker Hub, a single-component Docker Hub name is in `library/`, no tag means
//! `latest`, and Docker Hub's API lives at `registry-1.docker.io`.

use std::{fmt, str::FromStr};

use super::{NameError, Reference, ReferenceError, RepositoryName};

/// Where a Docker Hub reference is fetched from.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A resolved image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry's API host, `host[:port]`.
    pub registry: String,
    pub repository: RepositoryName,
    pub reference: Reference,
}

/// Why an image reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("empty image reference")]
    Empty,
    #[error("bad registry host {0:?}")]
    Registry(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ImageRefError::Empty);
        }
        // A digest wins over a tag (`name:tag@sha256:...` is pulled by digest).
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d)),
            None => (s, None),
        };
        // The first component is a registry if it looks like a host (a dot, a port, localhost).
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_ascii_lowercase(), path)
            }
            _ => ("docker.io".to_owned(), rest),
        };
        let valid_host = registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !valid_host {
            return Err(ImageRefError::Registry(registry));
        }
        // A tag is after the last `:` of the path (a path has no `:` otherwise).
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) => (p, Some(t)),
            None => (path, None),
        };
        let docker_hub = matches!(registry.as_str(), "docker.io" | "index.docker.io");
        let path = if docker_hub && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        let reference: Reference = match (digest, tag) {
            (Some(d), _) => d.parse()?,
            (None, Some(t)) => t.parse()?,
            (None, None) => "latest".parse()?,
        };
        Ok(ImageRef {
            registry: if docker_hub {
                DOCKER_HUB_API.to_owned()
            } else {
                registry
            },
            repository: path.parse()?,
            reference,
        })
    }
}

impl ImageRef {
    /// The registry's host, without a port (the TLS server name).
    pub fn host(&self) -> &str {
        match self.registry.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.registry,
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> (String, String, String) {
        let r: ImageRef = s.parse().unwrap();
        (
            r.registry.clone(),
            r.repository.to_string(),
            r.reference.to_string(),
        )
    }

    #[test]
    fn references_resolve_as_runtimes_resolve_them() {
        let hub = "registry-1.docker.io".to_owned();
        assert_eq!(
            parse("nginx"),
            (hub.clone(), "library/nginx".into(), "latest".into())
        );
        assert_eq!(
            parse("docker.io/bitnami/redis:7"),
            (hub.clone(), "bitnami/redis".into(), "7".into())
        );
        assert_eq!(
            parse("quay.io/team/app:1.2"),
            ("quay.io".into(), "team/app".into(), "1.2".into())
        );
        assert_eq!(
            parse("sealos.hub:5000/pause:3.9"),
            ("sealos.hub:5000".into(), "pause".into(), "3.9".into())
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parse(&format!("registry.k8s.io/pause:3.9@{d}")),
            ("registry.k8s.io".into(), "pause".into(), d.clone())
        );
        assert_eq!(
            parse(&format!("localhost/x@{d}")),
            ("localhost".into(), "x".into(), d)
        );
        let r: ImageRef = "sealos.hub:5000/pause:3.9".parse().unwrap();
        assert_eq!(r.host(), "sealos.hub");
        assert_eq!(r.to_string(), "sealos.hub:5000/pause:3.9");
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in [
            "",
            "UPPER/case",
            "a:b:c",
            "x@sha256:zz",
            "ex ample.com/x",
            "x/../y",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?}");
        }
    }
}
