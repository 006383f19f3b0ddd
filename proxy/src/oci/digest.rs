//! Content digests (`sha256:<hex>`) and their incremental verification.

use std::{fmt, str::FromStr};

use sha2::{Digest as _, Sha256, Sha512};

/// The hash functions the proxy accepts. The OCI image spec registers exactly these two; anything
/// else is refused, so an unknown algorithm can never name a file in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// Both algorithms, for walking the cache directories.
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

    /// The name used in digests and cache paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a digest the proxy accepts. Messages never echo the input: it comes from
/// clients and ends up in logs and error bodies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no ':' between algorithm and encoded part")]
    MissingSeparator,
    #[error("unsupported digest algorithm; only sha256 and sha512 are accepted")]
    UnsupportedAlgorithm,
    #[error("{algorithm} digest needs {expected} hex characters, got {actual}")]
    WrongLength {
        algorithm: Algorithm,
        expected: usize,
        actual: usize,
    },
    #[error("{algorithm} digest must be lowercase hex")]
    NotLowercaseHex { algorithm: Algorithm },
}

/// A validated content digest, `algorithm:encoded` with lowercase hex of the exact length.
///
/// The encoded part is safe to use as a file name: it is only ever `[0-9a-f]{64|128}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    encoded: Box<str>,
}

impl Digest {
    /// Builds a digest from its two parts, validating the encoded part.
    pub fn new(algorithm: Algorithm, encoded: &str) -> Result<Self, DigestError> {
        if encoded.len() != algorithm.hex_len() {
            return Err(DigestError::WrongLength {
                algorithm,
                expected: algorithm.hex_len(),
                actual: encoded.len(),
            });
        }
        if !encoded
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(DigestError::NotLowercaseHex { algorithm });
        }
        Ok(Digest {
            algorithm,
            encoded: encoded.into(),
        })
    }

    /// The sha256 digest of `data` (what a registry names a manifest fetched by tag).
    pub fn sha256_of(data: &[u8]) -> Self {
        Self::compute(Algorithm::Sha256, data)
    }

    /// The digest of `data` under `algorithm`.
    pub fn compute(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(data);
        hasher.finish()
    }

    /// The hash function named before the colon.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part after the colon.
    pub fn encoded(&self) -> &str {
        &self.encoded
    }

    /// Starts an incremental check that a stream of bytes has this digest.
    pub fn verifier(&self) -> DigestVerifier {
        DigestVerifier {
            expected: self.clone(),
            hasher: Hasher::new(self.algorithm),
            len: 0,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.encoded)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, encoded) = s.split_once(':').ok_or(DigestError::MissingSeparator)?;
        let algorithm = Algorithm::from_name(name).ok_or(DigestError::UnsupportedAlgorithm)?;
        Digest::new(algorithm, encoded)
    }
}

enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> Digest {
        let (algorithm, encoded) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest {
            algorithm,
            encoded: encoded.into(),
        }
    }
}

/// Hashes bytes as they stream past and tells at the end whether they match the expected digest.
pub struct DigestVerifier {
    expected: Digest,
    hasher: Hasher,
    len: u64,
}

impl fmt::Debug for DigestVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestVerifier")
            .field("expected", &self.expected)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl DigestVerifier {
    /// Hashes the next bytes of the stream.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The proof that the bytes match, or what they hashed to instead.
    pub fn finish(self) -> Result<Verified, DigestMismatch> {
        let actual = self.hasher.finish();
        if actual == self.expected {
            Ok(Verified {
                digest: actual,
                len: self.len,
            })
        } else {
            Err(DigestMismatch {
                expected: self.expected,
                actual,
            })
        }
    }
}

/// Evidence that `len` bytes were hashed and matched `digest`. Only [`DigestVerifier::finish`]
/// makes one, so a store that demands it cannot be handed unverified content by mistake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    digest: Digest,
    len: u64,
}

impl Verified {
    /// The digest the bytes matched.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// How many bytes matched.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Bytes that hashed to something other than the digest they were fetched under.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content does not match digest {expected}: it hashes to {actual}")]
pub struct DigestMismatch {
    pub expected: Digest,
    pub actual: Digest,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const ABC_SHA512: &str = "sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";

    #[test]
    fn parses_and_displays_both_algorithms() {
        let d: Digest = EMPTY_SHA256.parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        let d: Digest = ABC_SHA512.parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha512);
        assert_eq!(d.encoded().len(), 128);
        assert_eq!(d.to_string(), ABC_SHA512);
    }

    #[test]
    fn computes_known_digests() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY_SHA256);
        assert_eq!(
            Digest::compute(Algorithm::Sha512, b"abc").to_string(),
            ABC_SHA512
        );
    }

    #[test]
    fn rejects_everything_else() {
        let hex64 = "a".repeat(64);
        let cases = [
            ("", DigestError::MissingSeparator),
            ("sha256", DigestError::MissingSeparator),
            (&format!("md5:{hex64}"), DigestError::UnsupportedAlgorithm),
            (
                &format!("SHA256:{hex64}"),
                DigestError::UnsupportedAlgorithm,
            ),
            (
                &format!("sha256+b64u:{hex64}"),
                DigestError::UnsupportedAlgorithm,
            ),
            (&format!(":{hex64}"), DigestError::UnsupportedAlgorithm),
            (
                &format!("sha256:{}", "A".repeat(64)),
                DigestError::NotLowercaseHex {
                    algorithm: Algorithm::Sha256,
                },
            ),
            (
                &format!("sha256:{}g", "a".repeat(63)),
                DigestError::NotLowercaseHex {
                    algorithm: Algorithm::Sha256,
                },
            ),
            (
                &format!("sha256:{}", "a".repeat(63)),
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha256,
                    expected: 64,
                    actual: 63,
                },
            ),
            (
                &format!("sha256:{}", "a".repeat(128)),
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha256,
                    expected: 64,
                    actual: 128,
                },
            ),
            (
                &format!("sha512:{hex64}"),
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha512,
                    expected: 128,
                    actual: 64,
                },
            ),
            (
                "sha256:",
                DigestError::WrongLength {
                    algorithm: Algorithm::Sha256,
                    expected: 64,
                    actual: 0,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Digest>().unwrap_err(), want, "{input:?}");
        }
    }

    #[test]
    fn rejects_path_tricks_and_non_ascii() {
        for input in [
            format!("sha256:../{}", "a".repeat(61)),
            format!("sha256:{}/", "a".repeat(63)),
            format!("sha256:{}\0", "a".repeat(63)),
            format!("sha256:{}é", "a".repeat(62)),
            format!("sha256: {}", "a".repeat(63)),
            format!("sha256:{}:", "a".repeat(63)),
        ] {
            assert!(input.parse::<Digest>().is_err(), "{input:?}");
        }
    }

    #[test]
    fn verifier_accepts_matching_stream_in_pieces() {
        let data = b"hello, registry";
        let digest = Digest::sha256_of(data);
        let mut v = digest.verifier();
        for piece in data.chunks(4) {
            v.update(piece);
        }
        assert_eq!(v.len(), data.len() as u64);
        let proof = v.finish().unwrap();
        assert_eq!(proof.digest(), &digest);
        assert_eq!(proof.len(), data.len() as u64);
    }

    #[test]
    fn verifier_reports_what_it_saw_on_mismatch() {
        let digest = Digest::sha256_of(b"expected");
        let mut v = digest.verifier();
        v.update(b"something else");
        let err = v.finish().unwrap_err();
        assert_eq!(err.expected, digest);
        assert_eq!(err.actual, Digest::sha256_of(b"something else"));
        assert!(err.to_string().starts_with("content does not match"));
    }
}
