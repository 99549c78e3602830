//! Kubernetes resource quantities (`500m`, `4`, `16Gi`, `1e3`), parsed to compare their values.
//! The API server rewrites quantities into a canonical form (`1000m` becomes `1`), so Moat compares
//! values, not spellings.

/// The value of a quantity in base units, or `None` when `s` is not a quantity.
pub fn parse(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number == "+" || number == "-" {
        return None;
    }
    let base: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().ok()?;
            10f64.powi(e)
        }
        _ => return None,
    };
    let v = base * multiplier;
    v.is_finite().then_some(v)
}

/// One mebibyte, in bytes.
pub const MI: f64 = 1024.0 * 1024.0;

/// A quantity of bytes in whole mebibytes, rounded up (`1.5Gi` is 1536, `1G` is 954), or `None`
/// when `s` is not a non-negative quantity.
pub fn mebibytes_ceil(s: &str) -> Option<u64> {
    let v = parse(s)?;
    // A quantity above u64::MAX mebibytes saturates, which no memory limit ever reaches.
    (v >= 0.0).then(|| (v / MI).ceil() as u64)
}

/// Whether two quantity spellings denote the same value.
pub fn same(a: &str, b: &str) -> bool {
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()) * 4.0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mebibytes_round_up() {
        assert_eq!(mebibytes_ceil("2Gi"), Some(2048));
        assert_eq!(mebibytes_ceil("1.5Gi"), Some(1536));
        assert_eq!(mebibytes_ceil("1G"), Some(954));
        assert_eq!(mebibytes_ceil("1"), Some(1));
        assert_eq!(mebibytes_ceil("0"), Some(0));
        assert_eq!(mebibytes_ceil("-1Mi"), None);
        assert_eq!(mebibytes_ceil("lots"), None);
    }

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse("500m"), Some(0.5));
        assert_eq!(parse("4"), Some(4.0));
        assert_eq!(parse("16Gi"), Some(16.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse("1e3"), Some(1000.0));
        assert_eq!(parse("1.5k"), Some(1500.0));
        assert_eq!(parse("abc"), None);
        assert_eq!(parse("5Xi"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("-"), None);
    }

    #[test]
    fn canonical_spellings_are_the_same() {
        assert!(same("1000m", "1"));
        assert!(same("0.5", "500m"));
        assert!(same("1024Mi", "1Gi"));
        assert!(!same("1", "2"));
        assert!(!same("x", "x"));
    }
}
