//! Budgets as users type them: the whole output file's size (`61865984`, `59MiB`, `0.06GB`) or an
//! average number of bits per weight over every tensor (`3.0bpw`).

use crate::error::{Error, Result};

/// A memory budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// The output file's size in bytes, header and alignment padding included.
    FileBytes(u64),
    /// Tensor data bytes × 8 / weights, over every tensor (norms and embeddings included): the
    /// bits per weight `pare convert` and `pare inspect` print.
    BitsPerWeight(f64),
}

impl std::str::FromStr for Budget {
    type Err = Error;

    fn from_str(s: &str) -> Result<Budget> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || {
            Error::Invalid(format!(
                "budget {s:?}: give bytes (61865984, 59MiB, 0.06GB, 512KiB) or bits per weight (3.0bpw)"
            ))
        };
        if let Some(num) = t.strip_suffix("bpw") {
            let v: f64 = num.trim().parse().map_err(|_| bad())?;
            if !(v.is_finite() && v > 0.0 && v <= 32.0) {
                return Err(Error::Invalid(format!(
                    "budget {s:?}: bits per weight must be in (0, 32]"
                )));
            }
            return Ok(Budget::BitsPerWeight(v));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let scale: f64 = match unit {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad()),
        };
        let v: f64 = num.parse().map_err(|_| bad())?;
        let bytes = (v * scale).floor();
        if !(1.0..1e18).contains(&bytes) {
            return Err(Error::Invalid(format!(
                "budget {s:?} must be at least 1 byte"
            )));
        }
        Ok(Budget::FileBytes(bytes as u64))
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::FileBytes(b) => write!(f, "{b} bytes ({:.2} MiB)", *b as f64 / 1048576.0),
            Budget::BitsPerWeight(v) => write!(f, "{v} bits per weight"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_type() {
        let p = |s: &str| s.parse::<Budget>().unwrap();
        assert_eq!(p("61865984"), Budget::FileBytes(61865984));
        assert_eq!(p("59MiB"), Budget::FileBytes(59 * 1024 * 1024));
        assert_eq!(p("0.06GB"), Budget::FileBytes(60_000_000));
        assert_eq!(p(" 512 KiB "), Budget::FileBytes(512 * 1024));
        assert_eq!(p("3.0bpw"), Budget::BitsPerWeight(3.0));
        assert_eq!(p("2.5BPW"), Budget::BitsPerWeight(2.5));
        for bad in [
            "",
            "MiB",
            "-3MiB",
            "3 parsecs",
            "0bpw",
            "40bpw",
            "nanbpw",
            "0",
            "0.1",
            "1.2.3MB",
        ] {
            assert!(bad.parse::<Budget>().is_err(), "{bad:?} parsed");
        }
    }
}
