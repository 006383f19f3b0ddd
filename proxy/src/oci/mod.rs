//! The OCI distribution protocol as pure values: routes, names, digests, ranges, media types and
//! error bodies. No I/O lives here.
//!
//! What the HTTP handler uses:
//!
//! - [`Route::parse`]`(&Method, path) -> Result<Route, RouteError>`: `GET`/`HEAD` on `/v2/`,
//!   manifests, blobs and tag lists become typed routes with validated names; everything else
//!   is [`Route::Other`] (forward untouched). A [`RouteError`] is answered with 400 and
//!   [`RouteError::body`] (`{"errors":[{"code":..,"message":..}]}`); [`error_body`] renders the
//!   same shape for any [`ErrorCode`].
//! - [`Digest`] (`FromStr`, `Display`, [`Digest::verifier`] for streaming checks,
//!   [`Digest::sha256_of`]), [`RepositoryName`], [`Tag`], [`Reference`].
//! - [`ByteRange::parse`]`(header) -> Option<ByteRange>` (`None`: ignore the header, serve 200),
//!   [`ByteRange::resolve`]`(len) -> Result<ResolvedRange, Unsatisfiable>`, then
//!   [`ResolvedRange::content_range`] for 206 or [`Unsatisfiable::content_range`] for 416.
//! - [`media_type`]: manifest media types and the `Accept` value to send upstream.
//! - [`ManifestRefs::parse`]`(bytes)`: the media type a manifest declares and the digests it
//!   references.
//! - [`BearerChallenge::parse`]`(www_authenticate)`: where the token flow gets a token, used to
//!   ask a registry anonymously whether a repository is public.

mod challenge;
mod digest;
mod image_ref;
mod manifest;
pub mod media_type;
mod name;
mod range;
mod route;

pub use challenge::{BearerChallenge, TokenAnswer};
pub use digest::{Algorithm, Digest, DigestError, DigestMismatch, DigestVerifier, Verified};
pub use image_ref::{ImageRef, ImageRefError};
pub use manifest::{MAX_REFERENCES, ManifestRefs};
pub use name::{
    MAX_NAME_LEN, MAX_TAG_LEN, NameError, Reference, ReferenceError, RepositoryName, Tag, TagError,
};
pub use range::{ByteRange, ResolvedRange, Unsatisfiable};
pub use route::{ErrorCode, Route, RouteError, UnsafePath, error_body};
