//! The `Range` header parser and its resolution against a blob's length.
//!
//! Input: the blob length in decimal, a newline, then the header value, e.g. `1024\nbytes=0-99`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullproxy::oci::{ByteRange, ResolvedRange, Unsatisfiable};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((len, header)) = text.split_once('\n') else {
        return;
    };
    let Ok(len) = len.parse::<u64>() else {
        return;
    };
    let Some(range) = ByteRange::parse(header) else {
        return;
    };

    // What was parsed is what the header says: rendering it back parses to the same range.
    let rendered = match range {
        ByteRange::FromTo { start, end } => {
            assert!(start <= end, "{header:?} gave a backwards range");
            format!("bytes={start}-{end}")
        }
        ByteRange::From { start } => format!("bytes={start}-"),
        ByteRange::Suffix { len } => format!("bytes=-{len}"),
    };
    assert_eq!(ByteRange::parse(&rendered), Some(range), "{header:?}");
    // Only the three forms with plain decimal positions are accepted.
    let spec = header.trim();
    assert!(spec.len() > "bytes=".len() && spec[..5].eq_ignore_ascii_case("bytes"));
    assert!(
        !spec.contains(','),
        "{header:?}: several ranges are ignored"
    );

    // Resolution agrees with RFC 9110 §14.1.2 written out independently, and never leaves the blob.
    let want = expected(range, len);
    let got = range.resolve(len);
    assert_eq!(got, want, "{range:?} against {len}");
    match got {
        Ok(r) => {
            assert!(r.start <= r.end && r.end < len, "{r:?} outside 0..{len}");
            assert!((1..=len).contains(&r.len()), "{r:?} has {} bytes", r.len());
            assert_eq!(
                r.content_range(len),
                format!("bytes {}-{}/{len}", r.start, r.end)
            );
        }
        Err(u) => assert_eq!(u.content_range(), format!("bytes */{len}")),
    }
});

/// The satisfiable part of `range` for a representation of `len` bytes, in u128 so that no
/// arithmetic here can overflow.
fn expected(range: ByteRange, len: u64) -> Result<ResolvedRange, Unsatisfiable> {
    let unsatisfiable = Err(Unsatisfiable { len });
    let total = u128::from(len);
    let (first, last) = match range {
        ByteRange::FromTo { start, end } => (u128::from(start), u128::from(end)),
        ByteRange::From { start } => (u128::from(start), total.saturating_sub(1)),
        ByteRange::Suffix { len: 0 } => return unsatisfiable,
        ByteRange::Suffix { len: n } => {
            (total.saturating_sub(u128::from(n)), total.saturating_sub(1))
        }
    };
    if total == 0 || first >= total {
        return unsatisfiable;
    }
    let last = last.min(total - 1);
    Ok(ResolvedRange {
        start: first as u64,
        end: last as u64,
    })
}
