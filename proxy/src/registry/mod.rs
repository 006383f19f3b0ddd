//! The registry proxy: answers a terminated connection's OCI requests from the hub, the cache or
//! the upstream, and forwards everything else.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::{
    client::{self, ProxyBody},
    original_dst::{ClientAddr, OriginalDst},
    upstream::{Origin, Upstream},
};

/// What is known about a terminated connection.
pub struct ConnContext {
    /// The registry the client talks to.
    pub origin: Origin,
    /// The kernel record (absent when a client connected to the proxy port directly).
    pub orig: Option<OriginalDst>,
    pub peer: ClientAddr,
}

/// Serves registry requests.
pub struct RegistryProxy {
    pub upstream: Upstream,
}

impl RegistryProxy {
    pub async fn handle(
        self: &Arc<Self>,
        ctx: &ConnContext,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        match self.upstream.forward(&ctx.origin, req).await {
            Ok(resp) => resp,
            Err(e) => {
                let mut r = Response::new(client::full(e.to_string()));
                *r.status_mut() = StatusCode::BAD_GATEWAY;
                r
            }
        }
    }
}
