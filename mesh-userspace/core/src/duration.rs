//! Durations as operators write them in flags and manifests.

use std::time::Duration;

/// A duration that cannot be read, and how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration such as 30s, 10m, 24h")]
    NotANumber(String),
    #[error("`{0}`: the unit must be s, m, h or d")]
    Unit(String),
    #[error("`{0}` must be longer than zero")]
    Zero(String),
    #[error("`{0}` is longer than any timer can wait")]
    TooLong(String),
}

/// `90s`, `30m`, `24h`, `2d` (one number, one unit).
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| DurationError::NotANumber(text.to_owned()))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(DurationError::Unit(text.to_owned())),
    };
    let secs = n
        .checked_mul(scale)
        .ok_or_else(|| DurationError::TooLong(text.to_owned()))?;
    if secs == 0 {
        return Err(DurationError::Zero(text.to_owned()));
    }
    Ok(Duration::from_secs(secs))
}

/// A Gateway API duration: one to four `<number><unit>` parts, units `h`,
/// `m`, `s`, `ms` (`1h`, `500ms`, `1m30s`, `0s`).
pub fn gateway(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.as_bytes().first()? {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return None,
            }
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).ok()?;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}
