//! The proxy's listeners and what happens to each accepted connection: it is matched with its
//! kernel record (where it was going, who opened it), admitted within its client's connection
//! budget (or closed at once), then either terminated (TLS to a registry host, with a leaf minted
//! by the node CA, its record layer then in the kernel where it can be; or plain HTTP to a
//! configured insecure registry) and served by the registry proxy under the connection
//! deadlines, or spliced byte for byte to where it was going.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::BodyExt as _;

use http::uri::{Authority, Scheme};
use hyper::service::service_fn;
use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::{Instant, error::Elapsed},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::{
    accept::client_hello::{ClientHelloPeek, TlsOffer, peek_client_hello},
    accept::conn::{ClientKey, CloseReason, Gate, Permit, Reset},
    accept::ktls::{KernelTls, KtlsError, Route},
    accept::original_dst::{ClientAddr, ListenAddr, OriginalDst, OriginalDstSource},
    node_ca::LeafMinter,
    origins::client::BoxError,
    origins::upstream::Origin,
    registry::{Caller, ConnContext, RegistryProxy},
};

/// How long connecting to an original destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest plain-HTTP request head looked at for the Host header.
const HTTP_PEEK_LIMIT: usize = 16 << 10;

/// What happened to accepted connections.
#[derive(Debug, Default)]
pub(crate) struct ServerMetrics {
    connections: prometheus_client::metrics::family::Family<
        [(&'static str, &'static str); 1],
        prometheus_client::metrics::counter::Counter,
    >,
}

impl ServerMetrics {
    /// Registers the connection counter (names get the registry's `pullproxy_` prefix).
    pub(crate) fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        reg.register(
            "connections",
            "Accepted connections (within the connection limits) by decision: terminated \
             (served by pullproxy), spliced (relayed untouched to the original destination), \
             closed (nowhere to go), client_rejected_ca (the client does not trust the node CA \
             yet)",
            self.connections.clone(),
        );
    }

    fn decided(&self, decision: &'static str) {
        self.connections
            .get_or_create(&[("decision", decision)])
            .inc();
    }
}

/// Called with the pid of a client that rejected the node CA's certificate.
pub(crate) type OnDistrust = Box<dyn Fn(u32) + Send + Sync>;

/// Everything a connection needs.
pub(crate) struct Server {
    pub(crate) metrics: Arc<ServerMetrics>,
    /// Connection limits and deadlines of the proxy port.
    pub(crate) gate: Gate,
    /// Stops redirecting a process that does not trust the node CA (it started before the CA was
    /// installed): its later connections go direct, so its pulls work until it restarts.
    pub(crate) on_distrust: OnDistrust,
    pub(crate) records: Arc<dyn OriginalDstSource>,
    pub(crate) minter: Arc<LeafMinter>,
    pub(crate) acceptor: TlsAcceptor,
    /// Where terminated connections' record layer goes to the kernel.
    pub(crate) kernel_tls: Arc<KernelTls>,
    /// Registries spoken to in plain HTTP (`host` or `host:port`).
    pub(crate) insecure: Vec<String>,
    pub(crate) proxy: Arc<RegistryProxy>,
}

impl Server {
    /// Accepts on every listener until the task is dropped.
    pub(crate) async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>) {
        let mut tasks = JoinSet::new();
        for listener in listeners {
            tasks.spawn(self.clone().accept_loop(listener));
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = self.gate.accept(&listener).await;
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let orig = self.records.take(ClientAddr(peer), ListenAddr(local));
            let key = match &orig {
                Some(o) => ClientKey::Process {
                    cgroup_id: o.process.cgroup_id,
                    pid: o.process.pid,
                },
                None => ClientKey::Direct,
            };
            // Over the limit: dropping the stream closes it at once.
            let Some(permit) = self.gate.admit(key) else {
                continue;
            };
            tokio::spawn(self.clone().connection(stream, orig, permit));
        }
    }

    /// Serves one admitted connection; its place in the budget is given back when this ends.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        orig: Option<OriginalDst>,
        _permit: Permit,
    ) {
        let _ = stream.set_nodelay(true);
        if let Some(o) = &orig {
            debug!(
                dst = %o.addr,
                pid = o.process.pid,
                comm = %o.process.comm,
                cgroup_id = o.process.cgroup_id,
                "redirected connection"
            );
        }
        let dst = orig.as_ref().map(|o| o.addr.0);
        let dst_port = dst.map(|d| d.port());
        let handshake = self.gate.deadlines().handshake;
        let deadline = Instant::now() + handshake;
        match peek_client_hello(&stream, handshake).await {
            Ok(ClientHelloPeek::Sni(name, offer)) if self.minter.intercepts(&name) => {
                // Minting first means a host the CA cannot cover is spliced, not broken.
                match self.minter.certified_key(&name) {
                    Ok(_) => {
                        self.metrics.decided("terminated");
                        let ctx = ConnContext {
                            origin: origin("https", &name, dst_port, 443, dst),
                            caller: orig.map(caller),
                            label: self.minter.label(&name),
                            files: None,
                        };
                        self.terminate_tls(stream, ctx, deadline, &offer).await
                    }
                    Err(e) => {
                        warn!(server_name = %name, error = %e, "cannot mint; splicing instead");
                        self.splice(stream, orig).await
                    }
                }
            }
            Ok(ClientHelloPeek::NotTls) => match peek_http_host(&stream, deadline).await {
                Ok(Some(host)) => match self.insecure_entry(&host, dst_port) {
                    Some(entry) => {
                        self.metrics.decided("terminated");
                        let (name, port) = split_host_port(&host);
                        let ctx = ConnContext {
                            origin: origin("http", name, port.or(dst_port), 80, dst),
                            caller: orig.map(caller),
                            label: entry.to_owned(),
                            files: None,
                        };
                        self.serve_http(stream, ctx).await
                    }
                    None => self.splice(stream, orig).await,
                },
                Ok(None) => self.splice(stream, orig).await,
                Err(_) => self.peek_timed_out(stream, orig).await,
            },
            Ok(other) => {
                debug!(peek = ?other, "not an intercepted TLS server name; splicing");
                self.splice(stream, orig).await
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.peek_timed_out(stream, orig).await
            }
            Err(e) => {
                debug!(error = %e, "no client hello; splicing");
                self.splice(stream, orig).await
            }
        }
    }

    /// No ClientHello or request head before the handshake deadline. A redirected connection may
    /// speak a protocol whose server talks first, so it is spliced as before; a direct one has
    /// nowhere to go and is closed.
    async fn peek_timed_out(&self, stream: TcpStream, orig: Option<OriginalDst>) {
        debug!("no client hello or request head before the handshake deadline");
        if orig.is_none() {
            self.gate.closed(CloseReason::PeekTimeout);
        }
        self.splice(stream, orig).await
    }

    /// Relays the connection untouched, or closes it when there is nowhere to go.
    async fn splice(&self, client: TcpStream, orig: Option<OriginalDst>) {
        self.metrics
            .decided(if orig.is_some() { "spliced" } else { "closed" });
        splice(client, orig).await
    }

    /// The configured insecure registry entry that `host` (a Host header) is, if any.
    fn insecure_entry(&self, host: &str, dst_port: Option<u16>) -> Option<&str> {
        let (name, port) = split_host_port(host);
        let port = port.or(dst_port).unwrap_or(80);
        self.insecure
            .iter()
            .find(|entry| {
                let (e_name, e_port) = split_host_port(entry);
                e_name.eq_ignore_ascii_case(name) && e_port.unwrap_or(80) == port
            })
            .map(String::as_str)
    }

    async fn terminate_tls(
        self: Arc<Self>,
        stream: TcpStream,
        mut ctx: ConnContext,
        deadline: Instant,
        offer: &TlsOffer,
    ) {
        let config = match self.kernel_tls.route(offer) {
            Route::Kernel(config) => config,
            Route::User(_) => {
                let tls =
                    match tokio::time::timeout_at(deadline, self.acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return self.handshake_failed(&ctx, &e),
                        Err(_) => return self.handshake_timed_out(&ctx),
                    };
                return self.serve_http(tls, ctx).await;
            }
        };
        let accepted = self.kernel_tls.accept(stream, config);
        match tokio::time::timeout_at(deadline, accepted).await {
            Ok(Ok(tls)) => {
                ctx.files = Some(Box::new(tls.files()));
                self.serve_http(tls, ctx).await
            }
            Ok(Err(KtlsError::Handshake(e))) => self.handshake_failed(&ctx, &e),
            Ok(Err(e)) => warn!(
                registry = %ctx.origin.authority,
                error = %crate::telemetry::error_chain(&e),
                "kernel TLS refused the keys of a finished handshake; connection closed"
            ),
            Err(_) => self.handshake_timed_out(&ctx),
        }
    }

    fn handshake_timed_out(&self, ctx: &ConnContext) {
        self.gate.closed(CloseReason::HandshakeTimeout);
        debug!(registry = %ctx.origin.authority, "TLS handshake with the client timed out");
    }

    /// A handshake that failed; a client refusing the node CA's certificate is told apart.
    fn handshake_failed(&self, ctx: &ConnContext, e: &std::io::Error) {
        match (&ctx.caller, rejected_our_certificate(e)) {
            (Some(c), true) => {
                self.metrics.decided("client_rejected_ca");
                warn!(
                    registry = %ctx.origin.authority,
                    pid = c.pid,
                    comm = %c.comm,
                    "the client does not trust the node CA (it started before the CA was \
                     installed): its connections go direct until it restarts; run \
                     `pullproxy ca status`"
                );
                (self.on_distrust)(c.pid);
            }
            _ => {
                debug!(registry = %ctx.origin.authority, error = %e, "TLS handshake with the client failed")
            }
        }
    }

    async fn serve_http<I>(self: Arc<Self>, io: I, ctx: ConnContext)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Reset + Unpin + Send + 'static,
    {
        let ctx = Arc::new(ctx);
        let proxy = self.proxy.clone();
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let proxy = proxy.clone();
            let ctx = ctx.clone();
            let req = req.map(|b| b.map_err(BoxError::from).boxed_unsync());
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(&ctx, req).await) }
        });
        self.gate.serve_http(io, service).await
    }
}

/// Whether a failed handshake is the client refusing our certificate (the alert a client sends
/// when the chain does not verify: Go sends `bad_certificate`, OpenSSL and rustls `unknown_ca`).
fn rejected_our_certificate(e: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::UnsupportedCertificate
        ))
    )
}

/// An upstream origin for `host`; the port is kept when the client used a non-default one.
/// Requests for it go to `dst`, the connection's original destination, when there is one.
fn origin(
    scheme: &'static str,
    host: &str,
    port: Option<u16>,
    default_port: u16,
    dst: Option<SocketAddr>,
) -> Origin {
    let authority = match port {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host.to_owned(),
    };
    Origin {
        scheme: Scheme::try_from(scheme).expect("http or https"),
        authority: Authority::try_from(authority.as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid.invalid")),
        addr: dst,
    }
}

/// `host[:port]` -> (host, port). IPv6 literals keep their brackets.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (s, None),
        },
        _ => (s, None),
    }
}

/// The Host header of a plain-HTTP request, read without consuming anything; an error when the
/// head is not complete by `deadline`.
async fn peek_http_host(stream: &TcpStream, deadline: Instant) -> Result<Option<String>, Elapsed> {
    let mut buf = vec![0u8; HTTP_PEEK_LIMIT];
    let peek = async {
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..n]) {
                Ok(httparse::Status::Complete(_)) => {
                    return req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("host"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(|h| h.trim().to_ascii_lowercase());
                }
                Ok(httparse::Status::Partial) if n < buf.len() => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                _ => return None,
            }
        }
    };
    tokio::time::timeout_at(deadline, peek).await
}

/// Relays bytes between the client and its original destination, untouched. Without a kernel
/// record there is nowhere to go: the connection is closed.
pub(crate) async fn splice(mut client: TcpStream, orig: Option<OriginalDst>) {
    let Some(orig) = orig else {
        debug!("connection without a redirect record and nothing to serve; closing");
        return;
    };
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(orig.addr.0))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(dst = %orig.addr, error = %e, "connecting to the original destination failed");
            return;
        }
        Err(_) => {
            warn!(dst = %orig.addr, "connecting to the original destination timed out");
            return;
        }
    };
    debug!(dst = %orig.addr, "splicing");
    let mut upstream = upstream;
    if let Err(e) = copy_bidirectional(&mut client, &mut upstream).await {
        debug!(dst = %orig.addr, error = %e, "splice ended");
    }
}

/// Who opened a redirected connection, as the policy names it in logs and metrics.
fn caller(orig: OriginalDst) -> Caller {
    Caller {
        pid: orig.process.pid,
        comm: orig.process.comm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_split() {
        assert_eq!(
            split_host_port("sealos.hub:5000"),
            ("sealos.hub", Some(5000))
        );
        assert_eq!(split_host_port("quay.io"), ("quay.io", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("x:notaport"), ("x:notaport", None));
    }

    #[test]
    fn origins_keep_non_default_ports() {
        assert_eq!(
            origin("https", "quay.io", Some(443), 443, None).authority,
            "quay.io"
        );
        assert_eq!(
            origin("https", "quay.io", Some(8443), 443, None).authority,
            "quay.io:8443"
        );
        assert_eq!(
            origin("http", "hub", Some(5000), 80, None).authority,
            "hub:5000"
        );
    }
}
