//! A fake of the upstream registries: images in public and private repositories of several
//! registries by authority, each up, down (connection refused) or failing (503); names it does
//! not hold do not resolve. It counts what it was asked, can hold a blob body after its first
//! byte, and can corrupt the bodies of chosen blobs.

use super::*;

/// One image: a manifest and its layers.
#[derive(Clone)]
pub(super) struct Image {
    pub(super) manifest: Bytes,
    pub(super) digest: Digest,
    pub(super) layers: Vec<Bytes>,
}

impl Image {
    pub(super) fn new(name: &str, layer_sizes: &[usize]) -> Image {
        let layers: Vec<Bytes> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Bytes::from(
                    format!("{name}-layer-{i}-")
                        .bytes()
                        .cycle()
                        .take(*n)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let descs: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","size":{},"digest":"{}"}}"#,
                    l.len(),
                    Digest::sha256_of(l)
                )
            })
            .collect();
        let manifest = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","layers":[{}]}}"#,
            media_type::OCI_MANIFEST,
            descs.join(",")
        ));
        Image {
            digest: Digest::sha256_of(&manifest),
            manifest,
            layers,
        }
    }

    pub(super) fn layer(&self, i: usize) -> Digest {
        Digest::sha256_of(&self.layers[i])
    }
}

#[derive(Default)]
pub(super) struct Repo {
    /// `Authorization` the repository wants (`Basic ...` or `Bearer <token>`); `None`: public.
    pub(super) password: Option<&'static str>,
    pub(super) tags: HashMap<String, Digest>,
    pub(super) manifests: HashMap<Digest, Bytes>,
    pub(super) blobs: HashMap<Digest, Bytes>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Up,
    /// Connection refused: cannot be asked.
    Down,
    /// Answers 503 to everything.
    Failing,
}

#[derive(Default)]
pub(super) struct FakeRegistry {
    pub(super) repos: HashMap<String, Repo>,
    pub(super) down: bool,
    pub(super) failing: bool,
}

/// Upstream registries by authority; any other name does not resolve.
#[derive(Default)]
pub(super) struct FakeUpstream {
    pub(super) registries: Mutex<HashMap<String, FakeRegistry>>,
    /// Requests seen, as `METHOD authority path`.
    pub(super) seen: Mutex<Vec<String>>,
    /// When set, blob GET bodies send their first byte and wait for this.
    pub(super) gate: Mutex<Option<Arc<Notify>>>,
    /// Bodies served for these digests are corrupted (one byte flipped).
    pub(super) corrupt: Mutex<Vec<Digest>>,
    /// Blob GETs that started sending a body.
    pub(super) blob_gets: AtomicUsize,
}

impl FakeUpstream {
    pub(super) fn push(
        &self,
        authority: &str,
        repo: &str,
        password: Option<&'static str>,
        tag: &str,
        image: &Image,
    ) {
        let mut regs = self.registries.lock().unwrap();
        let r = regs
            .entry(authority.to_owned())
            .or_default()
            .repos
            .entry(repo.to_owned())
            .or_default();
        r.password = password;
        r.tags.insert(tag.to_owned(), image.digest.clone());
        r.manifests
            .insert(image.digest.clone(), image.manifest.clone());
        for l in &image.layers {
            r.blobs.insert(Digest::sha256_of(l), l.clone());
        }
    }

    pub(super) fn set(&self, authority: &str, state: State) {
        let mut regs = self.registries.lock().unwrap();
        let r = regs.entry(authority.to_owned()).or_default();
        r.down = state == State::Down;
        r.failing = state == State::Failing;
    }

    pub(super) fn count(&self, what: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.contains(what))
            .count()
    }

    /// The registry's answer: status, headers, body (for GET), or why it cannot be asked.
    fn answer(
        &self,
        origin: &Origin,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(StatusCode, HeaderMap, Bytes), UpstreamError> {
        let authority = origin.authority.as_str();
        self.seen
            .lock()
            .unwrap()
            .push(format!("{method} {authority} {path}"));
        let regs = self.registries.lock().unwrap();
        let Some(reg) = regs.get(authority) else {
            return Err(UpstreamError::NoSuchHost {
                host: authority.to_owned(),
                reason: "does not resolve".into(),
            });
        };
        if reg.down {
            return Err(UpstreamError::Unreachable {
                host: authority.to_owned(),
                reason: "connection refused".into(),
            });
        }
        let mut h = HeaderMap::new();
        if reg.failing {
            return Ok((StatusCode::SERVICE_UNAVAILABLE, h, Bytes::new()));
        }
        let route = Route::parse(method, path).expect("the proxy only asks valid paths");
        let (name, found) = match &route {
            Route::Manifest { name, reference } => {
                let repo = reg.repos.get(name.as_str());
                let digest = match reference {
                    Reference::Tag(t) => repo.and_then(|r| r.tags.get(t.as_str()).cloned()),
                    Reference::Digest(d) => Some(d.clone()),
                };
                let body = digest
                    .as_ref()
                    .and_then(|d| repo.and_then(|r| r.manifests.get(d)).cloned());
                if let (Some(d), Some(_)) = (&digest, &body) {
                    h.insert("docker-content-digest", d.to_string().parse().unwrap());
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(media_type::OCI_MANIFEST),
                    );
                }
                (name.clone(), body)
            }
            Route::Blob { name, digest } => {
                let body = reg
                    .repos
                    .get(name.as_str())
                    .and_then(|r| r.blobs.get(digest))
                    .cloned();
                (name.clone(), body)
            }
            Route::Base | Route::TagsList { .. } | Route::Other => {
                return Ok((StatusCode::OK, h, Bytes::from_static(b"{}")));
            }
        };
        let wanted = reg.repos.get(name.as_str()).and_then(|r| r.password);
        if let Some(pw) = wanted
            && headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(pw.as_bytes())
        {
            // Repositories that want a bearer token send clients to a token service.
            let challenge = if pw.starts_with("Bearer ") {
                "Bearer realm=\"https://auth.fake/token\",service=\"fake\""
            } else {
                "Basic realm=\"fake\""
            };
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
            return Ok((StatusCode::UNAUTHORIZED, h, Bytes::new()));
        }
        match found {
            Some(body) => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                Ok((StatusCode::OK, h, body))
            }
            None => Ok((StatusCode::NOT_FOUND, h, Bytes::new())),
        }
    }
}

impl UpstreamSource for FakeUpstream {
    async fn small(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> Result<Small, UpstreamError> {
        let (status, headers, body) = self.answer(origin, &method, path.path(), headers)?;
        Ok(Small {
            status,
            headers,
            body: if method == Method::HEAD {
                Bytes::new()
            } else {
                body
            },
        })
    }

    async fn blob(
        &self,
        origin: &Origin,
        method: Method,
        path: &PathAndQuery,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (status, headers, mut body) = self.answer(origin, &method, path.path(), headers)?;
        if let Ok(Route::Blob { digest, .. }) = Route::parse(&method, path.path())
            && self.corrupt.lock().unwrap().contains(&digest)
            && !body.is_empty()
        {
            let mut v = body.to_vec();
            v[0] ^= 0xff;
            body = Bytes::from(v);
        }
        let gate = self.gate.lock().unwrap().clone();
        if status == StatusCode::OK {
            self.blob_gets.fetch_add(1, Ordering::SeqCst);
        }
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(4);
        tokio::spawn(async move {
            if body.is_empty() {
                return;
            }
            let _ = tx.send_data(body.slice(..1)).await;
            if let Some(gate) = gate {
                gate.notified().await;
            }
            let _ = tx.send_data(body.slice(1..)).await;
        });
        let mut resp = Response::new(rx.boxed_unsync());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    async fn forward(
        &self,
        origin: &Origin,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (status, headers, body) =
            self.answer(origin, req.method(), req.uri().path(), req.headers())?;
        let mut resp = Response::new(client::full(body));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    async fn readable_anonymously(
        &self,
        origin: &Origin,
        path: &PathAndQuery,
    ) -> Result<bool, UpstreamError> {
        let (status, _, _) = self.answer(origin, &Method::HEAD, path.path(), &HeaderMap::new())?;
        Ok(status.is_success())
    }
}
