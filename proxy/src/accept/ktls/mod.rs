//! Kernel TLS (kTLS) for terminated connections: rustls does the handshake, then the kernel gets
//! the traffic keys and does the record layer, so a cached blob goes from the page cache to the
//! socket with `sendfile`, encrypted once by the kernel and never copied through user space.
//!
//! How: rustls' own `kernel` API. The handshake runs on rustls' unbuffered connection, reading
//! whole records only, and ends as a `KernelConnection` that derives the next keys when the
//! client sends a KeyUpdate; the kernel gets each direction's keys with `setsockopt`. The `ktls`
//! crate (rustls org) was the alternative; it builds on `dangerous_extract_secrets`, which cannot
//! derive keys after a KeyUpdate, and wraps the socket in a stream of its own where this module
//! needs `recvmsg` control records and `sendfile` on the same socket.
//!
//! Which connections: TLS 1.3 with an AEAD the kernel takes (found by a probe at start) and
//! HTTP/1.1, decided from the ClientHello before the handshake (a connection cannot change sides
//! after it: the keys are handed over or they are not). HTTP/2 keeps user-space TLS: its frames
//! interleave streams, so a body cannot be one `sendfile`. Every other connection, and every
//! connection on a kernel without `tls` (the module missing, or `listen.kernel_tls: false`), is
//! served as before; that is counted in `pullproxy_tls_kernel_offload_total` and logged once at
//! start, never per connection.

mod handshake;
mod stream;
mod sys;

use std::{net::Ipv4Addr, sync::Arc};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tracing::info;

use self::sys::{CryptoInfo, Direction};
pub(crate) use self::{stream::KtlsStream, sys::Cipher};
use crate::{
    accept::client_hello::TlsOffer,
    node_ca::{LeafMinter, mint},
};

/// The start-up line when kernel TLS is in use (with a `ciphers` field).
pub const LOG_IN_USE: &str = "kernel TLS is available: HTTP/1.1 TLS 1.3 connections hand their \
                              keys to the kernel and cache hits go out with sendfile";
/// The start-up line when the kernel has no `tls` (with a `reason` field).
pub const LOG_UNAVAILABLE: &str = "kernel TLS is not available: TLS stays in user space";
/// The start-up line when `listen.kernel_tls` is false.
pub const LOG_OFF: &str = "kernel TLS is off (listen.kernel_tls: false): TLS stays in user space";

/// Why a terminated connection keeps TLS in user space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// `listen.kernel_tls` is false.
    Disabled,
    /// The kernel has no `tls` (or takes none of the ciphers): see the start-up log line.
    Unavailable,
    /// The client does not offer TLS 1.3.
    Tls12,
    /// The client offers no TLS 1.3 cipher suite the kernel takes.
    Cipher,
    /// The client offers HTTP/2, which pullproxy prefers and serves in user space.
    Http2,
    /// The client offers ALPN protocols, none of them HTTP/1.1.
    Alpn,
}

impl Fallback {
    const ALL: [Fallback; 6] = [
        Fallback::Disabled,
        Fallback::Unavailable,
        Fallback::Tls12,
        Fallback::Cipher,
        Fallback::Http2,
        Fallback::Alpn,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Fallback::Disabled => "disabled",
            Fallback::Unavailable => "unavailable",
            Fallback::Tls12 => "tls12",
            Fallback::Cipher => "cipher",
            Fallback::Http2 => "http2",
            Fallback::Alpn => "alpn",
        }
    }
}

/// Where a connection's TLS is done.
#[derive(Clone)]
pub(crate) enum Route {
    /// The kernel, after a handshake with this configuration.
    Kernel(Arc<ServerConfig>),
    /// rustls in user space, for this reason (counted where it is decided).
    User(
        #[cfg_attr(
            not(test),
            expect(
                dead_code,
                reason = "production counts the reason in route(); tests read it"
            )
        )]
        Fallback,
    ),
}

/// Whether a client's offer can go to the kernel, given the ciphers the kernel takes (in
/// pullproxy's order of preference); the cipher the handshake will pick.
pub(crate) fn choose(kernel: &[Cipher], offer: &TlsOffer) -> Result<Cipher, Fallback> {
    if !offer.tls13 {
        return Err(Fallback::Tls12);
    }
    let cipher = kernel
        .iter()
        .copied()
        .find(|c| offer.suites.contains(&u16::from(c.tls13_suite())))
        .ok_or(Fallback::Cipher)?;
    if offer.alpn.iter().any(|p| p == b"h2") {
        return Err(Fallback::Http2);
    }
    if !offer.alpn.is_empty() && !offer.alpn.iter().any(|p| p == b"http/1.1") {
        return Err(Fallback::Alpn);
    }
    Ok(cipher)
}

/// Kernel TLS's counters.
#[derive(Debug, Default)]
pub(crate) struct KtlsMetrics {
    offload: Family<[(&'static str, &'static str); 1], Counter>,
    sendfile_bytes: Counter,
    key_updates: Family<[(&'static str, &'static str); 1], Counter>,
}

impl KtlsMetrics {
    fn offload(&self, outcome: &'static str) {
        self.offload.get_or_create(&[("outcome", outcome)]).inc();
    }

    fn key_update(&self, outcome: &'static str) {
        self.key_updates
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }
}

/// Errors of the kernel TLS path.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The handshake failed (the client's doing, or a timeout's): as with user-space TLS.
    #[error("TLS handshake")]
    Handshake(#[source] std::io::Error),
    #[error("the kernel has no layout for the negotiated {what}")]
    NoLayout { what: &'static str },
    #[error("handing the TLS {direction} keys to the kernel")]
    Keys {
        direction: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("probing the kernel's tls on loopback")]
    Probe(#[source] std::io::Error),
    #[error("the kernel has no tls module (`modprobe tls` loads it where the kernel has one)")]
    NoModule,
    #[error(
        "the kernel's tls takes none of AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 for TLS 1.3"
    )]
    NoCipher,
}

/// The kernel TLS path of the proxy listener: whether it is on, the handshake configuration
/// for it, and its metrics.
pub(crate) struct KernelTls {
    /// Ciphers the kernel takes, in order of preference; empty when kernel TLS is not in use.
    ciphers: Vec<Cipher>,
    /// Why nothing goes to the kernel, when that is so.
    off: Option<Fallback>,
    config: Option<Arc<ServerConfig>>,
    metrics: Arc<KtlsMetrics>,
}

impl KernelTls {
    /// Kernel TLS as configured (`enabled`) and as this kernel allows it, probed now; says which
    /// in one log line. `user` is the user-space configuration, whose session cache is shared.
    pub(crate) fn new(enabled: bool, minter: Arc<LeafMinter>, user: &ServerConfig) -> Self {
        let metrics = Arc::new(KtlsMetrics::default());
        // Every series exists from the start at 0.
        for outcome in ["kernel", "failed"]
            .into_iter()
            .chain(Fallback::ALL.map(Fallback::label))
        {
            let _ = metrics.offload.get_or_create(&[("outcome", outcome)]);
        }
        for outcome in ["rekeyed", "unsupported"] {
            let _ = metrics.key_updates.get_or_create(&[("outcome", outcome)]);
        }
        if !enabled {
            info!("{LOG_OFF}");
            return Self::without(Fallback::Disabled, metrics);
        }
        match probe() {
            Ok(ciphers) => {
                let names: Vec<&str> = ciphers.iter().map(|c| c.label()).collect();
                info!(ciphers = %names.join(","), "{LOG_IN_USE}");
                Self {
                    config: Some(kernel_server_config(minter, &ciphers, Some(user))),
                    ciphers,
                    off: None,
                    metrics,
                }
            }
            Err(e) => {
                info!(reason = %crate::telemetry::error_chain(&e), "{LOG_UNAVAILABLE}");
                Self::without(Fallback::Unavailable, metrics)
            }
        }
    }

    fn without(why: Fallback, metrics: Arc<KtlsMetrics>) -> Self {
        Self {
            ciphers: Vec::new(),
            off: Some(why),
            config: None,
            metrics,
        }
    }

    #[cfg(test)]
    /// Kernel TLS off, for tests of everything else.
    pub(crate) fn disabled() -> Self {
        Self::without(Fallback::Disabled, Arc::default())
    }

    /// Where the TLS of a client that sent `offer` is done; a fallback is counted.
    pub(crate) fn route(&self, offer: &TlsOffer) -> Route {
        let decision = match (&self.config, self.off) {
            (Some(config), None) => choose(&self.ciphers, offer).map(|_| config.clone()),
            (_, why) => Err(why.unwrap_or(Fallback::Unavailable)),
        };
        match decision {
            Ok(config) => Route::Kernel(config),
            Err(why) => {
                self.metrics.offload(why.label());
                Route::User(why)
            }
        }
    }

    /// Completes the handshake on `stream` with `config` (from [`KernelTls::route`]) and hands
    /// the keys to the kernel.
    pub(crate) async fn accept(
        &self,
        mut stream: TcpStream,
        config: Arc<ServerConfig>,
    ) -> Result<KtlsStream, KtlsError> {
        let done = handshake::accept(&mut stream, config)
            .await
            .map_err(KtlsError::Handshake)?;
        let installed = install(&stream, &done.secrets);
        self.metrics.offload(if installed.is_ok() {
            "kernel"
        } else {
            "failed"
        });
        installed?;
        Ok(KtlsStream::new(stream, done.conn, self.metrics.clone()))
    }

    /// Registers the metrics (names get the registry's `pullproxy_` prefix).
    pub(crate) fn register(&self, reg: &mut Registry) {
        reg.register(
            "tls_kernel_offload",
            "Terminated TLS connections by where their record layer ran: kernel (kTLS), failed \
             (the kernel refused the keys; the connection was closed), or why it stayed in user \
             space: disabled (listen.kernel_tls), unavailable (no kernel tls), tls12, cipher (no \
             TLS 1.3 suite the kernel takes), http2, alpn (no HTTP/1.1 offered)",
            self.metrics.offload.clone(),
        );
        reg.register(
            "tls_kernel_sendfile_bytes",
            "Response body bytes sent from cache files with sendfile on kernel TLS connections",
            self.metrics.sendfile_bytes.clone(),
        );
        reg.register(
            "tls_kernel_key_updates",
            "TLS 1.3 KeyUpdates from clients on kernel TLS connections: rekeyed, or unsupported \
             (the kernel cannot take new keys before Linux 6.14; the connection was closed)",
            self.metrics.key_updates.clone(),
        );
    }
}

/// The server side of connections whose record layer goes to the kernel: TLS 1.3 only, the
/// kernel's `ciphers` in their order, HTTP/1.1, and secret extraction allowed. Session tickets
/// are shared with `user` (the user-space configuration), so a client resumes whichever side
/// its last connection was on.
pub(crate) fn kernel_server_config(
    minter: Arc<LeafMinter>,
    ciphers: &[Cipher],
    user: Option<&ServerConfig>,
) -> Arc<ServerConfig> {
    let mut provider = mint::server_provider();
    provider.cipher_suites.retain(|s| {
        s.version() == &rustls::version::TLS13
            && ciphers.iter().any(|c| c.tls13_suite() == s.suite())
    });
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the aws-lc-rs provider supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(minter);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    config.enable_secret_extraction = true;
    if let Some(user) = user {
        config.session_storage = user.session_storage.clone();
    }
    Arc::new(config)
}

/// Hands both directions' keys to the kernel.
fn install(stream: &TcpStream, secrets: &rustls::ExtractedSecrets) -> Result<(), KtlsError> {
    let tx = CryptoInfo::tls13(&secrets.tx.1, secrets.tx.0)
        .ok_or(KtlsError::NoLayout { what: "cipher" })?;
    let rx = CryptoInfo::tls13(&secrets.rx.1, secrets.rx.0)
        .ok_or(KtlsError::NoLayout { what: "cipher" })?;
    let keys = |direction| move |source| KtlsError::Keys { direction, source };
    sys::set_ulp(stream).map_err(keys("upper-layer protocol"))?;
    sys::set_crypto(stream, Direction::Transmit, &tx).map_err(keys("transmit"))?;
    sys::set_crypto(stream, Direction::Receive, &rx).map_err(keys("receive"))?;
    Ok(())
}

/// Which ciphers this kernel's `tls` takes for TLS 1.3, both directions, found on throw-away
/// loopback connections.
pub fn probe() -> Result<Vec<Cipher>, KtlsError> {
    let listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(KtlsError::Probe)?;
    let addr = listener.local_addr().map_err(KtlsError::Probe)?;
    let mut ciphers = Vec::new();
    for cipher in Cipher::ALL {
        let socket = std::net::TcpStream::connect(addr).map_err(KtlsError::Probe)?;
        let _peer = listener.accept().map_err(KtlsError::Probe)?;
        match sys::set_ulp(&socket) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(KtlsError::NoModule),
            Err(e) => return Err(KtlsError::Probe(e)),
        }
        let key = vec![0u8; cipher.key_len()];
        let info = CryptoInfo::from_parts(cipher, &key, &[0; 12], 0)
            .ok_or(KtlsError::NoLayout { what: "probe key" })?;
        if sys::set_crypto(&socket, Direction::Transmit, &info).is_ok()
            && sys::set_crypto(&socket, Direction::Receive, &info).is_ok()
        {
            ciphers.push(cipher);
        }
    }
    if ciphers.is_empty() {
        return Err(KtlsError::NoCipher);
    }
    Ok(ciphers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(tls13: bool, suites: &[u16], alpn: &[&[u8]]) -> TlsOffer {
        TlsOffer {
            tls13,
            suites: suites.to_vec(),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        }
    }

    #[test]
    fn only_tls13_http11_with_a_kernel_cipher_goes_to_the_kernel() {
        let all = Cipher::ALL;
        let go = |o: &TlsOffer| choose(&all, o);
        // A Go client (containerd): HTTP/1.1 only, AES-128 first.
        let go_client = offer(true, &[0x1301, 0x1302, 0x1303, 0xc02f], &[b"http/1.1"]);
        assert_eq!(go(&go_client), Ok(Cipher::Aes128Gcm));
        // No ALPN at all: HTTP/1.1.
        assert_eq!(go(&offer(true, &[0x1302], &[])), Ok(Cipher::Aes256Gcm));
        // pullproxy's order wins over the client's.
        assert_eq!(
            go(&offer(true, &[0x1303, 0x1302, 0x1301], &[])),
            Ok(Cipher::Aes128Gcm)
        );
        assert_eq!(go(&offer(false, &[0xc02f], &[])), Err(Fallback::Tls12));
        assert_eq!(
            go(&offer(true, &[0x1304, 0xc02f], &[])),
            Err(Fallback::Cipher)
        );
        assert_eq!(
            go(&offer(true, &[0x1301], &[b"h2", b"http/1.1"])),
            Err(Fallback::Http2)
        );
        assert_eq!(
            go(&offer(true, &[0x1301], &[b"acme-tls/1"])),
            Err(Fallback::Alpn)
        );
        // A kernel without AES-256 takes an AES-256-only client to user space.
        assert_eq!(
            choose(&[Cipher::Aes128Gcm], &offer(true, &[0x1302], &[])),
            Err(Fallback::Cipher)
        );
    }

    #[test]
    fn without_kernel_tls_every_connection_stays_in_user_space_and_is_counted() {
        let ktls = KernelTls::disabled();
        let route = ktls.route(&offer(true, &[0x1301], &[b"http/1.1"]));
        assert!(matches!(route, Route::User(Fallback::Disabled)));
        let mut reg = Registry::with_prefix("pullproxy");
        ktls.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(r#"pullproxy_tls_kernel_offload_total{outcome="disabled"} 1"#),
            "{text}"
        );
    }

    /// On this kernel: either the probe finds ciphers (and AES-GCM among them), or it says why
    /// not. The development host has no `tls` module: the fallback path is what runs there.
    #[test]
    fn the_probe_answers_either_way() {
        match probe() {
            Ok(ciphers) => assert!(ciphers.contains(&Cipher::Aes128Gcm), "{ciphers:?}"),
            Err(e) => {
                let has_module = std::fs::read_to_string("/proc/modules")
                    .is_ok_and(|m| m.lines().any(|l| l.starts_with("tls ")));
                assert!(
                    matches!(e, KtlsError::NoModule) || has_module,
                    "probe failed with the module loaded: {e:?}"
                );
            }
        }
    }
}
