//! Outbound HTTP for the hub and upstream registries: pooled hyper clients (HTTP/1.1, or h2 when
//! ALPN picks it) over verified rustls.
//!
//! Where a connection goes is decided per connection, never process-wide: a registry request on a
//! redirected connection dials the address that connection's runtime itself dialled (the kernel
//! record travels with the request, [`UpstreamClients::for_origin`]), so pullproxy never resolves
//! a registry name differently from the runtime, and one client's `--resolve` affects only its
//! own requests. Every other name (a connection made to pullproxy directly, CDN redirects, token
//! realms) is resolved through DNS and dialled only if [`AddressPolicy`] allows the address: a
//! registry must not be able to point pullproxy into the node (loopback, link-local metadata
//! services, its own admin port).

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::Uri;
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo},
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

/// Boxed error of bodies and clients.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of outbound requests and of every response pullproxy sends.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// The pooled client.
pub(crate) type HttpClient = Client<Connector, ProxyBody>;

/// Which resolved addresses a connector may dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressPolicy {
    /// Whatever DNS answers: the hub, which the operator named.
    Any,
    /// Only addresses outside this node: never loopback, link-local (cloud metadata services),
    /// unspecified, multicast or broadcast addresses, and never pullproxy's own admin port.
    Remote { admin_port: u16 },
}

impl AddressPolicy {
    /// Whether `addr` may be dialled.
    pub(crate) fn permits(self, addr: SocketAddr) -> bool {
        let AddressPolicy::Remote { admin_port } = self else {
            return true;
        };
        if addr.port() == admin_port {
            return false;
        }
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => {
                !(v4.is_loopback()
                    || v4.is_link_local()
                    || v4.is_unspecified()
                    || v4.is_multicast()
                    || v4.is_broadcast())
            }
            IpAddr::V6(v6) => {
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unicast_link_local())
            }
        }
    }
}

/// Why a connector did not dial; found in a client error's source chain.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// The name does not resolve: not an "unreachable registry" (stale content must not be
    /// served for names that do not exist).
    #[error("{host} does not resolve: {source}")]
    UnknownHost {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} resolves only to addresses pullproxy never dials ({addrs})")]
    Forbidden { host: String, addrs: String },
}

impl DialError {
    /// The dial error behind a client error, if that is what it was.
    pub(crate) fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a DialError> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(d) = err.downcast_ref::<DialError>() {
                return Some(d);
            }
            // io::Error's `source()` skips the error it wraps: look inside it here.
            if let Some(d) = err
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<DialError>())
            {
                return Some(d);
            }
            cur = err.source();
        }
        None
    }
}

/// Dials TCP (a pinned address, or DNS under a policy) and TLS for `https` URIs.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: TlsConnector,
    connect_timeout: Duration,
    policy: AddressPolicy,
    /// `host` is dialled at this address only (the original destination of a connection).
    pin: Option<(Arc<str>, SocketAddr)>,
}

impl Connector {
    pub(crate) fn new(
        tls: Arc<rustls::ClientConfig>,
        policy: AddressPolicy,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            tls: TlsConnector::from(tls),
            connect_timeout,
            policy,
            pin: None,
        }
    }

    /// The same connector, dialling `host` at `addr` (and nowhere else).
    fn pinned(&self, host: &str, addr: SocketAddr) -> Self {
        Self {
            pin: Some((host.into(), addr)),
            ..self.clone()
        }
    }

    async fn connect(self, uri: Uri) -> io::Result<Stream> {
        let host = uri
            .host()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URI without a host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unsupported scheme {other:?}"),
                ));
            }
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addrs = self.addresses(&host, port).await?;
        let tcp = self.dial(&host, &addrs).await?;
        tcp.set_nodelay(true)?;
        if !tls {
            return Ok(Stream::Plain(tcp));
        }
        let name = ServerName::try_from(host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let stream = tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake with {host} timed out"),
                )
            })??;
        Ok(Stream::Tls(Box::new(stream)))
    }

    /// Where `host:port` may be dialled: the pinned address, or what DNS answers that the policy
    /// permits.
    async fn addresses(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        // The pinned client only ever carries its origin's requests, so its host is its
        // address, whatever port the URI names.
        if let Some((pinned, addr)) = &self.pin
            && **pinned == *host
        {
            return Ok(vec![*addr]);
        }
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| {
                io::Error::other(DialError::UnknownHost {
                    host: host.to_owned(),
                    source,
                })
            })?
            .collect();
        let permitted: Vec<SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|a| self.policy.permits(*a))
            .collect();
        if permitted.is_empty() && !resolved.is_empty() {
            return Err(io::Error::other(DialError::Forbidden {
                host: host.to_owned(),
                addrs: resolved
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }));
        }
        Ok(permitted)
    }

    async fn dial(&self, host: &str, addrs: &[SocketAddr]) -> io::Result<TcpStream> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting to {host} ({addr}) timed out"),
                    )
                }
            }
        }
        Err(last)
    }
}

/// Clients for upstream registries: one over DNS, and one per original destination a redirected
/// connection brought (bounded; idle ones are dropped with their pools).
#[derive(Clone)]
pub(crate) struct UpstreamClients {
    dns: HttpClient,
    connector: Connector,
    pinned: moka::sync::Cache<(Arc<str>, SocketAddr), HttpClient>,
}

/// Original destinations whose clients (and pooled connections) are kept.
const PINNED_CLIENTS: u64 = 256;

impl UpstreamClients {
    pub(crate) fn new(connector: Connector) -> Self {
        Self {
            dns: build(connector.clone()),
            connector,
            pinned: moka::sync::Cache::builder()
                .max_capacity(PINNED_CLIENTS)
                .time_to_idle(Duration::from_secs(300))
                .build(),
        }
    }

    /// The client for `host`, dialled at `addr` when the request came on a redirected connection
    /// (its original destination), through DNS otherwise.
    pub(crate) fn for_origin(&self, host: &str, addr: Option<SocketAddr>) -> HttpClient {
        match addr {
            None => self.dns.clone(),
            Some(addr) => self.pinned.get_with((Arc::from(host), addr), || {
                build(self.connector.pinned(host, addr))
            }),
        }
    }

    /// The client for names pullproxy resolves itself (redirect targets, token realms).
    pub(crate) fn dns(&self) -> &HttpClient {
        &self.dns
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await.map(TokioIo::new) })
    }
}

/// A dialled connection: plain TCP or TLS over it.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(_) => Connected::new(),
            Stream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            Stream::Tls(_) => Connected::new(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The pooled client over `connector`.
pub(crate) fn build(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(32)
        .build(connector)
}

/// An empty request or response body.
pub(crate) fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body holding `bytes`.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

use http_body_util::BodyExt as _;

/// A body that fails when no frame arrives for `idle`: blobs have no total deadline, but a stalled
/// upstream must not hang a pull forever.
pub(crate) struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<B> IdleTimeout<B> {
    pub(crate) fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no data for {:?}", this.idle),
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client TLS configuration that trusts no certificate: for tests whose servers speak plain
/// HTTP, or must not be trusted.
#[cfg(test)]
pub(crate) fn trusting_nothing() -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(crate::node_ca::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remote_policy_keeps_pullproxy_out_of_the_node() {
        let remote = AddressPolicy::Remote { admin_port: 15090 };
        for denied in [
            "127.0.0.1:443",
            "127.9.9.9:5000",
            "[::1]:443",
            "169.254.169.254:80",
            "[fe80::1]:443",
            "0.0.0.0:443",
            "[::]:443",
            "224.0.0.1:443",
            "255.255.255.255:443",
            "[::ffff:127.0.0.1]:443",
            "[::ffff:169.254.169.254]:80",
            "10.0.0.5:15090",
        ] {
            assert!(!remote.permits(denied.parse().unwrap()), "{denied}");
            assert!(
                AddressPolicy::Any.permits(denied.parse().unwrap()),
                "{denied}"
            );
        }
        for allowed in [
            "10.0.0.5:443",
            "192.168.1.2:5000",
            "[2001:db8::1]:443",
            "8.8.8.8:443",
        ] {
            assert!(remote.permits(allowed.parse().unwrap()), "{allowed}");
        }
    }

    #[tokio::test]
    async fn unresolvable_and_forbidden_names_are_told_apart() {
        let c = Connector::new(
            trusting_nothing(),
            AddressPolicy::Remote { admin_port: 15090 },
            Duration::from_secs(1),
        );
        let err = c.addresses("localhost", 443).await.unwrap_err();
        assert!(
            matches!(DialError::find(&err), Some(DialError::Forbidden { .. })),
            "{err}"
        );
        let err = c.addresses("no-such-host.invalid", 443).await.unwrap_err();
        assert!(
            matches!(DialError::find(&err), Some(DialError::UnknownHost { .. })),
            "{err}"
        );
        // A pinned address is dialled as it is: the runtime itself chose it.
        let pinned = c.pinned("registry-1.docker.io", "10.0.0.1:443".parse().unwrap());
        assert_eq!(
            pinned.addresses("registry-1.docker.io", 443).await.unwrap(),
            vec!["10.0.0.1:443".parse::<SocketAddr>().unwrap()]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_times_out() {
        let (_tx, body) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        let mut body = IdleTimeout::new(body, Duration::from_secs(5));
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("no data"), "{err}");
    }
}
