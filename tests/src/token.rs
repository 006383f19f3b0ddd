//! Registry bearer tokens as a token service (auth.docker.io, GitLab's `/jwt/auth`) issues them
//! under the Docker token authentication scheme: an ES256 JWT that names the repositories and
//! actions it grants, signed by a key whose self-signed certificate the registry trusts
//! (distribution's `auth.token.rootcertbundle`; the JWT's `kid` is the key's libtrust ID).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SigningKey};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

/// Signs tokens for one registry `service` as `issuer`.
pub struct TokenIssuer {
    pub issuer: String,
    pub service: String,
    key: KeyPair,
    kid: String,
    dir: TempDir,
}

impl TokenIssuer {
    /// A new signing key, and its certificate written for the registry to trust.
    pub fn new(issuer: &str, service: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("token signing key");
        let cert = CertificateParams::new(vec![issuer.to_owned()])
            .expect("certificate parameters")
            .self_signed(&key)
            .expect("self-signed token certificate");
        let dir = tempfile::Builder::new()
            .prefix("pp-token-")
            .tempdir()
            .expect("temp dir for the token issuer");
        std::fs::write(dir.path().join("token.crt"), cert.pem()).expect("write token cert");
        Self {
            issuer: issuer.to_owned(),
            service: service.to_owned(),
            kid: libtrust_key_id(&key.subject_public_key_info()),
            key,
            dir,
        }
    }

    /// The certificate the registry verifies tokens with.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("token.crt")
    }

    /// A token for `subject` granting `actions` (`pull`, `push`) on `repository`, valid for `ttl`.
    pub fn token(
        &self,
        subject: &str,
        repository: &str,
        actions: &[&str],
        ttl: Duration,
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let header = json!({ "typ": "JWT", "alg": "ES256", "kid": self.kid });
        let claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "iat": now,
            "nbf": now - 60,
            "exp": now + ttl.as_secs(),
            "jti": crate::unique("jti"),
            "access": [{ "type": "repository", "name": repository, "actions": actions }],
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let der = self.key.sign(input.as_bytes()).expect("sign the token");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(jws_signature(&der)))
    }

    /// Writes a token service's answer (`token` and `access_token`, as clients read either) to
    /// `path`, for a static file server to hand out.
    pub fn write_response(&self, path: &Path, token: &str, ttl: Duration) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("token response dir");
        }
        let body = json!({ "token": token, "access_token": token, "expires_in": ttl.as_secs() });
        std::fs::write(path, body.to_string()).expect("write token response");
    }
}

/// libtrust's key ID, which distribution matches a JWT's `kid` against: the first 240 bits of
/// the SHA-256 of the DER public key, base32, in groups of four joined by colons.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    let hash = Sha256::digest(spki_der);
    let b32 = base32(&hash[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ASCII"))
        .collect::<Vec<_>>()
        .join(":")
}

/// RFC 4648 base32 without padding (30 bytes encode to exactly 48 characters).
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// An ASN.1 DER ECDSA signature (`SEQUENCE { r INTEGER, s INTEGER }`) as JWS wants it: `r` and
/// `s` as 32-byte big-endian numbers, concatenated.
fn jws_signature(der: &[u8]) -> Vec<u8> {
    assert_eq!(der.first(), Some(&0x30), "not a DER sequence");
    let mut rest = &der[2..];
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(rest[0], 0x02, "not a DER integer");
        let len = usize::from(rest[1]);
        let int = &rest[2..2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        rest = &rest[2 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn key_ids_are_twelve_groups_of_four() {
        let id = libtrust_key_id(b"any key");
        assert_eq!(id.len(), 48 + 11);
        assert!(id.split(':').all(|g| g.len() == 4));
    }

    #[test]
    fn der_signatures_become_fixed_width() {
        // r with a leading zero byte (high bit set), s short.
        let mut der = vec![0x30, 0, 0x02, 33, 0];
        der.extend([0x80; 32]);
        der.extend([0x02, 2, 0x01, 0x02]);
        der[1] = (der.len() - 2) as u8;
        let sig = jws_signature(&der);
        assert_eq!(sig.len(), 64);
        assert_eq!(&sig[..32], &[0x80; 32]);
        assert_eq!(&sig[62..], &[1, 2]);
        assert!(sig[32..62].iter().all(|&b| b == 0));
    }
}
