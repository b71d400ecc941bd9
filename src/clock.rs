//! Wall-clock time in unix seconds: the one clock every timestamp in the store and
//! the audit trail comes from.

use std::time::{SystemTime, UNIX_EPOCH};

/// Current time in unix seconds (0 if the system clock is before 1970).
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
