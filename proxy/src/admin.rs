//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (programs attached, listeners up, and the hub reachable unless it is optional).
//! Reachable from pods when it listens on the node address: its connections have their own
//! small budget (per source address too) and the same deadlines as the proxy port's.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::{Method, Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;

use crate::{
    accept::conn::{ClientKey, Gate, Limits},
    config::{self, Zero, nonzero_count},
    origins::client::{self, ProxyBody},
};

/// What the admin listener needs from the configuration (`admin`).
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// How often the hub is checked for `/readyz` and `pullproxy_hub_up`.
    pub hub_check_interval: Duration,
    /// Every client is a source address, and none is direct.
    pub limits: Limits,
}

impl TryFrom<&config::Admin> for AdminSettings {
    type Error = Zero;

    fn try_from(a: &config::Admin) -> Result<Self, Zero> {
        let total = nonzero_count("admin.max_connections", a.max_connections)?;
        let per_client = nonzero_count(
            "admin.max_connections_per_client",
            a.max_connections_per_client,
        )?;
        Ok(Self {
            listen: a.listen,
            // A zero period would stop the hub check (tokio's interval refuses it) and leave
            // pullproxy unready for good.
            hub_check_interval: config::nonzero_duration(
                "admin.hub_check_interval",
                a.hub_check_interval,
            )?,
            limits: Limits {
                total,
                per_client,
                direct: per_client,
            }
            .within(total),
        })
    }
}

/// What `/readyz` checks.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    /// The kernel programs are attached (or the redirect is disabled).
    pub(crate) attached: AtomicBool,
    /// The proxy listeners are bound.
    pub(crate) listening: AtomicBool,
    /// The last hub check succeeded (or there is no hub).
    pub(crate) hub_up: AtomicBool,
    /// An unreachable hub does not make pullproxy unready.
    pub(crate) hub_optional: bool,
}

impl Readiness {
    /// Ready, or the first reason it is not.
    pub(crate) fn check(&self) -> Result<(), &'static str> {
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
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Arc<Readiness>,
    gate: Arc<Gate>,
) {
    loop {
        let (stream, peer) = gate.accept(&listener).await;
        // Over the limit: dropping the stream closes it at once.
        let Some(permit) = gate.admit(ClientKey::peer(peer.ip())) else {
            continue;
        };
        let (registry, readiness, gate) = (registry.clone(), readiness.clone(), gate.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = answer(&req, &registry, &readiness);
                async move { Ok::<_, Infallible>(resp) }
            });
            gate.serve_http(stream, service).await;
            drop(permit);
        });
    }
}

/// Binds the admin address.
pub(crate) async fn bind(
    addr: SocketAddr,
) -> Result<TcpListener, crate::accept::listen::BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::accept::listen::BindError { addr, source })
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
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            match encode(&mut out, registry) {
                Ok(()) if openmetrics => text(
                    StatusCode::OK,
                    out,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Ok(()) => text(
                    StatusCode::OK,
                    classic_text(&out),
                    "text/plain; version=0.0.4; charset=utf-8",
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

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition, for clients that do
/// not ask for OpenMetrics (curl, promtool, older scrapers): counter families are named after
/// their `_total` samples, `info` becomes a `_info` gauge, `UNIT` and `EOF` lines go.
fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ');
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (family, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some((_, text)) = help.take().filter(|(h, _)| *h == name) {
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
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
    fn classic_text_renames_counter_and_info_families() {
        let om = "# HELP pullproxy_requests Requests.\n# TYPE pullproxy_requests counter\n\
pullproxy_requests_total{kind=\"blob\"} 3\n\
# HELP pullproxy_request_duration_seconds Time.\n# TYPE pullproxy_request_duration_seconds histogram\n\
# UNIT pullproxy_request_duration_seconds seconds\n\
pullproxy_request_duration_seconds_count 1\n\
# HELP pullproxy_build pullproxy build information.\n# TYPE pullproxy_build info\n\
pullproxy_build_info{version=\"0.1.0\"} 1\n# EOF\n";
        let classic = classic_text(om);
        assert_eq!(
            classic,
            "# HELP pullproxy_requests_total Requests.\n# TYPE pullproxy_requests_total counter\n\
pullproxy_requests_total{kind=\"blob\"} 3\n\
# HELP pullproxy_request_duration_seconds Time.\n# TYPE pullproxy_request_duration_seconds histogram\n\
pullproxy_request_duration_seconds_count 1\n\
# HELP pullproxy_build_info pullproxy build information.\n# TYPE pullproxy_build_info gauge\n\
pullproxy_build_info{version=\"0.1.0\"} 1\n"
        );
    }

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
