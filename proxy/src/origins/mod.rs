//! Where a request's content comes from when the cache does not have it: the cluster's hub, the
//! real upstream registry, the pooled HTTP client and verified TLS both use, the two traits the
//! registry proxy asks them through, and the write-back that pushes what the upstream served into
//! the hub.

pub(crate) mod client;
pub mod hub;
pub(crate) mod sources;
pub(crate) mod tls;
pub mod upstream;
pub mod writeback;
