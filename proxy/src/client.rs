//! Outbound HTTP for the hub and upstream registries: one pooled hyper client (HTTP/1.1, or h2
//! when ALPN picks it) over verified rustls. Registry hosts are dialled at the address the
//! container runtime itself dialled (learned from the kernel record on accept), so pullproxy never
//! resolves a registry name differently from the runtime; other hosts (CDN redirects, the hub)
//! go through DNS.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock},
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
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of outbound requests and of every response pullproxy sends.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// The pooled client.
pub type HttpClient = Client<Connector, ProxyBody>;

/// Where registry hosts live: `host` -> the original destination last seen for it.
#[derive(Clone, Default)]
pub struct KnownAddrs(Arc<RwLock<HashMap<String, SocketAddr>>>);

impl KnownAddrs {
    /// Remembers that a runtime dialled `addr` for `host`.
    pub fn learn(&self, host: &str, addr: SocketAddr) {
        let known = self.0.read().expect("known addrs").get(host) == Some(&addr);
        if !known {
            self.0
                .write()
                .expect("known addrs")
                .insert(host.to_owned(), addr);
        }
    }

    /// The learned address of `host` on `port`, if any.
    pub fn get(&self, host: &str, port: u16) -> Option<SocketAddr> {
        self.0
            .read()
            .expect("known addrs")
            .get(host)
            .filter(|a| a.port() == port)
            .copied()
    }
}

/// Dials TCP (learned address or DNS) and TLS for `https` URIs.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    known: KnownAddrs,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(
        tls: Arc<rustls::ClientConfig>,
        known: KnownAddrs,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            tls: TlsConnector::from(tls),
            known,
            connect_timeout,
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
        let addrs: Vec<SocketAddr> = match self.known.get(&host, port) {
            Some(a) => vec![a],
            None => tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect(),
        };
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
pub enum Stream {
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
pub fn build(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(32)
        .build(connector)
}

/// An empty request or response body.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

use http_body_util::BodyExt as _;

/// A body that fails when no frame arrives for `idle`: blobs have no total deadline, but a stalled
/// upstream must not hang a pull forever.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_addresses_are_per_host_and_port() {
        let known = KnownAddrs::default();
        known.learn("registry-1.docker.io", "10.0.0.1:443".parse().unwrap());
        assert_eq!(
            known.get("registry-1.docker.io", 443),
            Some("10.0.0.1:443".parse().unwrap())
        );
        assert_eq!(known.get("registry-1.docker.io", 80), None);
        assert_eq!(known.get("quay.io", 443), None);
        known.learn("registry-1.docker.io", "10.0.0.2:443".parse().unwrap());
        assert_eq!(
            known.get("registry-1.docker.io", 443),
            Some("10.0.0.2:443".parse().unwrap())
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
