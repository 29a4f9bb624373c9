//! Go's `time.Duration` text form, which kube-proxy's flags and `KubeProxyConfiguration` use:
//! parsing as `time.ParseDuration` ("30s", "1m0s", "1h30m", "500ms", "0") and printing as
//! `Duration.String()` ("30s", "1m0s", "15m0s", "24h0m0s"), so `--write-config-to` writes what
//! upstream would. Hand-written (about 100 lines): no crate matches Go's grammar exactly
//! (humantime accepts spaces and units Go rejects) and Go's printed form is part of the
//! interface.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration Go can hold (`math.MaxInt64` nanoseconds, about 292 years): anything
/// longer is refused as upstream refuses it, instead of overflowing.
const MAX_NANOS: u128 = i64::MAX as u128;

/// A duration read from or written as Go's text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// Zero.
    pub const ZERO: GoDuration = GoDuration(Duration::ZERO);

    /// Whole seconds.
    pub const fn secs(s: u64) -> GoDuration {
        GoDuration(Duration::from_secs(s))
    }

    /// Whether this is zero (Go's "unset" for most durations).
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl std::str::FromStr for GoDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse(s).map(GoDuration)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(self.0))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a Go duration. Negative durations are refused here (no kube-proxy duration may be
/// negative; upstream refuses them in validation), as are durations Go cannot hold.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration (use e.g. 30s, 1m0s, 500ms)".into());
    }
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let bad = || format!("{text:?} is not a duration (use e.g. 30s, 1m0s, 500ms)");
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
                f.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(format!(
                    "{text:?} has a number without a unit (use s, m, h, ms, ...)"
                ));
            }
            other => return Err(format!("{text:?} has unknown unit {other:?}")),
        };
        let too_long = || format!("{text:?} is longer than the longest duration (about 292 years)");
        let whole: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| too_long())?
        };
        let mut nanos = whole.checked_mul(scale).ok_or_else(too_long)?;
        // The fraction, exactly: digits beyond the unit's nanosecond resolution are dropped,
        // as Go does.
        let mut place = scale;
        for digit in frac_part.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            nanos += u128::from(digit - b'0') * place;
        }
        total = total.checked_add(nanos).ok_or_else(too_long)?;
        if total > MAX_NANOS {
            return Err(too_long());
        }
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad())?;
    // The remainder is below 10^9, so it fits.
    let sub = u32::try_from(total % 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, sub))
}

/// Formats a duration as Go's `Duration.String()` does.
pub fn format(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000_000_000 {
        return match ns {
            n if n < 1_000 => format!("{n}ns"),
            n if n < 1_000_000 => format!("{}µs", decimal(n, 1_000)),
            n => format!("{}ms", decimal(n, 1_000_000)),
        };
    }
    let secs = ns / 1_000_000_000;
    let seconds = decimal(ns % 60_000_000_000, 1_000_000_000);
    match (secs / 3600, (secs % 3600) / 60) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

/// `value / unit` in decimal with the fraction's trailing zeros removed ("1.5", "10").
fn decimal(value: u128, unit: u128) -> String {
    let (whole, frac) = (value / unit, value % unit);
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        for (text, nanos) in [
            ("30s", 30_000_000_000u128),
            ("1m0s", 60_000_000_000),
            ("1h30m", 5_400_000_000_000),
            ("500ms", 500_000_000),
            ("0", 0),
            ("0s", 0),
            ("1.5s", 1_500_000_000),
            (".5s", 500_000_000),
            ("2h45m10s", 9_910_000_000_000),
            ("1us", 1_000),
            ("1µs", 1_000),
            ("+3s", 3_000_000_000),
            ("1.0000000001s", 1_000_000_000),
        ] {
            assert_eq!(parse(text).map(|d| d.as_nanos()), Ok(nanos), "{text}");
        }
        for bad in ["", "30", "abc", "1x", "-1s", "s", ".s", "1..5s", "1 s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_too_long_for_go_are_refused_not_overflowed() {
        for text in [
            "5000000000000000h",
            "2562048h",
            "340282366920938463463374607431768211456ns",
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains("longest"), "{err}");
        }
        assert!(parse("2562047h").is_ok());
    }

    #[test]
    fn printed_as_go_prints() {
        for (secs_f, want) in [
            (30.0, "30s"),
            (60.0, "1m0s"),
            (900.0, "15m0s"),
            (86_400.0, "24h0m0s"),
            (3_600.0, "1h0m0s"),
            (1.5, "1.5s"),
            (0.5, "500ms"),
            (0.0015, "1.5ms"),
            (90.25, "1m30.25s"),
            (3_661.0, "1h1m1s"),
        ] {
            assert_eq!(format(Duration::from_secs_f64(secs_f)), want, "{secs_f}");
        }
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_nanos(7)), "7ns");
        assert_eq!(format(Duration::from_nanos(1_500)), "1.5µs");
        for text in ["30s", "1m0s", "24h0m0s", "1.5s", "500ms", "1h0m0.001s"] {
            assert_eq!(format(parse(text).expect(text)), text);
        }
    }
}
