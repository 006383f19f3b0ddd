//! Leaf certificates for intercepted server names, minted by the node CA on first use and cached,
//! and the rustls server configuration that serves them.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use moka::{Expiry, sync::Cache};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::{debug, warn};

use super::{
    ca::{CaError, NodeCa},
    hosts::InterceptSet,
};

/// Errors of minting a leaf for a server name.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MintError {
    #[error("{host} is not an intercepted host")]
    NotIntercepted { host: String },
    #[error("too many new server names to mint for; try again shortly")]
    MintRateLimited,
    #[error("minting a certificate for {host}")]
    Mint {
        host: String,
        #[source]
        source: Arc<MintError>,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// Validity of a minted leaf (capped at the CA's own expiry). Short, so a leaked leaf key is
/// useful only briefly; minting is cheap.
pub(crate) const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a minted leaf is served before a fresh one is minted; well inside its validity, so
/// no client ever sees a leaf near expiry.
pub(crate) const LEAF_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Distinct server names kept; with `"*"` the set of names is open-ended.
const LEAF_CACHE_CAPACITY: u64 = 10_000;
/// Leaves minted at once before the rate limit applies: a node pulling from many registries at
/// start needs a burst.
const MINT_BURST: u32 = 64;
/// Leaves minted per second after a burst. Names under a wildcard (or `"*"`) are open-ended, and
/// each costs a key pair and a signature: a local process making up names must not be able to
/// keep pullproxy busy minting. Over the limit a connection is spliced (it still works, directly).
const MINT_PER_SECOND: u32 = 8;

/// A token bucket for mints.
struct MintBudget {
    capacity: u32,
    per_second: u32,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl MintBudget {
    fn new(capacity: u32, per_second: u32) -> Self {
        Self {
            capacity,
            per_second,
            state: std::sync::Mutex::new((f64::from(capacity), Instant::now())),
        }
    }

    /// Takes one token if there is one.
    fn take(&self) -> bool {
        let mut state = self.state.lock().expect("mint budget lock");
        let (tokens, since) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*since).as_secs_f64() * f64::from(self.per_second))
            .min(f64::from(self.capacity));
        *since = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Clone)]
struct CachedLeaf {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// Expires a cached leaf after [`LEAF_CACHE_TTL`], or halfway to its own expiry when the CA's
/// expiry cut its validity short.
struct LeafExpiry;

impl Expiry<String, CachedLeaf> for LeafExpiry {
    fn expire_after_create(
        &self,
        _server_name: &String,
        leaf: &CachedLeaf,
        _created_at: Instant,
    ) -> Option<Duration> {
        let remaining = leaf
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Some(LEAF_CACHE_TTL.min(remaining / 2))
    }
}

/// Serves a leaf certificate for every intercepted server name, minting it on first use.
pub(crate) struct LeafMinter {
    ca: Arc<NodeCa>,
    hosts: Arc<InterceptSet>,
    leaves: Cache<String, CachedLeaf>,
    budget: MintBudget,
    minted: AtomicU64,
    failures: AtomicU64,
    limited: AtomicU64,
}

impl std::fmt::Debug for LeafMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafMinter")
            .field("ca", &self.ca)
            .field("cached", &self.leaves.entry_count())
            .field("minted", &self.minted())
            .finish_non_exhaustive()
    }
}

impl LeafMinter {
    /// A minter for the names in `hosts`, signing with `ca`.
    pub(crate) fn new(ca: Arc<NodeCa>, hosts: Arc<InterceptSet>) -> Self {
        Self::with_budget(ca, hosts, MintBudget::new(MINT_BURST, MINT_PER_SECOND))
    }

    fn with_budget(ca: Arc<NodeCa>, hosts: Arc<InterceptSet>, budget: MintBudget) -> Self {
        Self {
            ca,
            hosts,
            leaves: Cache::builder()
                .max_capacity(LEAF_CACHE_CAPACITY)
                .expire_after(LeafExpiry)
                .build(),
            budget,
            minted: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            limited: AtomicU64::new(0),
        }
    }

    /// The bounded label for `server_name` in metrics: the name or wildcard pattern it was
    /// intercepted by (never the open-ended name itself), or `other`.
    pub(crate) fn label(&self, server_name: &str) -> String {
        self.hosts.label(server_name)
    }

    /// Whether TLS for `server_name` is terminated (the rest is spliced).
    pub(crate) fn intercepts(&self, server_name: &str) -> bool {
        self.hosts.contains(server_name)
    }

    /// The leaf for `server_name`, minted now or taken from the cache. Concurrent first requests
    /// for one name mint once.
    ///
    /// The server can call this before accepting, and splice the connection instead when it
    /// fails (an operator CA that does not cover the name), rather than fail the handshake.
    pub(crate) fn certified_key(&self, server_name: &str) -> Result<Arc<CertifiedKey>, MintError> {
        let name = server_name
            .strip_suffix('.')
            .unwrap_or(server_name)
            .to_ascii_lowercase();
        if !self.hosts.contains(&name) {
            return Err(MintError::NotIntercepted { host: name });
        }
        self.leaves
            .try_get_with(name.clone(), || {
                if !self.budget.take() {
                    self.limited.fetch_add(1, Ordering::Relaxed);
                    return Err(MintError::MintRateLimited);
                }
                let leaf = self.ca.mint_leaf(&name, LEAF_VALIDITY);
                match &leaf {
                    Ok(_) => {
                        self.minted.fetch_add(1, Ordering::Relaxed);
                        debug!(server_name = %name, "minted a leaf certificate");
                    }
                    Err(_) => {
                        self.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                leaf.map(|leaf| CachedLeaf {
                    key: Arc::new(leaf.certified_key),
                    not_after: leaf.not_after,
                })
                .map_err(MintError::from)
            })
            .map(|leaf| leaf.key)
            .map_err(|source| MintError::Mint { host: name, source })
    }

    /// Leaf certificates minted since start (`pullproxy_tls_certificates_minted_total`).
    pub(crate) fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    /// Mint attempts that failed since start.
    pub(crate) fn mint_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Mints refused by the rate limit since start.
    pub(crate) fn mints_limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }
}

impl ResolvesServerCert for LeafMinter {
    /// A guard as much as a resolver: the server splices names outside the set before any
    /// handshake, so reaching here without SNI or with another name aborts the handshake.
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = client_hello.server_name() else {
            debug!("tls handshake without a server name; no certificate");
            return None;
        };
        match self.certified_key(name) {
            Ok(key) => Some(key),
            Err(MintError::NotIntercepted { host }) => {
                debug!(server_name = %host, "not an intercepted host; no certificate");
                None
            }
            Err(e) => {
                warn!(error = %e, "no certificate for an intercepted host");
                None
            }
        }
    }
}

/// The aws-lc-rs provider with the cipher suites in pullproxy's order: TLS 1.3 before 1.2, and
/// within each AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305. AES-128 does 10 rounds
/// where AES-256 does 14: about 30 % less AES work per byte, on both ends, for a strength no
/// registry pull needs more of; clients that offer it get it whatever order they list it in
/// (most list AES-256 first).
pub(crate) fn server_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = (*super::crypto_provider()).clone();
    let rank = |s: &rustls::SupportedCipherSuite| {
        let aead = match s.suite() {
            S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            S::TLS13_AES_256_GCM_SHA384
            | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        };
        (s.version() != &rustls::version::TLS13, aead)
    };
    // Stable: the provider's own order stays within a rank (ECDSA before RSA for TLS 1.2).
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// The server side of terminated connections in user space: certificates from `minter`, TLS 1.2
/// and 1.3, the cipher suite chosen in [`server_provider`]'s order, ALPN `h2` then `http/1.1` (a
/// client that offers no ALPN gets HTTP/1.1).
pub(crate) fn server_config(minter: Arc<LeafMinter>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(server_provider()))
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(minter);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    Arc::new(config)
}

/// Reports the minting counters on each scrape.
#[derive(Debug)]
struct MintCollector(Arc<LeafMinter>);

impl prometheus_client::collector::Collector for MintCollector {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::telemetry::encode_counter;
        encode_counter(
            &mut e,
            "tls_certificates_minted",
            "Leaf certificates minted by the node CA for intercepted registry hosts",
            self.0.minted(),
        )?;
        encode_counter(
            &mut e,
            "tls_mint_failures",
            "Intercepted hosts the node CA could not mint for (connections were spliced)",
            self.0.mint_failures(),
        )?;
        encode_counter(
            &mut e,
            "tls_mints_rate_limited",
            "New server names not minted for because of the mint rate limit (connections were \
             spliced)",
            self.0.mints_limited(),
        )
    }
}

/// Registers the minting metrics (names get the registry's `pullproxy_` prefix).
pub(crate) fn register(reg: &mut prometheus_client::registry::Registry, minter: Arc<LeafMinter>) {
    reg.register_collector(Box::new(MintCollector(minter)));
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, path::Path};

    use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
    use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
    use rustls_pki_types::PrivateKeyDer;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::node_ca::{TlsSettings, crypto_provider};

    fn node_ca(dir: &Path, extra_hosts: &[&str]) -> (Arc<NodeCa>, Arc<InterceptSet>) {
        let mut settings = TlsSettings::new(dir);
        settings.intercept_hosts = extra_hosts.iter().map(|h| (*h).to_owned()).collect();
        let hosts = settings.intercept_set().unwrap();
        let (ca, _) = NodeCa::load_or_generate(&settings, &hosts).unwrap();
        (Arc::new(ca), Arc::new(hosts))
    }

    #[test]
    fn made_up_names_cannot_keep_the_minter_busy() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, hosts) = node_ca(dir.path(), &["*.example.com"]);
        // No refill: the count is exact however slow the machine is.
        let minter = LeafMinter::with_budget(ca, hosts, MintBudget::new(3, 0));
        for i in 0..3 {
            minter
                .certified_key(&format!("n{i}.example.com"))
                .expect("within the burst");
        }
        let err = minter.certified_key("n3.example.com").unwrap_err();
        assert!(
            matches!(&err, MintError::Mint { source, .. } if matches!(**source, MintError::MintRateLimited)),
            "{err}"
        );
        assert_eq!((minter.minted(), minter.mints_limited()), (3, 1));
        // Names already minted are still served: the limit is on new leaves only.
        minter.certified_key("n0.example.com").unwrap();
        // Labels stay bounded: the pattern, not the made-up name.
        assert_eq!(minter.label("n7.Example.com."), "*.example.com");
        assert_eq!(minter.label("quay.io"), "quay.io");
        assert_eq!(minter.label("elsewhere.test"), "other");
    }

    #[test]
    fn the_budget_refills_over_time() {
        let b = MintBudget::new(1, 1000);
        assert!(b.take());
        std::thread::sleep(Duration::from_millis(20));
        assert!(b.take(), "20 ms at 1000/s refill at least one token");
    }

    /// A client that trusts exactly `ca`, as a runtime does once the CA is installed.
    fn client_trusting(ca: &NodeCa) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }

    /// One TLS handshake over loopback plus a byte each way; returns the client's view.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: ClientConfig,
        name: ServerName<'static>,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = TlsAcceptor::from(server).accept(tcp).await {
                let mut byte = [0u8; 1];
                if tls.read_exact(&mut byte).await.is_ok() {
                    let _ = tls.write_all(&byte).await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let result = async {
            let mut tls = TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await?;
            tls.write_all(b"x").await?;
            let mut echo = [0u8; 1];
            tls.read_exact(&mut echo).await?;
            assert_eq!(&echo, b"x");
            Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
        .await;
        server_task.await.unwrap();
        result
    }

    fn dns(name: &str) -> ServerName<'static> {
        ServerName::try_from(name.to_owned()).unwrap()
    }

    /// A server that presents exactly `cert`, signed by the CA outside the minter.
    fn fixed_server(ca: &NodeCa, san: SanType) -> Arc<ServerConfig> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![san];
        params.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(60);
        params.not_after = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
        let cert = ca.sign_unchecked(&params, &key);
        let config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert, ca.cert_der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        Arc::new(config)
    }

    #[test]
    fn minted_leaves_are_cached_counted_and_limited_to_the_set() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, hosts) = node_ca(dir.path(), &[]);
        let minter = LeafMinter::new(ca, hosts);
        let first = minter.certified_key("registry-1.docker.io").unwrap();
        let again = minter.certified_key("Registry-1.Docker.IO.").unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "a repeated name is served from the cache"
        );
        assert_eq!(minter.minted(), 1);
        minter.certified_key("quay.io").unwrap();
        assert_eq!(minter.minted(), 2);

        for outside in ["github.com", "auth.docker.io", "pkg.dev"] {
            let err = minter.certified_key(outside).unwrap_err();
            assert!(
                matches!(err, MintError::NotIntercepted { .. }),
                "{outside}: {err}"
            );
        }
        assert_eq!(minter.minted(), 2);
        assert_eq!(minter.mint_failures(), 0);
    }

    #[test]
    fn leaves_are_short_lived_and_never_outlive_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = node_ca(dir.path(), &[]);
        let leaf = ca.mint_leaf("ghcr.io", LEAF_VALIDITY).unwrap();
        let left = leaf.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left <= LEAF_VALIDITY && left > LEAF_VALIDITY - Duration::from_secs(60));
        let long = ca
            .mint_leaf("ghcr.io", Duration::from_secs(100 * 365 * 24 * 3600))
            .unwrap();
        assert!(long.not_after <= ca.not_after());
    }

    #[tokio::test]
    async fn a_client_trusting_the_ca_accepts_minted_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, hosts) = node_ca(dir.path(), &["harbor.example.com"]);
        let minter = Arc::new(LeafMinter::new(ca.clone(), hosts));
        let server = server_config(minter.clone());
        for name in [
            "registry-1.docker.io",
            "harbor.example.com",
            "us-docker.pkg.dev",
        ] {
            let alpn = handshake(server.clone(), client_trusting(&ca), dns(name))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        }
        assert_eq!(minter.minted(), 3);

        // Outside the set: no certificate, the handshake fails.
        let err = handshake(server, client_trusting(&ca), dns("github.com"))
            .await
            .unwrap_err();
        assert!(!err.to_string().is_empty());
        assert_eq!(minter.minted(), 3);
    }

    /// The suite a rustls client with its default preferences (AES-256 first) ends up with.
    async fn negotiated_suite(
        server: Arc<ServerConfig>,
        client: ClientConfig,
    ) -> rustls::CipherSuite {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
            tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(client))
            .connect(dns("quay.io"), tcp)
            .await
            .unwrap();
        let client_side = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(server_task.await.unwrap(), client_side);
        client_side
    }

    #[tokio::test]
    async fn aes_128_is_chosen_whenever_the_client_offers_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, hosts) = node_ca(dir.path(), &[]);
        let server = server_config(Arc::new(LeafMinter::new(ca.clone(), hosts)));
        // rustls clients list AES-256 first; so do OpenSSL's.
        let client = client_trusting(&ca);
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        assert_eq!(
            negotiated_suite(server.clone(), client).await,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // A TLS 1.2 client gets the TLS 1.2 AES-128 suite for the leaf's key.
        let tls12 = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates({
                let mut roots = RootCertStore::empty();
                roots.add(ca.cert_der().clone()).unwrap();
                roots
            })
            .with_no_client_auth();
        assert_eq!(
            negotiated_suite(server.clone(), tls12).await,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        );
        // Without AES-128 on offer, the next in pullproxy's order.
        let mut only256 = client_trusting(&ca);
        let mut provider = (**only256.crypto_provider()).clone();
        provider
            .cipher_suites
            .retain(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        only256 = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates({
                let mut roots = RootCertStore::empty();
                roots.add(ca.cert_der().clone()).unwrap();
                roots
            })
            .with_no_client_auth();
        assert_eq!(
            negotiated_suite(server, only256).await,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }

    #[tokio::test]
    async fn name_constraints_stop_a_misused_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = node_ca(dir.path(), &[]);

        // Control: a leaf signed the same way for a permitted name is accepted, so the failures
        // below can only come from the name.
        let ok = fixed_server(&ca, SanType::DnsName("quay.io".try_into().unwrap()));
        handshake(ok, client_trusting(&ca), dns("quay.io"))
            .await
            .expect("a permitted name verifies");

        for name in ["github.com", "auth.docker.io"] {
            let forged = fixed_server(&ca, SanType::DnsName(name.try_into().unwrap()));
            let err = handshake(forged, client_trusting(&ca), dns(name))
                .await
                .unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraintViolation"),
                "{name}: {err:?}"
            );
        }

        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let forged = fixed_server(&ca, SanType::IpAddress(ip));
        let err = handshake(
            forged,
            client_trusting(&ca),
            ServerName::IpAddress(ip.into()),
        )
        .await
        .unwrap_err();
        assert!(
            format!("{err:?}").contains("NameConstraintViolation"),
            "ip: {err:?}"
        );
    }

    #[tokio::test]
    async fn without_constraints_the_same_forgery_would_pass() {
        // The "*" CA has no constraints: this is what the constraints above protect against, and
        // proves the forged certificates are otherwise valid.
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = node_ca(dir.path(), &["*"]);
        assert!(ca.name_constraints().is_none());
        let forged = fixed_server(&ca, SanType::DnsName("github.com".try_into().unwrap()));
        handshake(forged, client_trusting(&ca), dns("github.com"))
            .await
            .expect("an unconstrained CA signs for anything");
    }
}
