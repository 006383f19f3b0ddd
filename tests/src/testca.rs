//! Certificate authorities of the test's own: a CA and leaf certificates for fake upstream
//! registries, written as PEM files, and CA bundles (system roots plus test CAs) for clients.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tempfile::TempDir;

use crate::mountns::CA_BUNDLE_PATHS;

/// The public registry names a fake upstream answers for (the names pullproxy intercepts by
/// default, and the hosts Docker Hub's clients use).
pub const UPSTREAM_HOSTS: &[&str] = &[
    "registry-1.docker.io",
    "index.docker.io",
    "docker.io",
    "quay.io",
    "registry.k8s.io",
    "ghcr.io",
    "gcr.io",
];

/// A CA that exists only for one test, with its PEM files in a temp dir removed on drop.
pub struct TestCa {
    dir: TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    next_leaf: AtomicU32,
}

/// A leaf certificate and its key as PEM files (the forms docker-registry and nginx read).
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate alone (clients trust the CA directly, so no chain is needed).
    pub cert: PathBuf,
    /// The PKCS#8 private key.
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    /// The issuing CA's certificate, for clients of the server using this leaf.
    pub ca_pem: String,
}

impl TestCa {
    /// A new CA whose common name includes `name`; distinct names keep a wrong CA an "unknown
    /// issuer" rather than a confusing name collision.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pp-testca-")
            .tempdir()
            .expect("temp dir for the test CA");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("pullproxy test CA {name} {}", crate::unique("ca")),
        );
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        fs::write(dir.path().join("ca.crt"), issuer.pem()).expect("write CA certificate");
        Self {
            dir,
            issuer,
            next_leaf: AtomicU32::new(0),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate file (`ca.crt`), e.g. for `skopeo --src-cert-dir` or containerd.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The directory holding the CA and leaf files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid for decades.
    pub fn leaf<S: AsRef<str>>(&self, names: &[S]) -> Leaf {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| {
                let n = n.as_ref();
                match n.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(n.try_into().expect("DNS name")),
                }
            })
            .collect();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_ref());
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let n = self.next_leaf.fetch_add(1, Ordering::Relaxed);
        let leaf = Leaf {
            cert: self.dir.path().join(format!("leaf-{n}.crt")),
            key: self.dir.path().join(format!("leaf-{n}.key")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem(),
        };
        fs::write(&leaf.cert, &leaf.cert_pem).expect("write leaf certificate");
        fs::write(&leaf.key, &leaf.key_pem).expect("write leaf key");
        leaf
    }

    /// A leaf for every name in [`UPSTREAM_HOSTS`]: one fake registry stands in for them all.
    pub fn upstream_leaf(&self) -> Leaf {
        self.leaf(UPSTREAM_HOSTS)
    }

    /// A rustls client configuration trusting only this CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        client_config(&[&self.cert_pem()])
    }
}

/// A rustls client configuration (aws-lc-rs) trusting only the CAs in `ca_pems`.
pub fn client_config(ca_pems: &[&str]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for pem in ca_pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.expect("PEM certificate")).expect("add root");
        }
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// The host's system bundle (the first of [`CA_BUNDLE_PATHS`] that exists), as PEM.
pub fn system_bundle() -> String {
    CA_BUNDLE_PATHS
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .unwrap_or_else(|| panic!("no system CA bundle at any of {CA_BUNDLE_PATHS:?}"))
}

/// Writes `path` = the system bundle followed by `extra_pems` (test CAs, pullproxy's node CA),
/// for [`crate::mountns::MountSpec::ca_bundle`]. Returns `path`.
pub fn ca_bundle(path: &Path, extra_pems: &[&str]) -> PathBuf {
    let mut bundle = system_bundle();
    for pem in extra_pems {
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(pem);
    }
    fs::write(path, bundle).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_files_hold_a_certificate_and_key_for_every_name() {
        let ca = TestCa::new("unit");
        let leaf = ca.leaf(&["registry-1.docker.io", "10.204.0.1"]);
        assert!(
            fs::read_to_string(&leaf.cert)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(
            fs::read_to_string(&leaf.key)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert_eq!(leaf.ca_pem, ca.cert_pem());
        assert!(ca.cert_path().exists());
        // The CA parses as a root for rustls.
        let _ = ca.client_config();
    }

    #[test]
    fn bundle_is_the_system_roots_plus_the_extras() {
        let ca = TestCa::new("bundle");
        let path = ca.dir().join("bundle.pem");
        ca_bundle(&path, &[&ca.cert_pem()]);
        let bundle = fs::read_to_string(&path).unwrap();
        assert!(bundle.starts_with(&system_bundle()));
        assert!(bundle.ends_with(&ca.cert_pem()));
    }
}
