//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (programs attached, listeners up, and the hub reachable unless it is optional).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http::{Method, Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::client::{self, ProxyBody};

/// What `/readyz` checks.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The kernel programs are attached (or the redirect is disabled).
    pub attached: AtomicBool,
    /// The proxy listeners are bound.
    pub listening: AtomicBool,
    /// The last hub check succeeded (or there is no hub).
    pub hub_up: AtomicBool,
    /// An unreachable hub does not make pullproxy unready.
    pub hub_optional: bool,
}

impl Readiness {
    /// Ready, or the first reason it is not.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("kernel programs not attached");
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Err("proxy listeners not bound");
        }
        if !self.hub_optional && !self.hub_up.load(Ordering::Relaxed) {
            return Err("hub unreachable (set hub.optional: true to serve without it)");
        }
        Ok(())
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, readiness: Arc<Readiness>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (registry, readiness) = (registry.clone(), readiness.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = answer(&req, &registry, &readiness);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %crate::telemetry::error_chain(e.as_ref()), "admin connection ended");
            }
        });
    }
}

/// Binds the admin address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("binding the admin listener {addr}: {e}"))
    })
}

fn answer(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            match encode(&mut out, registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    out,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                    "text/plain",
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => match readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(client::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_the_first_missing_piece() {
        let r = Readiness::default();
        assert_eq!(r.check(), Err("kernel programs not attached"));
        r.attached.store(true, Ordering::Relaxed);
        assert_eq!(r.check(), Err("proxy listeners not bound"));
        r.listening.store(true, Ordering::Relaxed);
        assert!(r.check().unwrap_err().starts_with("hub unreachable"));
        r.hub_up.store(true, Ordering::Relaxed);
        assert_eq!(r.check(), Ok(()));
        let optional = Readiness {
            hub_optional: true,
            ..Readiness::default()
        };
        optional.attached.store(true, Ordering::Relaxed);
        optional.listening.store(true, Ordering::Relaxed);
        assert_eq!(optional.check(), Ok(()));
    }
}
