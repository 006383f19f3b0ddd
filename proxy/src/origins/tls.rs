//! TLS towards the real registries: always verified, against the system roots plus configured
//! extra CAs, never against the node CA. There is deliberately no way to turn verification off.

use std::{path::PathBuf, sync::Arc};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::node_ca::{FileError, ca::NodeCa, crypto_provider};

/// Errors of setting up verified TLS towards upstream registries and the hub.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error(
        "no trusted roots for upstream connections: the system store is empty and no extra CA \
         file is configured"
    )]
    NoUpstreamRoots,
}

/// What went into the upstream trust roots; log it at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UpstreamRoots {
    /// Roots taken from the system store.
    pub(crate) system: usize,
    /// Roots taken from the configured extra CA files.
    pub(crate) extra: usize,
    /// Roots left out because they are the node CA (or an earlier generation of it).
    pub(crate) node_ca_skipped: usize,
    /// System store entries that could not be read or parsed (warnings, not fatal).
    pub(crate) problems: Vec<String>,
}

/// The client configuration for upstream registries: system roots (as `rustls-native-certs`
/// finds them, honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus every certificate in
/// `extra_ca_files` (PEM), minus the node CA.
///
/// The node CA is left out because it is installed into the very system store read here: trusting
/// it upstream would let a connection that loops back into pullproxy verify against pullproxy's
/// own leaves.
///
/// ALPN offers `h2` and `http/1.1`; the connector must look at the negotiated protocol and speak
/// HTTP/2 only when `h2` was selected (hyper-util: `Connected::negotiated_h2()`). A client that
/// only speaks HTTP/1.1 should clear `alpn_protocols` down to `http/1.1` on its copy.
pub(crate) fn upstream_client_config(
    extra_ca_files: &[PathBuf],
    node_ca: Option<&NodeCa>,
) -> Result<(Arc<ClientConfig>, UpstreamRoots), UpstreamTlsError> {
    let native = rustls_native_certs::load_native_certs();
    let problems = native.errors.iter().map(ToString::to_string).collect();
    build(native.certs, problems, extra_ca_files, node_ca)
}

fn build(
    system: Vec<CertificateDer<'static>>,
    problems: Vec<String>,
    extra_ca_files: &[PathBuf],
    node_ca: Option<&NodeCa>,
) -> Result<(Arc<ClientConfig>, UpstreamRoots), UpstreamTlsError> {
    let mut report = UpstreamRoots {
        problems,
        ..UpstreamRoots::default()
    };
    let node_ca = node_ca.map(NodeCaIdentity::of);
    let mut roots = RootCertStore::empty();

    for cert in system {
        if node_ca.as_ref().is_some_and(|id| id.matches(&cert)) {
            report.node_ca_skipped += 1;
            continue;
        }
        match roots.add(cert) {
            Ok(()) => report.system += 1,
            Err(e) => report.problems.push(format!("skipped a system root: {e}")),
        }
    }

    for path in extra_ca_files {
        let pem = std::fs::read(path).map_err(FileError::at("reading", path))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| UpstreamTlsError::Pem {
                path: path.clone(),
                message: format!("unreadable PEM: {e}"),
            })?;
        if certs.is_empty() {
            return Err(UpstreamTlsError::Pem {
                path: path.clone(),
                message: "no certificate in this extra upstream CA file".into(),
            });
        }
        for cert in certs {
            if node_ca.as_ref().is_some_and(|id| id.matches(&cert)) {
                report.node_ca_skipped += 1;
                continue;
            }
            // A configured file is a deliberate choice: a bad certificate in it is an error.
            roots.add(cert).map_err(|e| UpstreamTlsError::Pem {
                path: path.clone(),
                message: format!("not usable as a trust anchor: {e}"),
            })?;
            report.extra += 1;
        }
    }

    if roots.is_empty() {
        return Err(UpstreamTlsError::NoUpstreamRoots);
    }
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), report))
}

/// Recognises the node CA among roots: the same key, or the same subject (every generation of a
/// generated CA has the same subject, and an old one may linger in the store until reinstalled).
struct NodeCaIdentity {
    subject: Vec<u8>,
    spki: Vec<u8>,
}

impl NodeCaIdentity {
    fn of(ca: &NodeCa) -> Self {
        let (subject, spki) = names(ca.cert_der()).unwrap_or_default();
        Self { subject, spki }
    }

    fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        match names(cert) {
            Some((subject, spki)) => subject == self.subject || spki == self.spki,
            None => false,
        }
    }
}

/// The raw subject name and subject public key info of a certificate.
fn names(cert: &CertificateDer<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, x509) = X509Certificate::from_der(cert).ok()?;
    Some((
        x509.subject().as_raw().to_vec(),
        x509.public_key().raw.to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use std::{fs, sync::Arc};

    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    use rustls::{ServerConfig, pki_types::ServerName};
    use rustls_pki_types::PrivateKeyDer;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::node_ca::{LeafMinter, TlsSettings, server_config};

    /// A stand-in for an upstream registry: its own CA and a server for `name`.
    struct Upstream {
        ca_pem: String,
        config: Arc<ServerConfig>,
    }

    fn upstream(name: &str) -> Upstream {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        // Distinct names, so a wrong CA is an unknown issuer rather than a name collision.
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA for {name}"));
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        Upstream {
            ca_pem: ca_cert.pem(),
            config: Arc::new(config),
        }
    }

    async fn connect(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = TlsAcceptor::from(server).accept(tcp).await {
                let _ = tls.write_all(b"ok").await;
                let _ = tls.shutdown().await;
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let result = async {
            let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await?;
            Ok(())
        }
        .await;
        server_task.await.unwrap();
        result
    }

    #[tokio::test]
    async fn extra_ca_files_are_trusted_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let registry = upstream("registry.example.com");
        let ca_file = dir.path().join("extra.pem");
        fs::write(&ca_file, format!("# the lab registry\n{}", registry.ca_pem)).unwrap();

        let (trusting, report) = build(vec![], vec![], &[ca_file], None).unwrap();
        assert_eq!(report.extra, 1);
        connect(registry.config.clone(), trusting, "registry.example.com")
            .await
            .expect("verified against the extra CA");

        // Verification is on: a client with only an unrelated root refuses the same server.
        let other = upstream("other.example.com");
        let other_file = dir.path().join("other.pem");
        fs::write(&other_file, &other.ca_pem).unwrap();
        let (strict, _) = build(vec![], vec![], &[other_file], None).unwrap();
        let err = connect(registry.config, strict, "registry.example.com")
            .await
            .unwrap_err();
        assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    }

    #[tokio::test]
    async fn the_node_ca_is_never_an_upstream_root() {
        let dir = tempfile::tempdir().unwrap();
        let settings = TlsSettings::new(dir.path());
        let hosts = settings.intercept_set().unwrap();
        let (ca, _) = NodeCa::load_or_generate(&settings, &hosts).unwrap();
        let ca = Arc::new(ca);
        let registry = upstream("registry.example.com");
        let ca_file = dir.path().join("extra.pem");
        fs::write(&ca_file, &registry.ca_pem).unwrap();

        // The node CA sits in the "system store", as it does once installed.
        let system = vec![ca.cert_der().clone()];
        let (client, report) = build(system, vec![], &[ca_file], Some(&ca)).unwrap();
        assert_eq!(report.node_ca_skipped, 1);
        assert_eq!(report.system, 0);

        let minter = Arc::new(LeafMinter::new(ca.clone(), Arc::new(hosts)));
        let err = connect(server_config(minter), client, "quay.io")
            .await
            .unwrap_err();
        assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    }

    #[test]
    fn no_roots_and_bad_files_are_errors() {
        assert!(matches!(
            build(vec![], vec![], &[], None),
            Err(UpstreamTlsError::NoUpstreamRoots)
        ));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "nothing here\n").unwrap();
        let err = build(vec![], vec![], &[empty], None).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = build(vec![], vec![], &[missing], None).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
