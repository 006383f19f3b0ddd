//! Which OCI distribution endpoint a request is for, and the error bodies the protocol expects.

use http::Method;
use serde::Serialize;

use super::{
    digest::{Digest, DigestError},
    name::{NameError, Reference, ReferenceError, RepositoryName, TagError},
};

/// What the proxy does with a request, decided from its method and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET|HEAD /v2/`: the API version check.
    Base,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`.
    Manifest {
        name: RepositoryName,
        reference: Reference,
    },
    /// `GET|HEAD /v2/<name>/blobs/<digest>`.
    Blob {
        name: RepositoryName,
        digest: Digest,
    },
    /// `GET|HEAD /v2/<name>/tags/list` (query `n`/`last` is the caller's business).
    TagsList { name: RepositoryName },
    /// Anything else: writes, uploads, `_catalog`, referrers, non-registry paths. Forwarded
    /// untouched to the original destination and never served from local content.
    Other,
}

/// Why a request's path cannot be routed. The caller answers 400 with [`RouteError::body`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("request path {0}")]
    UnsafePath(UnsafePath),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("invalid tag: {0}")]
    Tag(TagError),
    #[error("invalid digest: {0}")]
    Digest(DigestError),
}

/// The path tricks refused before a path is split (they have no business in an OCI path and
/// could otherwise reach the disk or confuse an upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnsafePath {
    #[error("has a `.` or `..` segment")]
    DotSegment,
    #[error("has an empty segment (`//`)")]
    EmptySegment,
    #[error("has a backslash")]
    Backslash,
    #[error("has a control character")]
    ControlCharacter,
    #[error("has a percent-encoded `.`, `/`, `\\`, `%` or NUL")]
    EncodedSeparator,
}

impl RouteError {
    /// The OCI error code that describes this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            RouteError::UnsafePath(_) | RouteError::Name(_) => ErrorCode::NameInvalid,
            // The distribution spec has no TAG_INVALID; MANIFEST_INVALID is the closest code it
            // defines for a manifest request that names no valid manifest.
            RouteError::Tag(_) => ErrorCode::ManifestInvalid,
            RouteError::Digest(_) => ErrorCode::DigestInvalid,
        }
    }

    /// The JSON error body for a 400 answer.
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::UnsafePath(_) => "path",
            RouteError::Name(_) => "name",
            RouteError::Tag(_) => "tag",
            RouteError::Digest(_) => "digest",
        }
    }

    pub fn body(&self) -> String {
        error_body(self.code(), &self.to_string())
    }
}

impl From<ReferenceError> for RouteError {
    fn from(e: ReferenceError) -> Self {
        match e {
            ReferenceError::Tag(e) => RouteError::Tag(e),
            ReferenceError::Digest(e) => RouteError::Digest(e),
        }
    }
}

/// Error codes of the distribution spec (`errors[].code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
}

impl ErrorCode {
    /// The code as the spec spells it in `errors[].code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
        }
    }
}

/// Renders `{"errors":[{"code":..,"message":..}]}` (content type `application/json`).
pub fn error_body(code: ErrorCode, message: &str) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        errors: [Entry<'a>; 1],
    }
    #[derive(Serialize)]
    struct Entry<'a> {
        code: &'static str,
        message: &'a str,
    }
    serde_json::to_string(&Body {
        errors: [Entry {
            code: code.as_str(),
            message,
        }],
    })
    .expect("serializing strings cannot fail")
}

impl Route {
    /// Routes a request by method and path. `path` may carry a query string; it is ignored.
    ///
    /// Only `GET` and `HEAD` under `/v2/` produce OCI routes, and only those paths are
    /// validated: everything else is [`Route::Other`], forwarded byte for byte.
    pub fn parse(method: &Method, path: &str) -> Result<Route, RouteError> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        if *method != Method::GET && *method != Method::HEAD {
            return Ok(Route::Other);
        }
        let Some(rest) = path.strip_prefix("/v2") else {
            return Ok(Route::Other);
        };
        if rest.is_empty() || rest == "/" {
            return Ok(Route::Base);
        }
        let Some(rest) = rest.strip_prefix('/') else {
            // `/v2x`, `/v20/...`: not the registry API.
            return Ok(Route::Other);
        };
        check_safe(rest).map_err(RouteError::UnsafePath)?;

        let segments: Vec<&str> = rest.split('/').collect();
        let n = segments.len();
        if n < 2 {
            // `/v2/_catalog` and friends.
            return Ok(Route::Other);
        }
        let name_of = |k: usize| segments[..n - k].join("/").parse::<RepositoryName>();
        match (segments[n - 2], segments[n - 1]) {
            ("tags", "list") => Ok(Route::TagsList { name: name_of(2)? }),
            ("manifests", reference) => {
                let name = name_of(2)?;
                Ok(Route::Manifest {
                    name,
                    reference: reference.parse()?,
                })
            }
            // `GET /v2/<name>/blobs/uploads` is an upload status, not a blob.
            ("blobs", "uploads") => Ok(Route::Other),
            ("blobs", digest) => {
                let name = name_of(2)?;
                Ok(Route::Blob {
                    name,
                    digest: digest.parse().map_err(RouteError::Digest)?,
                })
            }
            _ => Ok(Route::Other),
        }
    }
}

/// Refuses the tricks that could turn a path into something other than what it looks like.
/// A valid name, tag or digest never contains any of them, so nothing legitimate is refused.
fn check_safe(path: &str) -> Result<(), UnsafePath> {
    if path.bytes().any(|b| b.is_ascii_control()) {
        return Err(UnsafePath::ControlCharacter);
    }
    if path.contains('\\') {
        return Err(UnsafePath::Backslash);
    }
    // Encoded `.`, `/`, `\`, NUL and `%` itself (double encoding), in either hex case.
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c", "%00", "%25"]
        .iter()
        .any(|enc| lower.contains(enc))
    {
        return Err(UnsafePath::EncodedSeparator);
    }
    for segment in path.split('/') {
        match segment {
            "." | ".." => return Err(UnsafePath::DotSegment),
            _ => {}
        }
    }
    // A trailing slash (`uploads/`) is an empty last segment and allowed; `//` inside is not.
    if path.contains("//") || path.starts_with('/') {
        return Err(UnsafePath::EmptySegment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn get(path: &str) -> Result<Route, RouteError> {
        Route::parse(&Method::GET, path)
    }

    #[test]
    fn routes_the_read_endpoints() {
        assert_eq!(get("/v2/").unwrap(), Route::Base);
        assert_eq!(get("/v2").unwrap(), Route::Base);
        assert_eq!(get("/v2/?x=1").unwrap(), Route::Base);
        assert_eq!(
            get("/v2/library/nginx/manifests/latest").unwrap(),
            Route::Manifest {
                name: "library/nginx".parse().unwrap(),
                reference: "latest".parse().unwrap(),
            }
        );
        assert_eq!(
            Route::parse(&Method::HEAD, &format!("/v2/a/manifests/{}", d('a'))).unwrap(),
            Route::Manifest {
                name: "a".parse().unwrap(),
                reference: d('a').parse().unwrap(),
            }
        );
        assert_eq!(
            get(&format!("/v2/a/b/c/blobs/{}", d('1'))).unwrap(),
            Route::Blob {
                name: "a/b/c".parse().unwrap(),
                digest: d('1').parse().unwrap(),
            }
        );
        assert_eq!(
            get("/v2/library/nginx/tags/list?n=10&last=1.2").unwrap(),
            Route::TagsList {
                name: "library/nginx".parse().unwrap()
            }
        );
    }

    #[test]
    fn endpoint_words_are_valid_name_components() {
        // The route is decided by the last two segments, as the distribution router does.
        assert_eq!(
            get("/v2/blobs/manifests/x/manifests/v1").unwrap(),
            Route::Manifest {
                name: "blobs/manifests/x".parse().unwrap(),
                reference: "v1".parse().unwrap(),
            }
        );
        assert_eq!(
            get(&format!("/v2/tags/list/blobs/{}", d('f'))).unwrap(),
            Route::Blob {
                name: "tags/list".parse().unwrap(),
                digest: d('f').parse().unwrap(),
            }
        );
    }

    #[test]
    fn writes_uploads_and_other_paths_are_passed_through() {
        let m = format!("/v2/a/manifests/{}", d('a'));
        for method in [Method::PUT, Method::POST, Method::PATCH, Method::DELETE] {
            assert_eq!(Route::parse(&method, &m).unwrap(), Route::Other);
            // Not validated either: it is not ours to judge.
            assert_eq!(
                Route::parse(&method, "/v2/../x/manifests/latest").unwrap(),
                Route::Other
            );
        }
        for path in [
            "/",
            "/v2x",
            "/v20/a/manifests/latest",
            "/V2/a/manifests/latest",
            "/token?service=registry",
            "/v2/_catalog",
            "/v2/_catalog?n=10",
            "/v2/a/blobs/uploads",
            "/v2/a/blobs/uploads/",
            "/v2/a/blobs/uploads/0e9c1b1e-uuid?_state=x",
            &format!("/v2/a/referrers/{}", d('a')),
            "/v2/a/tags/list/",
            "/v2/a/manifests",
        ] {
            assert_eq!(get(path).unwrap(), Route::Other, "{path}");
        }
    }

    #[test]
    fn invalid_names_tags_and_digests_are_errors_with_codes() {
        let cases = [
            ("/v2/Library/nginx/manifests/latest", ErrorCode::NameInvalid),
            ("/v2/manifests/latest", ErrorCode::NameInvalid),
            (
                &format!("/v2/{}/tags/list", "a".repeat(256)),
                ErrorCode::NameInvalid,
            ),
            ("/v2/ngïnx/tags/list", ErrorCode::NameInvalid),
            ("/v2/a/manifests/-bad", ErrorCode::ManifestInvalid),
            (
                &format!("/v2/a/manifests/{}", "t".repeat(129)),
                ErrorCode::ManifestInvalid,
            ),
            ("/v2/a/manifests/", ErrorCode::ManifestInvalid),
            ("/v2/a/manifests/sha256:abc", ErrorCode::DigestInvalid),
            ("/v2/a/blobs/latest", ErrorCode::DigestInvalid),
            (&format!("/v2/a/blobs/{}", d('A')), ErrorCode::DigestInvalid),
            (
                &format!("/v2/a/blobs/md5:{}", "a".repeat(32)),
                ErrorCode::DigestInvalid,
            ),
            ("/v2/a/blobs/", ErrorCode::DigestInvalid),
        ];
        for (path, code) in cases {
            let err = get(path).unwrap_err();
            assert_eq!(err.code(), code, "{path}: {err}");
        }
    }

    #[test]
    fn traversal_and_encoding_tricks_are_refused_before_routing() {
        let blob = d('a');
        let cases = [
            (
                format!("/v2/../../etc/blobs/{blob}"),
                UnsafePath::DotSegment,
            ),
            (format!("/v2/a/../b/blobs/{blob}"), UnsafePath::DotSegment),
            ("/v2/a/manifests/..".to_owned(), UnsafePath::DotSegment),
            ("/v2/a/./manifests/x".to_owned(), UnsafePath::DotSegment),
            (
                format!("/v2/%2e%2e/blobs/{blob}"),
                UnsafePath::EncodedSeparator,
            ),
            (
                format!("/v2/%2E%2E/blobs/{blob}"),
                UnsafePath::EncodedSeparator,
            ),
            (
                format!("/v2/a%2fb/blobs/{blob}"),
                UnsafePath::EncodedSeparator,
            ),
            (
                format!("/v2/a%2Fb/blobs/{blob}"),
                UnsafePath::EncodedSeparator,
            ),
            (
                format!("/v2/a%5cb/blobs/{blob}"),
                UnsafePath::EncodedSeparator,
            ),
            (
                format!("/v2/a%00/blobs/{blob}"),
                UnsafePath::EncodedSeparator,
            ),
            (
                format!("/v2/a%252e/blobs/{blob}"),
                UnsafePath::EncodedSeparator,
            ),
            (
                "/v2/a/manifests/x\0".to_owned(),
                UnsafePath::ControlCharacter,
            ),
            (
                "/v2/a/manifests/x\n".to_owned(),
                UnsafePath::ControlCharacter,
            ),
            (format!("/v2/a\\..\\b/blobs/{blob}"), UnsafePath::Backslash),
            (format!("/v2/a//b/blobs/{blob}"), UnsafePath::EmptySegment),
            (format!("//v2/a/blobs/{blob}"), UnsafePath::EmptySegment),
            ("/v2//a/tags/list".to_owned(), UnsafePath::EmptySegment),
        ];
        for (path, why) in cases {
            match get(&path) {
                // `//v2/...` does not start with `/v2`, so it is simply not ours.
                Ok(Route::Other) if path.starts_with("//") => {}
                other => assert_eq!(other, Err(RouteError::UnsafePath(why)), "{path:?}"),
            }
        }
    }

    #[test]
    fn other_percent_encodings_fail_the_grammar() {
        let err = get("/v2/a%41/manifests/latest").unwrap_err();
        assert_eq!(err.code(), ErrorCode::NameInvalid);
    }

    #[test]
    fn renders_the_oci_error_body() {
        let err = get("/v2/a/blobs/sha256:xyz").unwrap_err();
        let body: serde_json::Value = serde_json::from_str(&err.body()).unwrap();
        assert_eq!(body["errors"][0]["code"], "DIGEST_INVALID");
        assert_eq!(
            body["errors"][0]["message"],
            "invalid digest: sha256 digest needs 64 hex characters, got 3"
        );
        assert_eq!(
            error_body(ErrorCode::BlobUnknown, "say \"hi\""),
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"say \"hi\""}]}"#
        );
    }
}
