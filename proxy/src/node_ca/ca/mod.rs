//! The node CA: generated on first start or supplied by the operator, name-constrained to the
//! intercepted registry hosts, and the issuer of every leaf certificate pullproxy serves.

mod files;

use std::{
    fmt, fs, io,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use time::OffsetDateTime;

use self::files::{load_generated, load_supplied, parse_cert_pem};
use super::{
    FileError, TlsSettings,
    hosts::{DnsConstraints, InterceptSet},
};

/// Errors of the node CA: reading, generating and checking it, and minting leaves with it.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error(
        "unprotected private key file {path}: mode {mode:04o} lets group or others read it; \
         run `chmod 600 {path}`"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error(
        "{path}: not a usable private key ({cause}); pullproxy reads PKCS#8 (\"BEGIN PRIVATE \
         KEY\"): convert with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
    )]
    Key { path: PathBuf, cause: rcgen::Error },
    #[error("{path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{key} is not the private key of {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("node CA {path} expired at {not_after}")]
    CaExpired { path: PathBuf, not_after: String },
    #[error(
        "the node CA was supplied by the operator but {what} is not configured; set both the \
         certificate and the key path"
    )]
    SuppliedCaPath { what: &'static str },
    #[error(
        "the operator-supplied node CA {path} cannot mint for {host}: its name constraints do not \
         cover it; add {host} to the CA's permitted DNS subtrees or drop it from the intercepted \
         hosts"
    )]
    NotCovered { path: PathBuf, host: String },
    #[error("{host} is not an intercepted host")]
    NotIntercepted { host: String },
    #[error("generating a certificate")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
}

/// Lifetime of a generated node CA.
pub(crate) const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// A generated CA this close to expiry is replaced at start.
pub(crate) const CA_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start this far in the past, so a client whose clock is slightly behind accepts
/// them.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Who made the node CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaOrigin {
    /// pullproxy generated it and may replace it.
    Generated,
    /// The operator supplied it; pullproxy never rewrites it.
    Supplied,
}

/// Something about the node CA the operator must hear at start (log it at warn level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CaNotice {
    /// A new CA was generated: no runtime trusts it yet.
    Created { cert: PathBuf },
    /// The generated CA was replaced: runtimes trust only the old one.
    Regenerated { cert: PathBuf, reason: String },
    /// `"*"` is configured: the CA cannot carry name constraints.
    Unconstrained { cert: PathBuf },
    /// The operator's CA has no DNS name constraints.
    SuppliedUnconstrained { cert: PathBuf },
    /// The operator's CA cannot mint for these intercepted patterns; those connections fail.
    SuppliedDoesNotCover {
        cert: PathBuf,
        patterns: Vec<String>,
    },
}

impl CaNotice {
    #[cfg(test)]
    /// Whether runtimes must be given the (new) CA: `pullproxy ca install`, then one restart.
    pub(crate) fn needs_retrust(&self) -> bool {
        matches!(self, Self::Created { .. } | Self::Regenerated { .. })
    }
}

impl fmt::Display for CaNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Created { cert } => write!(
                f,
                "generated the node CA {}: install it into the system trust store with \
                 `pullproxy ca install`, then restart the container runtimes once",
                cert.display()
            ),
            Self::Regenerated { cert, reason } => write!(
                f,
                "regenerated the node CA {} ({reason}): runtimes still trust the old one; run \
                 `pullproxy ca install` and restart the container runtimes once",
                cert.display()
            ),
            Self::Unconstrained { cert } => write!(
                f,
                "INTERCEPTING EVERY HOST (\"*\"): the node CA {} carries no name constraints, so \
                 whoever obtains its key can impersonate ANY site to this node; guard the key like \
                 a root password, or list the registry hosts instead of \"*\"",
                cert.display()
            ),
            Self::SuppliedUnconstrained { cert } => write!(
                f,
                "the supplied node CA {} has no DNS name constraints: whoever obtains its key can \
                 impersonate any site to nodes that trust it; issue it with permitted DNS subtrees \
                 for the registry hosts",
                cert.display()
            ),
            Self::SuppliedDoesNotCover { cert, patterns } => write!(
                f,
                "the supplied node CA {} cannot mint for {}: its name constraints do not cover \
                 them, so TLS to them will fail; reissue the CA or drop them from the intercepted \
                 hosts",
                cert.display(),
                patterns.join(", ")
            ),
        }
    }
}

/// The node CA, ready to sign.
pub(crate) struct NodeCa {
    cert_path: PathBuf,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    origin: CaOrigin,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    /// DNS name constraints; `None` when the certificate has none.
    constraints: Option<DnsConstraints>,
}

impl fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The issuer holds the private key: never print it.
        f.debug_struct("NodeCa")
            .field("cert_path", &self.cert_path)
            .field("origin", &self.origin)
            .field("not_after", &self.not_after)
            .field("constraints", &self.constraints)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate with its key, and when it stops being valid.
#[derive(Debug)]
pub(crate) struct Leaf {
    pub(crate) certified_key: CertifiedKey,
    pub(crate) not_after: SystemTime,
}

impl NodeCa {
    /// Loads the node CA, generating or regenerating it when pullproxy owns it. The notices are
    /// for the operator: log each one at warn level.
    pub(crate) fn load_or_generate(
        settings: &TlsSettings,
        hosts: &InterceptSet,
    ) -> Result<(Self, Vec<CaNotice>), CaError> {
        if settings.ca_supplied {
            load_supplied(settings, hosts)
        } else {
            load_generated(settings, hosts)
        }
    }

    /// Reads only the CA certificate, if there is one yet; for read-only commands (`ca status`)
    /// that must neither need the key nor create a CA.
    pub(crate) fn read_certificate(
        settings: &TlsSettings,
    ) -> Result<Option<CertificateDer<'static>>, CaError> {
        let path = settings.ca_cert_path();
        match fs::read(&path) {
            Ok(pem) => parse_cert_pem(&path, &pem).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FileError::at("reading", &path)(e).into()),
        }
    }

    /// The CA certificate in PEM, as runtimes must trust it.
    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER.
    pub(crate) fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    #[cfg(test)]
    /// Whether pullproxy generated the CA or the operator supplied it.
    pub(crate) fn origin(&self) -> CaOrigin {
        self.origin
    }

    #[cfg(test)]
    /// End of the CA's validity; no leaf outlives it.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after.into()
    }

    #[cfg(test)]
    /// The CA's DNS name constraints; `None` when it has none (`"*"` or an unconstrained
    /// operator CA).
    pub(crate) fn name_constraints(&self) -> Option<&DnsConstraints> {
        self.constraints.as_ref()
    }

    /// Whether a leaf for `host` would chain to this CA under its name constraints.
    pub(crate) fn may_mint_for(&self, host: &str) -> bool {
        self.constraints.as_ref().is_none_or(|c| c.permits(host))
    }

    /// Mints a leaf for `host`: a fresh ECDSA P-256 key, SAN = `host`, server-auth only, valid for
    /// `validity` but never beyond the CA. The chain sent is leaf + CA, so an operator CA that is
    /// itself an intermediate still verifies.
    pub(crate) fn mint_leaf(&self, host: &str, validity: Duration) -> Result<Leaf, CaError> {
        let dns = DnsName::try_from(host).map_err(|_| CaError::NotIntercepted {
            host: host.to_owned(),
        })?;
        let host = dns.as_ref().to_ascii_lowercase();
        if !self.may_mint_for(&host) {
            return Err(CaError::NotCovered {
                path: self.cert_path.clone(),
                host,
            });
        }
        let now = OffsetDateTime::now_utc();
        let not_after = (now + validity).min(self.not_after);
        if not_after <= now {
            return Err(CaError::CaExpired {
                path: self.cert_path.clone(),
                not_after: self.not_after.to_string(),
            });
        }
        let mut params = CertificateParams::default();
        params.not_before = (now - BACKDATE).max(self.not_before);
        params.not_after = not_after;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, &host);
        params.subject_alt_names = vec![SanType::DnsName(host.clone().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let certified_key = CertifiedKey::from_der(
            vec![cert.der().clone(), self.cert_der.clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            &super::crypto_provider(),
        )?;
        Ok(Leaf {
            certified_key,
            not_after: not_after.into(),
        })
    }

    /// Signs arbitrary parameters with the CA key, bypassing every check: lets tests prove that
    /// name constraints hold even against a misuse of the key.
    #[cfg(test)]
    pub(crate) fn sign_unchecked(
        &self,
        params: &CertificateParams,
        key: &KeyPair,
    ) -> CertificateDer<'static> {
        params.signed_by(key, &self.issuer).unwrap().der().clone()
    }
}

/// Re-encodes one certificate as PEM: the configured file may hold more than the CA (a chain,
/// comments), but runtimes must be given exactly the CA.
pub(crate) fn pem_of(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
