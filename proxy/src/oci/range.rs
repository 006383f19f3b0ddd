//! Single byte ranges from a `Range` header (RFC 9110 §14), as blob requests use them.
//!
//! Only one range is served. A header with several ranges, another unit, or bad syntax is
//! ignored and the whole blob is served with 200, which RFC 9110 allows ("a server MAY ignore the
//! Range header field"); runtimes only ever ask for one range (containerd resumes with `bytes=N-`).

use std::fmt;

/// A byte range as requested, before the blob's length is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=N-M`: from `start` to `end` inclusive.
    FromTo { start: u64, end: u64 },
    /// `bytes=N-`: from `start` to the end.
    From { start: u64 },
    /// `bytes=-N`: the last `len` bytes.
    Suffix { len: u64 },
}

/// A range resolved against a blob's length: `start..=end`, never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedRange {
    pub start: u64,
    /// Inclusive, as in `Content-Range`.
    pub end: u64,
}

/// No byte of the blob is in the requested range: answer 416 with
/// `Content-Range: bytes */LEN` ([`Unsatisfiable::content_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("range not satisfiable for a blob of {len} bytes")]
pub struct Unsatisfiable {
    pub len: u64,
}

impl Unsatisfiable {
    /// The `Content-Range` value for the 416 answer.
    pub fn content_range(&self) -> String {
        format!("bytes */{}", self.len)
    }
}

impl ByteRange {
    /// Parses a `Range` header value. `None` means "ignore the header and serve the whole
    /// blob": no `bytes` unit, several ranges, a backwards range or anything malformed.
    pub fn parse(header: &str) -> Option<ByteRange> {
        let (unit, set) = header.trim().split_once('=')?;
        if !unit.eq_ignore_ascii_case("bytes") {
            return None;
        }
        let set = set.trim();
        if set.contains(',') {
            return None;
        }
        let (first, last) = set.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        match (first.is_empty(), last.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ByteRange::Suffix {
                len: parse_pos(last)?,
            }),
            (false, true) => Some(ByteRange::From {
                start: parse_pos(first)?,
            }),
            (false, false) => {
                let (start, end) = (parse_pos(first)?, parse_pos(last)?);
                // RFC 9110 §14.1.1: last < first makes the range-spec invalid.
                (end >= start).then_some(ByteRange::FromTo { start, end })
            }
        }
    }

    /// Resolves the range against a blob of `len` bytes; an end past the blob is clamped.
    pub fn resolve(self, len: u64) -> Result<ResolvedRange, Unsatisfiable> {
        let unsatisfiable = Unsatisfiable { len };
        let last = len.checked_sub(1).ok_or(unsatisfiable)?;
        let (start, end) = match self {
            ByteRange::FromTo { start, end } => (start, end.min(last)),
            ByteRange::From { start } => (start, last),
            // A zero-length suffix selects nothing (RFC 9110 §14.1.3).
            ByteRange::Suffix { len: 0 } => return Err(unsatisfiable),
            ByteRange::Suffix { len: n } => (len.saturating_sub(n), last),
        };
        if start > last {
            return Err(unsatisfiable);
        }
        Ok(ResolvedRange { start, end })
    }
}

/// Digits only: `+`, signs, spaces inside and overflow are all malformed.
fn parse_pos(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl ResolvedRange {
    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true; here for symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` value of a 206 answer for a blob of `total` bytes.
    pub fn content_range(&self, total: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, total)
    }
}

impl fmt::Display for ResolvedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            ByteRange::parse("bytes=0-99"),
            Some(ByteRange::FromTo { start: 0, end: 99 })
        );
        assert_eq!(
            ByteRange::parse("bytes=1024-"),
            Some(ByteRange::From { start: 1024 })
        );
        assert_eq!(
            ByteRange::parse("bytes=-500"),
            Some(ByteRange::Suffix { len: 500 })
        );
        assert_eq!(
            ByteRange::parse(" Bytes=5-5 "),
            Some(ByteRange::FromTo { start: 5, end: 5 })
        );
    }

    #[test]
    fn ignores_what_it_does_not_serve() {
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=0-1,5-6",
            "bytes=5-1",
            "items=0-1",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=-+1",
            "bytes=1 2-3",
            "bytes=0x10-",
            "bytes=99999999999999999999-",
            "bytes=0-99999999999999999999",
            "bytes=1-2-3",
            "bytes=١-٢",
        ] {
            assert_eq!(ByteRange::parse(h), None, "{h:?}");
        }
    }

    #[test]
    fn resolves_against_the_length() {
        let r = |h: &str, len| ByteRange::parse(h).unwrap().resolve(len);
        assert_eq!(r("bytes=0-9", 100), Ok(ResolvedRange { start: 0, end: 9 }));
        assert_eq!(
            r("bytes=90-200", 100),
            Ok(ResolvedRange { start: 90, end: 99 })
        );
        assert_eq!(
            r("bytes=99-", 100),
            Ok(ResolvedRange { start: 99, end: 99 })
        );
        assert_eq!(r("bytes=0-", 100), Ok(ResolvedRange { start: 0, end: 99 }));
        assert_eq!(
            r("bytes=-10", 100),
            Ok(ResolvedRange { start: 90, end: 99 })
        );
        assert_eq!(
            r("bytes=-1000", 100),
            Ok(ResolvedRange { start: 0, end: 99 })
        );
        assert_eq!(r("bytes=100-", 100), Err(Unsatisfiable { len: 100 }));
        assert_eq!(r("bytes=100-200", 100), Err(Unsatisfiable { len: 100 }));
        assert_eq!(r("bytes=-0", 100), Err(Unsatisfiable { len: 100 }));
        assert_eq!(r("bytes=0-", 0), Err(Unsatisfiable { len: 0 }));
        assert_eq!(r("bytes=-5", 0), Err(Unsatisfiable { len: 0 }));
        assert_eq!(
            r(&format!("bytes={}-", u64::MAX), u64::MAX),
            Err(Unsatisfiable { len: u64::MAX })
        );
    }

    #[test]
    fn formats_content_range() {
        let range = ResolvedRange { start: 10, end: 19 };
        assert_eq!(range.len(), 10);
        assert_eq!(range.content_range(100), "bytes 10-19/100");
        assert_eq!(Unsatisfiable { len: 100 }.content_range(), "bytes */100");
    }
}
