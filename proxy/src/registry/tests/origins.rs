//! pullproxy's own clients of the hub and of upstream registries (not the fakes) under the
//! registry proxy, against small plain-HTTP servers on 127.0.0.1: a registry that sends blob
//! downloads to a CDN, and a hub whose password rotates.

use std::{convert::Infallible, net::SocketAddr};

use base64::Engine as _;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;

use super::*;
use crate::origins::{
    client::{AddressPolicy, Connector, UpstreamClients, trusting_nothing},
    hub::{HubClient, HubSettings, Mapping, PasswordSource},
    upstream::Upstream,
};

/// A request a loopback server saw, and its answer's status.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    authorization: Option<String>,
    status: StatusCode,
}

/// A plain-HTTP/1.1 server on 127.0.0.1 that answers with a function and logs every request.
/// Stopping it (or dropping it) closes its listener and its connections.
struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(
        answer: impl Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (answer, log) = (Arc::new(answer), seen.clone());
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it drops the set, which aborts every connection.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (answer, log) = (answer.clone(), log.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = answer(&req);
                    log.lock().unwrap().push(Seen {
                        method: req.method().clone(),
                        path: req.uri().to_string(),
                        authorization: req
                            .headers()
                            .get(header::AUTHORIZATION)
                            .map(|v| v.to_str().unwrap().to_owned()),
                        status: resp.status(),
                    });
                    async move { Ok::<_, Infallible>(resp) }
                });
                conns.spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    // A client that goes away is not the test's concern.
                    let _ = conn.await;
                });
            }
        });
        Server { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer with `status`, `headers` and `body` (and its length).
fn answer(status: StatusCode, headers: &[(&str, &str)], body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.clone()));
    *resp.status_mut() = status;
    for (k, v) in headers {
        resp.headers_mut().insert(
            header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}

/// `image`'s manifest (by tag `tag` or digest) and layers of repository `repo`, as a registry
/// serves them; `None` for any other path.
fn content(image: &Image, repo: &str, tag: &str, path: &str) -> Option<Response<Full<Bytes>>> {
    let rest = path.strip_prefix(&format!("/v2/{repo}/"))?;
    if let Some(reference) = rest.strip_prefix("manifests/") {
        if reference != tag && reference != image.digest.to_string() {
            return None;
        }
        let digest = image.digest.to_string();
        let headers = [
            ("content-type", media_type::OCI_MANIFEST),
            ("docker-content-digest", digest.as_str()),
        ];
        return Some(answer(StatusCode::OK, &headers, image.manifest.clone()));
    }
    let digest = rest.strip_prefix("blobs/")?;
    let layer = (0..image.layers.len()).find(|i| image.layer(*i).to_string() == digest)?;
    Some(answer(StatusCode::OK, &[], image.layers[layer].clone()))
}

fn not_found() -> Response<Full<Bytes>> {
    answer(StatusCode::NOT_FOUND, &[], Bytes::new())
}

/// Outbound connections as pullproxy makes them, except that loopback may be dialled (the
/// servers of these tests are there; production upstreams never are).
fn connector() -> Connector {
    Connector::new(
        trusting_nothing(),
        AddressPolicy::Any,
        Duration::from_secs(5),
    )
}

#[tokio::test]
async fn blobs_redirected_to_a_cdn_are_fetched_there_without_the_registrys_credentials() {
    let img = Image::new("cdn", &[3000, 700]);
    // The CDN serves the blobs to anyone holding a signed URL.
    let cdn = Server::start({
        let img = img.clone();
        move |req| {
            let digest = req.uri().path().trim_start_matches("/blobs/");
            (0..img.layers.len())
                .find(|i| img.layer(*i).to_string() == digest)
                .map_or_else(not_found, |i| {
                    answer(StatusCode::OK, &[], img.layers[i].clone())
                })
        }
    })
    .await;
    // A private registry that sends blob downloads to its CDN, as ghcr.io does.
    let registry = Server::start({
        let (img, cdn) = (img.clone(), cdn.addr);
        move |req| {
            if req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes())
                != Some(ALICE.as_bytes())
            {
                let challenge = [("www-authenticate", "Basic realm=\"ghcr\"")];
                return answer(StatusCode::UNAUTHORIZED, &challenge, Bytes::new());
            }
            let path = req.uri().path();
            if let Some(digest) = path.strip_prefix("/v2/team/app/blobs/") {
                let location = format!("http://{cdn}/blobs/{digest}?sig=1");
                let headers = [("location", location.as_str())];
                return answer(StatusCode::TEMPORARY_REDIRECT, &headers, Bytes::new());
            }
            content(&img, "team/app", "1", path).unwrap_or_else(not_found)
        }
    })
    .await;
    let upstream = Upstream::new(
        UpstreamClients::new(connector()),
        Duration::from_secs(5),
        Duration::from_secs(5),
    );
    let proxy = RegistryProxy::<FakeHub, Upstream>::new(
        None,
        Arc::new(upstream),
        Arc::new(Cache::in_memory(64 << 20)),
        Duration::from_secs(30),
    );
    let origin = Origin {
        scheme: Scheme::HTTP,
        authority: Authority::from_static("ghcr.test"),
        addr: Some(registry.addr),
    };
    pull(&proxy, &origin, "team/app", "1", &img, Some(ALICE)).await;

    // The registry answered the blob GETs with redirects, pullproxy followed them to the CDN,
    // and no request to the CDN carried the registry's credentials.
    let at_registry = registry.seen();
    let at_cdn = cdn.seen();
    for i in 0..img.layers.len() {
        let digest = img.layer(i).to_string();
        assert!(
            at_registry.iter().any(|s| s.method == Method::GET
                && s.path.ends_with(&format!("/blobs/{digest}"))
                && s.status == StatusCode::TEMPORARY_REDIRECT),
            "{at_registry:?}"
        );
        let fetched = at_cdn
            .iter()
            .filter(|s| {
                s.method == Method::GET && s.path.contains(&digest) && s.status == StatusCode::OK
            })
            .count();
        assert_eq!(fetched, 1, "layer {i} from the CDN once: {at_cdn:?}");
    }
    assert!(
        at_cdn.iter().all(|s| s.authorization.is_none()),
        "a request to the CDN carried credentials: {at_cdn:?}"
    );

    // What came through the CDN was cached: with the CDN gone, the image is still served.
    cdn.stop();
    pull(&proxy, &origin, "team/app", "1", &img, Some(ALICE)).await;
    assert_eq!(cdn.seen().len(), at_cdn.len(), "the CDN was asked again");
    assert_eq!(served(&proxy, "blob", "cache"), 2);
}

fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[tokio::test]
async fn a_rotated_hub_password_is_used_on_the_next_request() {
    let img = Image::new("rotate", &[900, 100]);
    // The hub wants pullproxy's current password; the test changes it.
    let password = Arc::new(Mutex::new("hub-secret".to_owned()));
    let hub_server = Server::start({
        let (img, password) = (img.clone(), password.clone());
        move |req| {
            let wanted = basic("pullproxy", &password.lock().unwrap());
            if req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes())
                != Some(wanted.as_bytes())
            {
                let challenge = [("www-authenticate", "Basic realm=\"hub\"")];
                return answer(StatusCode::UNAUTHORIZED, &challenge, Bytes::new());
            }
            if req.uri().path() == "/v2/" {
                return answer(StatusCode::OK, &[], Bytes::from_static(b"{}"));
            }
            content(&img, "library/rotate", "1", req.uri().path()).unwrap_or_else(not_found)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("hub-password");
    std::fs::write(&password_file, "hub-secret\n").unwrap();
    let hub = Arc::new(HubClient::new(
        client::build(connector()),
        HubSettings {
            url: format!("http://{}", hub_server.addr).parse().unwrap(),
            optional: false,
            username: Some("pullproxy".into()),
            password: PasswordSource::File(password_file.clone()),
            mapping: Mapping::sealos(),
            timeout: Duration::from_secs(5),
            write_back: Policy::Off,
            write_back_rate: 1 << 20,
        },
    ));
    // The upstream is up and does not have the image: every byte is the hub's, then this node's.
    let up = Arc::new(FakeUpstream::default());
    up.set(HUB, State::Up);
    let proxy = RegistryProxy::<HubClient, FakeUpstream>::new(
        Some(hub.clone()),
        up,
        Arc::new(Cache::in_memory(64 << 20)),
        Duration::from_secs(30),
    );
    let docker = https(HUB);
    pull(&proxy, &docker, "library/rotate", "1", &img, None).await;
    assert_eq!(served(&proxy, "manifest", "hub"), 1);
    assert_eq!(served(&proxy, "blob", "hub"), 2);

    // The hub's password changes; pullproxy's file still has the old one: the hub refuses
    // (readiness follows `ping`), and what the hub served before still comes from this node.
    *password.lock().unwrap() = "hub-secret-rotated".into();
    assert!(
        matches!(
            hub.ping().await,
            HubOutcome::Refused(StatusCode::UNAUTHORIZED)
        ),
        "the old password is refused"
    );
    pull(&proxy, &docker, "library/rotate", "1", &img, None).await;
    assert_eq!(served(&proxy, "manifest", "node"), 1);
    assert_eq!(served(&proxy, "blob", "node"), 2);
    assert!(metric(&proxy, "hub_lookups_total", &["outcome=\"refused\""]) >= 1.0);

    // The credentials file is updated (as a Secret update would be): the next request uses it,
    // without a restart.
    std::fs::write(&password_file, "hub-secret-rotated\n").unwrap();
    assert!(matches!(hub.ping().await, HubOutcome::Found(_)));
    let before = hub_server.seen().len();
    pull(&proxy, &docker, "library/rotate", "1", &img, None).await;
    assert_eq!(
        served(&proxy, "manifest", "hub"),
        2,
        "the tag from the hub again"
    );
    assert_eq!(
        served(&proxy, "blob", "hub") + served(&proxy, "blob", "node"),
        6
    );
    let rotated = basic("pullproxy", "hub-secret-rotated");
    let after = hub_server.seen().split_off(before);
    assert!(
        !after.is_empty()
            && after.iter().all(|s| s.status != StatusCode::UNAUTHORIZED
                && s.authorization.as_deref() == Some(rotated.as_str())),
        "{after:?}"
    );
}
