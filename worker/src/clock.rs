//! Wall-clock times as RFC 3339 text (results' `finished_at`, jobs' `submitted_at` and `deadline`).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{Result, WorkerError};

/// Now, in UTC.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Parses a job's time field, naming the field when it is not RFC 3339.
pub fn parse_time(field: &str, s: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| WorkerError::invalid(field, format!("`{s}` is not an RFC 3339 time: {e}")))
}

/// Seconds since the Unix epoch (fixed windows and ages; 0 on a clock before 1970).
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
