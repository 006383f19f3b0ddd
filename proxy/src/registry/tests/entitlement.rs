//! The trust-boundary table: every way of asking for alice's private layer and manifest, through
//! other repositories, other registries, made-up names, with wrong and missing credentials,
//! upstream up, down and failing, by GET, HEAD and Range.

use super::*;

// ---------------------------------------------------------------------------------------------
// The table

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// 200 (or 206) with exactly the content's bytes (or range).
    Content,
    /// Anything but the content: this status.
    Status(u16),
}

/// One way of asking for a blob: method, headers, and the byte range it should get.
struct Ask {
    kind: &'static str,
    method: Method,
    headers: Vec<(&'static str, &'static str)>,
    range: Option<(usize, usize)>,
}

struct Row {
    what: &'static str,
    registry: &'static str,
    repo: &'static str,
    creds: Creds,
    upstream: State,
}

/// Every way of asking for alice's private layer (and manifest) that must fail, and the ways
/// that must work, upstream up, down and failing.
#[tokio::test]
async fn private_content_goes_only_to_entitled_clients_of_the_repository_that_holds_it() {
    use Creds::{Anonymous, Owner, WrongPassword};
    use State::*;
    let rows = [
        // The owner, upstream up: served (from the cache).
        (
            Row {
                what: "owner",
                registry: HUB,
                repo: "alice/secret",
                creds: Owner,
                upstream: Up,
            },
            Want::Content,
        ),
        // Upstream up: the upstream's refusal goes back.
        (
            Row {
                what: "anonymous, same repo",
                registry: HUB,
                repo: "alice/secret",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(401),
        ),
        (
            Row {
                what: "wrong password, same repo",
                registry: HUB,
                repo: "alice/secret",
                creds: WrongPassword,
                upstream: Up,
            },
            Want::Status(401),
        ),
        (
            Row {
                what: "anonymous, a public repo of another registry",
                registry: QUAY,
                repo: "pub/open",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "owner's credentials, a public repo of another registry",
                registry: QUAY,
                repo: "pub/open",
                creds: Owner,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "anonymous, a public repo of the same registry",
                registry: HUB,
                repo: "library/busybox",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "owner, a repo that does not hold it",
                registry: HUB,
                repo: "alice/other",
                creds: Owner,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "a made-up name under a wildcard",
                registry: "a.b.gcr.io",
                repo: "x",
                creds: Anonymous,
                upstream: Up,
            },
            Want::Status(404),
        ),
        (
            Row {
                what: "a made-up name, owner's credentials",
                registry: "a.b.gcr.io",
                repo: "alice/secret",
                creds: Owner,
                upstream: Up,
            },
            Want::Status(404),
        ),
        // Upstream down: only what is known counts. A client without credentials is sent the
        // registry's challenge (learned from an earlier 401), one with wrong ones 503.
        (
            Row {
                what: "owner, upstream down",
                registry: HUB,
                repo: "alice/secret",
                creds: Owner,
                upstream: Down,
            },
            Want::Content,
        ),
        (
            Row {
                what: "anonymous, upstream down",
                registry: HUB,
                repo: "alice/secret",
                creds: Anonymous,
                upstream: Down,
            },
            Want::Status(401),
        ),
        (
            Row {
                what: "wrong password, upstream down",
                registry: HUB,
                repo: "alice/secret",
                creds: WrongPassword,
                upstream: Down,
            },
            Want::Status(503),
        ),
        (
            Row {
                what: "anonymous, public repo of another registry, that registry down",
                registry: QUAY,
                repo: "pub/open",
                creds: Anonymous,
                upstream: Down,
            },
            Want::Status(503),
        ),
        (
            Row {
                what: "owner, other repo, upstream down",
                registry: HUB,
                repo: "alice/other",
                creds: Owner,
                upstream: Down,
            },
            Want::Status(503),
        ),
        // Upstream failing (5xx) is the same as down.
        (
            Row {
                what: "owner, upstream failing",
                registry: HUB,
                repo: "alice/secret",
                creds: Owner,
                upstream: Failing,
            },
            Want::Content,
        ),
        (
            Row {
                what: "anonymous, upstream failing",
                registry: HUB,
                repo: "alice/secret",
                creds: Anonymous,
                upstream: Failing,
            },
            Want::Status(401),
        ),
    ];
    let s = scene().await;
    let layer = s.secret.layer(0);
    let layer_bytes = s.secret.layers[0].clone();
    for (row, want) in &rows {
        s.w.up.set(HUB, Up);
        s.w.up.set(QUAY, Up);
        if row.registry != "a.b.gcr.io" {
            s.w.up.set(row.registry, row.upstream);
        }
        let creds = row.creds.headers();
        let with_range = |r| [creds.clone(), vec![("range", r)]].concat();
        let cases = [
            Ask {
                kind: "GET",
                method: Method::GET,
                headers: creds.clone(),
                range: None,
            },
            Ask {
                kind: "HEAD",
                method: Method::HEAD,
                headers: creds.clone(),
                range: None,
            },
            Ask {
                kind: "Range",
                method: Method::GET,
                headers: with_range("bytes=100-"),
                range: Some((100, layer_bytes.len() - 1)),
            },
            Ask {
                kind: "closed Range",
                method: Method::GET,
                headers: with_range("bytes=5-9"),
                range: Some((5, 9)),
            },
        ];
        for Ask {
            kind,
            method,
            headers: hdrs,
            range,
        } in cases
        {
            let path = format!("/v2/{}/blobs/{layer}", row.repo);
            let got = s.w.get(row.registry, method.clone(), &path, &hdrs).await;
            let label = format!(
                "{} ({kind} of the private layer via {}/{})",
                row.what, row.registry, row.repo
            );
            match want {
                Want::Content => {
                    let (status, expect) = match (range, &method) {
                        (_, &Method::HEAD) => (StatusCode::OK, Bytes::new()),
                        (Some((a, b)), _) => {
                            (StatusCode::PARTIAL_CONTENT, layer_bytes.slice(a..=b))
                        }
                        (None, _) => (StatusCode::OK, layer_bytes.clone()),
                    };
                    assert_eq!(got.status, status, "{label}");
                    assert_eq!(got.body, expect, "{label}");
                }
                Want::Status(code) => {
                    assert_eq!(got.status.as_u16(), *code, "{label}");
                    if *code == 401 {
                        assert!(
                            got.headers.contains_key(header::WWW_AUTHENTICATE),
                            "{label}: the registry's challenge is relayed"
                        );
                    }
                    assert!(
                        !got.body
                            .windows(32)
                            .any(|w| layer_bytes.windows(32).any(|l| l == w)),
                        "{label}: private bytes in the answer"
                    );
                }
            }
        }
        // The private manifest by digest, the same way.
        let got =
            s.w.manifest(row.registry, row.repo, &s.secret.digest.to_string(), &creds)
                .await;
        let label = format!(
            "{} (the private manifest via {}/{})",
            row.what, row.registry, row.repo
        );
        match want {
            Want::Content => {
                assert_eq!(got.status, StatusCode::OK, "{label}");
                assert_eq!(got.body, s.secret.manifest, "{label}");
            }
            Want::Status(code) => {
                assert_eq!(got.status.as_u16(), *code, "{label}");
                assert_ne!(got.body, s.secret.manifest, "{label}");
            }
        }
    }
}
