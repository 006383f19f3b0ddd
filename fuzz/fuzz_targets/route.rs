//! The request router and the name, tag, reference and digest parsers behind it.
//!
//! Input: `METHOD SP PATH` (the request line without the version), e.g.
//! `GET /v2/library/nginx/manifests/latest`.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use pullproxy::oci::{Digest, Reference, RepositoryName, Route, Tag};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((method, path)) = text.split_once(' ') else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    check_route(&method, path);

    // The parsers on their own, on every piece of the path a router could hand them.
    let bare = path.split_once('?').map_or(path, |(p, _)| p);
    let name = bare.strip_prefix("/v2/").unwrap_or(bare);
    check_name(name);
    for segment in bare.split('/') {
        check_name(segment);
        check_tag(segment);
        check_digest(segment);
        check_reference(segment);
    }
});

fn check_route(method: &Method, path: &str) {
    let bare = path.split_once('?').map_or(path, |(p, _)| p);
    match Route::parse(method, path) {
        Ok(route) => {
            if route != Route::Other {
                assert!(
                    *method == Method::GET || *method == Method::HEAD,
                    "{method} routed to {route:?}"
                );
            }
            // A route is exactly what the path says: re-rendering it gives the path back, so no
            // normalization happened that an upstream or the disk could see differently.
            let rendered = match &route {
                Route::Base => {
                    assert!(bare == "/v2" || bare == "/v2/", "{bare:?} is not the base");
                    return;
                }
                Route::Other => return,
                Route::Manifest { name, reference } => {
                    check_name(name.as_str());
                    check_reference(&reference.to_string());
                    format!("/v2/{name}/manifests/{reference}")
                }
                Route::Blob { name, digest } => {
                    check_name(name.as_str());
                    check_digest(&digest.to_string());
                    format!("/v2/{name}/blobs/{digest}")
                }
                Route::TagsList { name } => {
                    check_name(name.as_str());
                    format!("/v2/{name}/tags/list")
                }
            };
            assert_eq!(rendered, bare, "route {route:?}");
        }
        Err(e) => {
            assert!(
                *method == Method::GET || *method == Method::HEAD,
                "{method} is forwarded, never refused"
            );
            assert!(bare.starts_with("/v2/"), "{bare:?} refused: {e}");
            // The 400 body is the OCI error shape, and the message never repeats the request:
            // it is static text and numbers (no byte of the input beyond ASCII can get in).
            let body: serde_json::Value =
                serde_json::from_str(&e.body()).expect("the error body is JSON");
            assert_eq!(body["errors"][0]["code"], e.code().as_str());
            let message = e.to_string();
            assert_eq!(body["errors"][0]["message"], message.as_str());
            assert!(
                message.bytes().all(|b| (b' '..=b'~').contains(&b)),
                "{message:?}"
            );
            assert!(!e.reason().is_empty());
        }
    }
}

/// A name that parses is safe to put in a path and displays as itself.
fn check_name(s: &str) {
    let Ok(name) = s.parse::<RepositoryName>() else {
        return;
    };
    assert_eq!(name.as_str(), s);
    assert_eq!(name.to_string(), s);
    assert!(s.len() <= pullproxy::oci::MAX_NAME_LEN);
    for component in s.split('/') {
        assert!(!component.is_empty() && component != "." && component != "..");
        assert!(
            component
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-')),
            "{s:?}"
        );
        let first = component.as_bytes()[0];
        let last = component.as_bytes()[component.len() - 1];
        assert!(
            first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric(),
            "{s:?}"
        );
    }
}

fn check_tag(s: &str) {
    let Ok(tag) = s.parse::<Tag>() else {
        return;
    };
    assert_eq!(tag.to_string(), s);
    assert!(!s.is_empty() && s.len() <= pullproxy::oci::MAX_TAG_LEN);
    assert!(
        !s.starts_with(['.', '-']) && !s.contains(['/', ':']),
        "{s:?}"
    );
}

fn check_digest(s: &str) {
    let Ok(digest) = s.parse::<Digest>() else {
        return;
    };
    assert_eq!(digest.to_string(), s);
    // The encoded part names a cache file: only lowercase hex of the algorithm's length.
    let encoded = digest.encoded();
    assert_eq!(encoded.len(), digest.algorithm().hex_len());
    assert!(
        encoded
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    );
    assert_eq!(s, format!("{}:{encoded}", digest.algorithm()));
}

fn check_reference(s: &str) {
    let Ok(reference) = s.parse::<Reference>() else {
        return;
    };
    assert_eq!(reference.to_string(), s);
    match reference {
        Reference::Tag(t) => assert_eq!(t.to_string().parse::<Tag>().ok(), Some(t)),
        Reference::Digest(d) => assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d)),
    }
}
