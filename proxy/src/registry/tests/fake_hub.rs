//! A fake of the cluster's hub: images by hub repository, up or down, and what write-back pushed
//! into it (checked as distribution checks it).

use super::*;

/// What a hub repository got by write-back: digest -> (media type, bytes).
type Pushed = HashMap<Digest, (String, Bytes)>;

/// The hub: `hub repository -> image`, up or down.
#[derive(Default)]
pub(super) struct FakeHub {
    /// Hub repository -> (tag, image).
    pub(super) repos: Mutex<HashMap<String, (String, Image)>>,
    pub(super) down: std::sync::atomic::AtomicBool,
    pub(super) url: Uri,
    /// Lookups seen, as `METHOD kind reference`.
    pub(super) seen: Mutex<Vec<String>>,
    /// What was pushed into it: `hub repository` -> digest -> (media type, bytes).
    pub(super) pushed: Mutex<HashMap<String, Pushed>>,
    /// Pushes refused (credentials without push rights).
    pub(super) read_only: std::sync::atomic::AtomicBool,
}

impl FakeHub {
    pub(super) fn put(&self, repo: &str, tag: &str, image: &Image) {
        self.repos
            .lock()
            .unwrap()
            .insert(repo.to_owned(), (tag.to_owned(), image.clone()));
    }

    pub(super) fn count(&self, what: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.starts_with(what))
            .count()
    }
}

impl HubSource for FakeHub {
    fn url(&self) -> &Uri {
        &self.url
    }

    fn hub_repo(
        &self,
        _registry: &str,
        repo: &RepositoryName,
    ) -> Result<RepositoryName, MappingError> {
        Ok(repo.clone())
    }

    async fn lookup(
        &self,
        method: Method,
        hub_repo: &RepositoryName,
        kind: &str,
        reference: &str,
        _headers: HeaderMap,
    ) -> HubOutcome {
        self.seen
            .lock()
            .unwrap()
            .push(format!("{method} {kind} {reference}"));
        if self.down.load(Ordering::SeqCst) {
            return HubOutcome::Unreachable("hub down".into());
        }
        let Some((tag, image)) = self.repos.lock().unwrap().get(hub_repo.as_str()).cloned() else {
            return self.pushed_content(&method, hub_repo.as_str(), reference);
        };
        let mut headers = HeaderMap::new();
        let body = match kind {
            "manifests" if reference == tag || reference == image.digest.to_string() => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(media_type::OCI_MANIFEST),
                );
                headers.insert(
                    "docker-content-digest",
                    image.digest.to_string().parse().unwrap(),
                );
                Some(image.manifest.clone())
            }
            "blobs" => image
                .layers
                .iter()
                .find(|l| Digest::sha256_of(l).to_string() == reference)
                .cloned(),
            _ => None,
        };
        let Some(body) = body else {
            return HubOutcome::NotFound;
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut resp = Response::new(client::full(if method == Method::HEAD {
            Bytes::new()
        } else {
            body
        }));
        *resp.headers_mut() = headers;
        HubOutcome::Found(resp)
    }

    async fn has(&self, hub_repo: &str, _kind: &str, digest: &Digest) -> Result<bool, HubError> {
        self.reachable()?;
        Ok(self
            .pushed
            .lock()
            .unwrap()
            .get(hub_repo)
            .is_some_and(|r| r.contains_key(digest)))
    }

    async fn upload_blob(
        &self,
        hub_repo: &str,
        digest: &Digest,
        len: u64,
        body: ProxyBody,
    ) -> Result<(), HubError> {
        self.reachable()?;
        let bytes = body
            .collect()
            .await
            .map_err(|e| HubError::Unreachable(e.to_string()))?
            .to_bytes();
        if bytes.len() as u64 != len || Digest::compute(digest.algorithm(), &bytes) != *digest {
            return Err(HubError::Status {
                what: "a blob upload",
                status: StatusCode::BAD_REQUEST,
            });
        }
        self.store(hub_repo, digest, "application/octet-stream", bytes);
        Ok(())
    }

    async fn put_manifest(
        &self,
        hub_repo: &str,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), HubError> {
        self.reachable()?;
        // As distribution does: a manifest whose blobs are not there is refused.
        let missing = crate::oci::ManifestRefs::parse(&bytes)
            .digests()
            .into_iter()
            .any(|d| {
                !self
                    .pushed
                    .lock()
                    .unwrap()
                    .get(hub_repo)
                    .is_some_and(|r| r.contains_key(&d))
            });
        if missing {
            return Err(HubError::Status {
                what: "a manifest put",
                status: StatusCode::BAD_REQUEST,
            });
        }
        self.store(hub_repo, digest, media_type, bytes);
        Ok(())
    }
}

impl FakeHub {
    /// What write-back pushed, by digest, as a registry serves it.
    fn pushed_content(&self, method: &Method, hub_repo: &str, reference: &str) -> HubOutcome {
        let Ok(digest) = reference.parse::<Digest>() else {
            return HubOutcome::NotFound;
        };
        let found = self
            .pushed
            .lock()
            .unwrap()
            .get(hub_repo)
            .and_then(|r| r.get(&digest).cloned());
        let Some((media_type, bytes)) = found else {
            return HubOutcome::NotFound;
        };
        let mut resp = Response::new(client::full(if *method == Method::HEAD {
            Bytes::new()
        } else {
            bytes.clone()
        }));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        h.insert(header::CONTENT_TYPE, media_type.parse().unwrap());
        h.insert("docker-content-digest", digest.to_string().parse().unwrap());
        HubOutcome::Found(resp)
    }

    /// Blobs and manifests write-back put into `hub_repo`.
    pub(super) fn pushed_to(&self, hub_repo: &str) -> Vec<Digest> {
        self.pushed
            .lock()
            .unwrap()
            .get(hub_repo)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn reachable(&self) -> Result<(), HubError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(HubError::Unreachable("hub down".into()));
        }
        if self.read_only.load(Ordering::SeqCst) {
            return Err(HubError::Refused(StatusCode::FORBIDDEN));
        }
        Ok(())
    }

    fn store(&self, hub_repo: &str, digest: &Digest, media_type: &str, bytes: Bytes) {
        self.pushed
            .lock()
            .unwrap()
            .entry(hub_repo.to_owned())
            .or_default()
            .insert(digest.clone(), (media_type.to_owned(), bytes));
    }
}
