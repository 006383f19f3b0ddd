//! Repository names, tags and references, validated against the distribution spec grammar.

use std::{fmt, str::FromStr};

use super::digest::{Digest, DigestError};

/// Longest repository name accepted (the distribution spec's limit for the name).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`).
pub const MAX_TAG_LEN: usize = 128;

/// Why a repository name is invalid. Messages never echo the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong { len: usize },
    #[error("repository name has an empty path component")]
    EmptyComponent,
    #[error("repository name component {index} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*")]
    InvalidComponent { index: usize },
}

/// A repository name such as `library/nginx`: lowercase components joined by `/`.
///
/// Components can never be `.`, `..` or empty, and contain only `[a-z0-9._-]`, so a name is safe
/// to use in a path once validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryName(Box<str>);

impl RepositoryName {
    /// The name as it appears in the request path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RepositoryName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: s.len() });
        }
        for (index, component) in s.split('/').enumerate() {
            if component.is_empty() {
                return Err(NameError::EmptyComponent);
            }
            if !is_valid_component(component) {
                return Err(NameError::InvalidComponent { index });
            }
        }
        Ok(RepositoryName(s.into()))
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, written out by hand rather than pulling in a regex engine
/// for one line of grammar.
fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // A run of [a-z0-9]+.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // One separator: `.`, `_`, `__` or `-+`; it must be followed by another run.
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// Why a tag is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("tag is empty")]
    Empty,
    #[error("tag is {len} bytes long; at most {MAX_TAG_LEN} are allowed")]
    TooLong { len: usize },
    #[error("tag does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Invalid,
}

/// A tag such as `latest` or `1.27.0-alpine`. Tags cannot start with `.` or `-`, so they are
/// never `.`/`..` and never look like an option.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

impl Tag {
    /// The tag as it appears in the request path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = TagError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let Some(&first) = b.first() else {
            return Err(TagError::Empty);
        };
        if b.len() > MAX_TAG_LEN {
            return Err(TagError::TooLong { len: b.len() });
        }
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        if !word(first) || !b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-') {
            return Err(TagError::Invalid);
        }
        Ok(Tag(s.into()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag (mutable) or a digest (immutable).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

/// Why a manifest reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl FromStr for Reference {
    type Err = ReferenceError;

    /// Tags cannot contain `:`, digests always do: that decides which one it is.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "nginx",
            "library/nginx",
            "a/b/c/d/e",
            "my-org/my--image",
            "a.b/c_d/e__f/g-h",
            "0/9",
            "k8s.gcr.io-mirror/pause",
        ] {
            let n: RepositoryName = name.parse().unwrap();
            assert_eq!(n.as_str(), name);
        }
        let longest = ["a"; 128].join("/");
        assert_eq!(longest.len(), 255);
        assert!(longest.parse::<RepositoryName>().is_ok());
    }

    #[test]
    fn rejects_invalid_names() {
        use NameError::*;
        let cases: Vec<(String, NameError)> = vec![
            ("".into(), Empty),
            ("a".repeat(256), TooLong { len: 256 }),
            ("/a".into(), EmptyComponent),
            ("a/".into(), EmptyComponent),
            ("a//b".into(), EmptyComponent),
            ("Library/nginx".into(), InvalidComponent { index: 0 }),
            ("library/NGINX".into(), InvalidComponent { index: 1 }),
            ("..".into(), InvalidComponent { index: 0 }),
            ("a/../b".into(), InvalidComponent { index: 1 }),
            ("a/./b".into(), InvalidComponent { index: 1 }),
            (".a".into(), InvalidComponent { index: 0 }),
            ("a.".into(), InvalidComponent { index: 0 }),
            ("a..b".into(), InvalidComponent { index: 0 }),
            ("a___b".into(), InvalidComponent { index: 0 }),
            ("a._b".into(), InvalidComponent { index: 0 }),
            ("-a".into(), InvalidComponent { index: 0 }),
            ("a-".into(), InvalidComponent { index: 0 }),
            ("_a".into(), InvalidComponent { index: 0 }),
            ("a b".into(), InvalidComponent { index: 0 }),
            ("a\0b".into(), InvalidComponent { index: 0 }),
            ("a\\b".into(), InvalidComponent { index: 0 }),
            ("a%2fb".into(), InvalidComponent { index: 0 }),
            ("ngïnx".into(), InvalidComponent { index: 0 }),
            ("a:b".into(), InvalidComponent { index: 0 }),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<RepositoryName>().unwrap_err(),
                want,
                "{input:?}"
            );
        }
    }

    #[test]
    fn length_limit_counts_bytes_not_characters() {
        // 128 two-byte characters are 256 bytes: too long, whatever they are.
        let s = "é".repeat(128);
        assert_eq!(
            s.parse::<RepositoryName>().unwrap_err(),
            NameError::TooLong { len: 256 }
        );
    }

    #[test]
    fn tags() {
        for tag in ["latest", "1.27.0-alpine", "_x", "A", &"a".repeat(128)] {
            assert_eq!(tag.parse::<Tag>().unwrap().as_str(), tag);
        }
        assert_eq!("".parse::<Tag>().unwrap_err(), TagError::Empty);
        assert_eq!(
            "a".repeat(129).parse::<Tag>().unwrap_err(),
            TagError::TooLong { len: 129 }
        );
        for bad in [
            ".", "..", ".hidden", "-rm", "a/b", "a:b", "a b", "a\0", "tæg", "a%2e",
        ] {
            assert_eq!(
                bad.parse::<Tag>().unwrap_err(),
                TagError::Invalid,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn references_are_tags_or_digests() {
        let digest = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            digest.parse::<Reference>().unwrap(),
            Reference::Digest(digest.parse().unwrap())
        );
        assert_eq!(
            "v1".parse::<Reference>().unwrap(),
            Reference::Tag("v1".parse().unwrap())
        );
        assert!(matches!(
            "sha256:zz".parse::<Reference>(),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            "..".parse::<Reference>(),
            Err(ReferenceError::Tag(_))
        ));
        assert_eq!("v1".parse::<Reference>().unwrap().to_string(), "v1");
    }
}
