//! Kubernetes quantity parsing (`moat::quantity`, and `moat decrypt --size-limit` through
//! `moat::model::parse_size_limit`): the input is a quantity as a spec or a flag spells it.
//!
//! Asserts: no panic; a parsed value is finite; a quantity is the same as itself exactly when
//! it parses; the mebibytes of a quantity exist exactly for the non-negative ones, and cover
//! its value; a size limit is a whole number of bytes of at least one, no more than the value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat::{model, quantity};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let value = quantity::parse(s);
    if let Some(v) = value {
        assert!(v.is_finite(), "{s:?} parsed to {v}");
    }
    assert_eq!(quantity::same(s, s), value.is_some(), "same({s:?}, {s:?})");
    let mebibytes = quantity::mebibytes_ceil(s);
    match value {
        Some(v) if v >= 0.0 => {
            let mib = mebibytes.unwrap_or_else(|| panic!("no mebibytes for {s:?} ({v})"));
            // Saturates above u64::MAX mebibytes; below f64's normal range the division by
            // 2^20 may round to zero, which no spec can mean.
            assert!(
                mib == u64::MAX || mib as f64 * quantity::MI >= v || v < 1e-300,
                "{s:?}: {mib} Mi < {v}"
            );
        }
        _ => assert_eq!(mebibytes, None, "mebibytes of {s:?}"),
    }
    match model::parse_size_limit(s) {
        Ok(bytes) => {
            let v = value.unwrap_or_else(|| panic!("a size limit from {s:?}, not a quantity"));
            assert!(
                bytes >= 1 && bytes as f64 <= v,
                "size limit {bytes} from {s:?} ({v})"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
