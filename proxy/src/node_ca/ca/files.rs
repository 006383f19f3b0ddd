//! The node CA's files: a pair loaded and checked, or pullproxy's own generated and replaced.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256, PublicKeyData,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::OffsetDateTime;
use tracing::info;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::{BACKDATE, CA_RENEW_BEFORE, CA_VALIDITY, CaError, CaNotice, CaOrigin, NodeCa, pem_of};
use crate::{
    node_ca::{
        FileError, TlsSettings,
        hosts::{DnsConstraints, InterceptSet},
    },
    private_state::{self, DIR_MODE, FILE_MODE},
};

pub(super) fn load_supplied(
    settings: &TlsSettings,
    hosts: &InterceptSet,
) -> Result<(NodeCa, Vec<CaNotice>), CaError> {
    let cert = settings.ca_cert.clone().ok_or(CaError::SuppliedCaPath {
        what: "the CA certificate",
    })?;
    let key = settings
        .ca_key
        .clone()
        .ok_or(CaError::SuppliedCaPath { what: "the CA key" })?;
    let ca = load(&cert, &key, CaOrigin::Supplied)?;
    if ca.not_after <= OffsetDateTime::now_utc() {
        return Err(CaError::CaExpired {
            path: cert,
            not_after: ca.not_after.to_string(),
        });
    }
    let mut notices = Vec::new();
    if hosts.intercepts_all() {
        notices.push(CaNotice::Unconstrained { cert: cert.clone() });
    }
    match &ca.constraints {
        None if !hosts.intercepts_all() => {
            notices.push(CaNotice::SuppliedUnconstrained { cert: cert.clone() })
        }
        None => {}
        Some(c) => {
            let uncovered = hosts.uncovered(Some(c));
            if !uncovered.is_empty() {
                notices.push(CaNotice::SuppliedDoesNotCover {
                    cert: cert.clone(),
                    patterns: uncovered.iter().map(ToString::to_string).collect(),
                });
            }
        }
    }
    Ok((ca, notices))
}

pub(super) fn load_generated(
    settings: &TlsSettings,
    hosts: &InterceptSet,
) -> Result<(NodeCa, Vec<CaNotice>), CaError> {
    let cert_path = settings.ca_cert_path();
    let key_path = settings.ca_key_path();
    for path in [&cert_path, &key_path] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The state directory is pullproxy's: narrowed if an older version left it readable.
            // A directory elsewhere that the configuration names is only created, never changed.
            if dir == settings.state_dir {
                private_state::create_dir(dir)
            } else {
                DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
            }
            .map_err(FileError::at("creating", dir))?;
        }
    }
    // Two pullproxy processes starting at once (an init container and the daemon) must not both
    // generate a CA and each keep a different one in memory.
    let lock_path = lock_path(&key_path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .open(&lock_path)
        .map_err(FileError::at("opening", &lock_path))?;
    lock.lock().map_err(FileError::at("locking", &lock_path))?;
    // Older versions wrote the certificate 0644; the key was always refused unless private.
    for path in [&lock_path, &cert_path] {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => private_state::restrict(path, &meta, FILE_MODE)
                .map_err(FileError::at("restricting", path))?,
            _ => {}
        }
    }

    let mut notices = Vec::new();
    let have_cert = cert_path.exists();
    let have_key = key_path.exists();
    let reason = if !have_cert && !have_key {
        None
    } else if !have_cert || !have_key {
        Some("its certificate or key was missing".to_owned())
    } else {
        match load(&cert_path, &key_path, CaOrigin::Generated) {
            // A key that others can read is not silently replaced: the operator must see it.
            Err(e @ CaError::KeyPermissions { .. }) => return Err(e),
            Err(e) => Some(format!("the previous one was unusable: {e}")),
            Ok(ca) => match regeneration_reason(&ca, hosts) {
                None => {
                    if hosts.intercepts_all() {
                        notices.push(CaNotice::Unconstrained { cert: cert_path });
                    }
                    return Ok((ca, notices));
                }
                Some(reason) => Some(reason),
            },
        }
    };

    let ca = generate(&cert_path, &key_path, hosts)?;
    info!(cert = %cert_path.display(), "generated the node CA");
    notices.push(match reason {
        None => CaNotice::Created {
            cert: cert_path.clone(),
        },
        Some(reason) => CaNotice::Regenerated {
            cert: cert_path.clone(),
            reason,
        },
    });
    if hosts.intercepts_all() {
        notices.push(CaNotice::Unconstrained { cert: cert_path });
    }
    Ok((ca, notices))
}

/// Why a CA that pullproxy generated must be replaced, if it must.
fn regeneration_reason(ca: &NodeCa, hosts: &InterceptSet) -> Option<String> {
    let renew_at = OffsetDateTime::now_utc() + CA_RENEW_BEFORE;
    if ca.not_after <= renew_at {
        return Some(format!("it expires at {}", ca.not_after));
    }
    let uncovered = hosts.uncovered(ca.constraints.as_ref());
    if !uncovered.is_empty() {
        let list: Vec<String> = uncovered.iter().map(ToString::to_string).collect();
        return Some(format!(
            "its name constraints do not cover {}",
            list.join(", ")
        ));
    }
    if ca.constraints.is_none() && !hosts.intercepts_all() {
        // It was made for "*"; now that the hosts are a list again, it can be constrained.
        return Some("it had no name constraints and the intercepted hosts are a list now".into());
    }
    None
}

fn generate(cert_path: &Path, key_path: &Path, hosts: &InterceptSet) -> Result<NodeCa, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.distinguished_name = ca_subject();
    // pathlen 0: the key signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Verifiers that nest extended key usages (Go, OpenSSL) then refuse anything but TLS servers.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.name_constraints = hosts.name_constraints().map(|dns| NameConstraints {
        permitted_subtrees: dns
            .permitted
            .into_iter()
            .map(GeneralSubtree::DnsName)
            .collect(),
        // Permitting only DNS names would leave IP addresses unconstrained (RFC 5280: a name
        // type without a subtree is not restricted); exclude every address explicitly.
        excluded_subtrees: dns
            .excluded
            .into_iter()
            .map(GeneralSubtree::DnsName)
            .chain([
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ])
            .collect(),
    });
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;

    // Both files go to temporary names first and are renamed together: a crash leaves either
    // the old pair or a mismatched pair, which the next start detects and replaces.
    let key_tmp = tmp_path(key_path);
    let cert_tmp = tmp_path(cert_path);
    write_new(&key_tmp, key.serialize_pem().as_bytes())?;
    write_new(&cert_tmp, cert.pem().as_bytes())?;
    fs::rename(&key_tmp, key_path).map_err(FileError::at("renaming into", key_path))?;
    fs::rename(&cert_tmp, cert_path).map_err(FileError::at("renaming into", cert_path))?;
    load(cert_path, key_path, CaOrigin::Generated)
}

/// The generated CA's subject. It names the node so an operator looking at a trust store can tell
/// whose CA it is; it stays the same across regenerations so upstream verification can leave
/// every generation of it out of its roots.
fn ca_subject() -> DistinguishedName {
    let node = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown node".to_owned());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "pullproxy");
    dn.push(DnType::CommonName, format!("pullproxy node CA {node}"));
    dn
}

/// Creates `path` private from the start (never a moment with wider permissions), replacing a
/// leftover from an interrupted run; `create_new` also refuses to follow a planted symlink.
fn write_new(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(FileError::at("removing", path)(e).into());
        }
        _ => {}
    }
    let mut file = private_state::new_file()
        .open(path)
        .map_err(FileError::at("creating", path))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(FileError::at("writing", path))?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn lock_path(key_path: &Path) -> PathBuf {
    let mut name = key_path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    key_path.with_file_name(name)
}

/// Reads a private key the way ssh does: a file that group or others may read is refused. The
/// mode is checked on the open file, so it is the file that was read.
fn read_private_key(path: &Path) -> Result<KeyPair, CaError> {
    let mut file = File::open(path).map_err(FileError::at("opening", path))?;
    let meta = file.metadata().map_err(FileError::at("inspecting", path))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem)
        .map_err(FileError::at("reading", path))?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CaError::Pem {
        path: path.to_owned(),
        message: format!("no private key: {e}"),
    })?;
    KeyPair::try_from(&der).map_err(|cause| CaError::Key {
        path: path.to_owned(),
        cause,
    })
}

pub(super) fn parse_cert_pem(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaError> {
    CertificateDer::from_pem_slice(pem).map_err(|e| CaError::Pem {
        path: path.to_owned(),
        message: format!("no certificate: {e}"),
    })
}

/// Loads and checks a CA pair: a CA certificate that may sign certificates, and its key.
fn load(cert_path: &Path, key_path: &Path, origin: CaOrigin) -> Result<NodeCa, CaError> {
    let key = read_private_key(key_path)?;
    let pem = fs::read(cert_path).map_err(FileError::at("reading", cert_path))?;
    let der = parse_cert_pem(cert_path, &pem)?;
    let bad = |reason: String| CaError::BadCa {
        path: cert_path.to_owned(),
        reason,
    };
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    if !x509.is_ca() {
        return Err(bad(
            "not a CA certificate (basicConstraints CA:FALSE)".into()
        ));
    }
    if let Ok(Some(usage)) = x509.key_usage()
        && !usage.value.key_cert_sign()
    {
        return Err(bad(
            "its key usage does not allow signing certificates".into()
        ));
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(CaError::KeyMismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    let constraints = dns_constraints(&x509).map_err(bad)?;
    let time = |t: &x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp())
            .map_err(|e| bad(format!("validity out of range: {e}")))
    };
    let not_before = time(&x509.validity().not_before)?;
    let not_after = time(&x509.validity().not_after)?;
    let issuer = Issuer::from_ca_cert_der(&der, key)
        .map_err(|e| bad(format!("cannot sign with it: {e}")))?;
    Ok(NodeCa {
        cert_path: cert_path.to_owned(),
        cert_pem: pem_of(&der),
        cert_der: der.into_owned(),
        issuer,
        origin,
        not_before,
        not_after,
        constraints,
    })
}

/// The dNSName part of the certificate's name constraints.
fn dns_constraints(x509: &X509Certificate<'_>) -> Result<Option<DnsConstraints>, String> {
    let Some(ext) = x509
        .name_constraints()
        .map_err(|e| format!("unreadable name constraints: {e}"))?
    else {
        return Ok(None);
    };
    let dns = |subtrees: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| {
        subtrees
            .iter()
            .flatten()
            .filter_map(|s| match s.base {
                GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let permitted = dns(&ext.value.permitted_subtrees);
    let excluded = dns(&ext.value.excluded_subtrees);
    if permitted.is_empty() && excluded.is_empty() {
        return Ok(None);
    }
    Ok(Some(DnsConstraints {
        permitted,
        excluded,
    }))
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::PermissionsExt,
        time::{Duration, SystemTime},
    };

    use super::*;

    fn settings(dir: &Path) -> TlsSettings {
        TlsSettings::new(dir.join("state"))
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn first_start_generates_a_ca_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let hosts = s.intercept_set().unwrap();
        let (ca, notices) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert_eq!(notices.len(), 1);
        assert!(notices[0].needs_retrust(), "{}", notices[0]);
        assert_eq!(mode(&s.ca_key_path()), 0o600);
        assert_eq!(mode(&s.ca_cert_path()), 0o600);
        assert_eq!(mode(&s.state_dir), 0o700);
        assert_eq!(ca.origin(), CaOrigin::Generated);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        let c = ca.name_constraints().unwrap();
        assert!(c.permitted.contains(&"docker.io".to_owned()));
        let days = ca
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs()
            / (24 * 3600);
        assert!(
            (3640..=3650).contains(&days),
            "about ten years, got {days} days"
        );

        // Reload: the same CA, and nothing to tell.
        let (again, notices) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert!(notices.is_empty(), "{notices:?}");
        assert_eq!(again.cert_der(), ca.cert_der());
        assert_eq!(
            NodeCa::read_certificate(&s).unwrap().as_ref(),
            Some(ca.cert_der())
        );
    }

    #[test]
    fn an_old_readable_state_dir_is_narrowed_and_its_ca_kept() {
        use crate::private_state::too_open;

        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let hosts = s.intercept_set().unwrap();
        let (ca, _) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert_eq!(too_open(&s.state_dir).unwrap(), [], "as created");
        // What an older version left: the directory, the certificate and the lock readable.
        let chmod = |p: &Path, m| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        chmod(&s.state_dir, 0o755);
        chmod(&s.ca_cert_path(), 0o644);
        chmod(&lock_path(&s.ca_key_path()), 0o644);
        assert_eq!(too_open(&s.state_dir).unwrap().len(), 3);
        let (again, notices) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert_eq!(too_open(&s.state_dir).unwrap(), [], "narrowed at start");
        assert!(notices.is_empty(), "{notices:?}");
        assert_eq!(
            again.cert_der(),
            ca.cert_der(),
            "the same CA: runtimes still trust it"
        );
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let hosts = s.intercept_set().unwrap();
        let (ca, _) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        fs::set_permissions(s.ca_key_path(), fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeCa::load_or_generate(&s, &hosts).unwrap_err();
        assert!(
            matches!(err, CaError::KeyPermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // Refused, not replaced: the certificate is still the one runtimes trust.
        assert_eq!(
            NodeCa::read_certificate(&s).unwrap().as_ref(),
            Some(ca.cert_der())
        );
        fs::set_permissions(s.ca_key_path(), fs::Permissions::from_mode(0o640)).unwrap();
        assert!(NodeCa::load_or_generate(&s, &hosts).is_err());
    }

    #[test]
    fn outgrown_generated_ca_is_regenerated_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path());
        let (first, _) = NodeCa::load_or_generate(&s, &s.intercept_set().unwrap()).unwrap();

        // A host that the constraints cover already (a subdomain of docker.io) needs nothing.
        s.intercept_hosts = vec!["mirror.docker.io".into()];
        let (same, notices) = NodeCa::load_or_generate(&s, &s.intercept_set().unwrap()).unwrap();
        assert!(notices.is_empty());
        assert_eq!(same.cert_der(), first.cert_der());

        s.intercept_hosts = vec!["harbor.example.com".into()];
        let hosts = s.intercept_set().unwrap();
        let (second, notices) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert_ne!(second.cert_der(), first.cert_der());
        assert!(
            matches!(&notices[..], [CaNotice::Regenerated { reason, .. }] if reason.contains("harbor.example.com")),
            "{notices:?}"
        );
        assert!(second.may_mint_for("harbor.example.com"));
        assert_eq!(mode(&s.ca_key_path()), 0o600);

        // "*": regenerated without constraints, loudly; back to a list: constrained again.
        s.intercept_hosts = vec!["*".into()];
        let (all, notices) = NodeCa::load_or_generate(&s, &s.intercept_set().unwrap()).unwrap();
        assert!(all.name_constraints().is_none());
        assert!(
            notices
                .iter()
                .any(|n| matches!(n, CaNotice::Unconstrained { .. }))
        );
        assert!(notices.iter().any(|n| n.to_string().contains("ANY site")));
        s.intercept_hosts.clear();
        let (narrow, notices) = NodeCa::load_or_generate(&s, &s.intercept_set().unwrap()).unwrap();
        assert!(narrow.name_constraints().is_some());
        assert!(notices.iter().any(CaNotice::needs_retrust));
    }

    #[test]
    fn a_mismatched_generated_pair_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let hosts = s.intercept_set().unwrap();
        NodeCa::load_or_generate(&s, &hosts).unwrap();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        fs::remove_file(s.ca_key_path()).unwrap();
        write_new(&s.ca_key_path(), other.serialize_pem().as_bytes()).unwrap();
        let (_, notices) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert!(
            matches!(&notices[..], [CaNotice::Regenerated { .. }]),
            "{notices:?}"
        );
    }

    /// Makes an operator CA in `dir` with the given DNS permitted subtrees.
    fn operator_ca(dir: &Path, permitted: &[&str]) -> TlsSettings {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(60);
        params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(86400);
        if !permitted.is_empty() {
            params.name_constraints = Some(NameConstraints {
                permitted_subtrees: permitted
                    .iter()
                    .map(|p| GeneralSubtree::DnsName((*p).to_owned()))
                    .collect(),
                excluded_subtrees: vec![],
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join("operator.crt");
        let key_path = dir.join("operator.key");
        fs::write(&cert_path, cert.pem()).unwrap();
        write_new(&key_path, key.serialize_pem().as_bytes()).unwrap();
        TlsSettings {
            ca_cert: Some(cert_path),
            ca_key: Some(key_path),
            ca_supplied: true,
            ..TlsSettings::new(dir.join("state"))
        }
    }

    #[test]
    fn supplied_ca_is_never_rewritten_and_refuses_uncovered_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let s = operator_ca(dir.path(), &["quay.io"]);
        let before = fs::read(s.ca_cert.as_ref().unwrap()).unwrap();
        let hosts = s.intercept_set().unwrap();
        let (ca, notices) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert_eq!(ca.origin(), CaOrigin::Supplied);
        assert_eq!(fs::read(s.ca_cert.as_ref().unwrap()).unwrap(), before);
        assert!(!s.state_dir.exists(), "a supplied CA writes nothing");
        match &notices[..] {
            [CaNotice::SuppliedDoesNotCover { patterns, .. }] => {
                assert!(patterns.contains(&"registry-1.docker.io".to_owned()));
                assert!(!patterns.contains(&"quay.io".to_owned()));
            }
            other => panic!("{other:?}"),
        }
        assert!(ca.mint_leaf("quay.io", Duration::from_secs(3600)).is_ok());
        let err = ca
            .mint_leaf("registry-1.docker.io", Duration::from_secs(3600))
            .unwrap_err();
        assert!(matches!(err, CaError::NotCovered { .. }), "{err}");
        assert!(err.to_string().contains("registry-1.docker.io"), "{err}");
    }

    #[test]
    fn supplied_ca_problems_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = operator_ca(dir.path(), &[]);
        let hosts = s.intercept_set().unwrap();
        let (_, notices) = NodeCa::load_or_generate(&s, &hosts).unwrap();
        assert!(matches!(
            &notices[..],
            [CaNotice::SuppliedUnconstrained { .. }]
        ));

        let mut missing = s.clone();
        missing.ca_key = None;
        assert!(matches!(
            NodeCa::load_or_generate(&missing, &hosts),
            Err(CaError::SuppliedCaPath { .. })
        ));

        let other_dir = dir.path().join("other");
        fs::create_dir(&other_dir).unwrap();
        let other = operator_ca(&other_dir, &[]);
        let mut mismatched = s.clone();
        mismatched.ca_key = other.ca_key.clone();
        assert!(matches!(
            NodeCa::load_or_generate(&mismatched, &hosts),
            Err(CaError::KeyMismatch { .. })
        ));

        // A leaf certificate is not a CA.
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["quay.io".to_owned()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let mut not_ca = s.clone();
        fs::write(not_ca.ca_cert.as_ref().unwrap(), leaf.pem()).unwrap();
        fs::remove_file(not_ca.ca_key.as_ref().unwrap()).unwrap();
        write_new(
            not_ca.ca_key.as_ref().unwrap(),
            leaf_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        not_ca.ca_supplied = true;
        let err = NodeCa::load_or_generate(&not_ca, &hosts).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }
}
