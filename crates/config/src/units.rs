//! Durations and byte sizes as people write them in config files.

use std::time::Duration;

pub(crate) const DURATION_FORM: &str = "expected a number followed by ms, s, m, h or d";
pub(crate) const SIZE_FORM: &str = "expected a number of bytes, optionally followed by a unit: \
     B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB, K, M, G, T (powers of 1024)";

/// Parses `300s`, `5m`, `250ms`, `1h30m`, `1d` or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| format!("invalid duration {text:?}: {why}");
    let s = text.trim();
    if s.is_empty() {
        return Err(invalid(&format!("empty; {DURATION_FORM}")));
    }
    if s.starts_with('-') {
        return Err(invalid("must not be negative"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| invalid("too large"))?;
        return Ok(Duration::from_secs(secs));
    }
    let mut millis: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid(DURATION_FORM));
        }
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid(DURATION_FORM)),
        };
        let n: u64 = number.parse().map_err(|_| invalid("too large"))?;
        millis = n
            .checked_mul(scale)
            .and_then(|part| millis.checked_add(part))
            .ok_or_else(|| invalid("too large"))?;
        rest = tail.trim_start();
    }
    Ok(Duration::from_millis(millis))
}

/// Canonical form used when dumping the config: whole seconds as `"300s"`, otherwise
/// milliseconds, so the output always parses back to the same value.
pub(crate) fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Parses `50MB`, `64MiB`, `1.5GiB`, `512K` or a bare number of bytes.
///
/// Single-letter units (`K`, `M`, `G`, `T`) are binary because that is what people almost
/// always mean for memory budgets; write `KB`/`MB`/... for powers of 1000.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = |why: &str| format!("invalid size {text:?}: {why}");
    let s = text.trim();
    if s.is_empty() {
        return Err(invalid(&format!("empty; {SIZE_FORM}")));
    }
    if s.starts_with('-') {
        return Err(invalid("must not be negative"));
    }
    let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int_part, rest) = s.split_at(int_len);
    let (frac_part, rest) = match rest.strip_prefix('.') {
        Some(after) => {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            after.split_at(n)
        }
        None => ("", rest),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(invalid(SIZE_FORM));
    }
    let unit = rest.trim_start();
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(invalid(SIZE_FORM)),
    };
    // u128 arithmetic cannot overflow for any string short enough to be a sane size,
    // and longer digit strings are rejected as too large below.
    if int_part.len() > 30 || frac_part.len() > 30 {
        return Err(invalid("too large"));
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| invalid("too large"))?
    };
    let mut bytes = int * multiplier;
    if !frac_part.is_empty() {
        let frac: u128 = frac_part.parse().map_err(|_| invalid("too large"))?;
        let denominator = 10u128.pow(frac_part.len() as u32);
        let scaled = frac * multiplier;
        if !scaled.is_multiple_of(denominator) {
            return Err(invalid("is not a whole number of bytes"));
        }
        bytes += scaled / denominator;
    }
    u64::try_from(bytes).map_err(|_| invalid("too large"))
}

/// Human-readable exact rendering for messages: the largest unit that divides evenly.
pub(crate) fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 8] = [
        (1 << 40, "TiB"),
        (1_000_000_000_000, "TB"),
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
        (1 << 10, "KiB"),
        (1_000, "KB"),
    ];
    if bytes == 0 {
        return "0B".to_owned();
    }
    for (scale, unit) in UNITS {
        if bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("42"), Ok(Duration::from_secs(42)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("5x").unwrap_err(),
            "invalid duration \"5x\": expected a number followed by ms, s, m, h or d"
        );
        for bad in ["", "  ", "s", "1.5s", "5 s x", "h1", "5S", "1m30"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(
            parse_duration("99999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_duration("999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn duration_round_trip() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(300),
            Duration::from_millis(1500),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(300)), "300s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("50mb"), Ok(50_000_000));
        assert_eq!(parse_size("50MiB"), Ok(50 << 20));
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1.5MiB"), Ok(1_572_864));
        assert_eq!(parse_size("0.5KB"), Ok(500));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("100B"), Ok(100));
        assert!(
            parse_size("1.5B")
                .unwrap_err()
                .contains("not a whole number of bytes")
        );
        assert!(parse_size("-1MB").unwrap_err().contains("negative"));
        assert!(
            parse_size("50XB")
                .unwrap_err()
                .contains("expected a number")
        );
        assert!(parse_size("MB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("1e6").is_err());
        assert!(parse_size("20000000TiB").unwrap_err().contains("too large"));
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215u64 << 40));
    }

    #[test]
    fn size_formatting() {
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(50_000_000), "50MB");
        assert_eq!(format_size(1_500), "1500B");
        assert_eq!(format_size(3 << 10), "3KiB");
        for n in [1u64, 999, 1 << 20, 12_345_678, 7_000_000_000] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }
}
