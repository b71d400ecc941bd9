//! Wall-clock time in unix seconds: the one clock every timestamp in the store and
//! the audit trail comes from.

use std::time::{SystemTime, UNIX_EPOCH};

/// Current time in unix seconds (0 if the system clock is before 1970).
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A monotonic clock in milliseconds, coarse (the kernel's tick, a few ms) and cheap
/// (no syscall): for bounds of a second or more checked on every read. Never 0.
pub(crate) fn coarse_ms() -> u64 {
    ms_of(libc::CLOCK_MONOTONIC_COARSE)
}

/// A monotonic clock in milliseconds that also counts the time the machine was
/// suspended (a VM paused, a laptop asleep): for a bound on how old what a process
/// answers may be, which a pause must not stretch. Never 0.
pub(crate) fn boot_ms() -> u64 {
    ms_of(libc::CLOCK_BOOTTIME)
}

#[allow(unsafe_code)]
fn ms_of(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the pointer it is given, which
    // points to a live local; both clocks used here exist on every Linux since
    // 2.6.39 (CLOCK_BOOTTIME) and 2.6.32 (CLOCK_MONOTONIC_COARSE).
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        // Never a clock that stands still (state that stays "fresh" for ever): the
        // precise one, from the first call.
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let ms = START.get_or_init(std::time::Instant::now).elapsed().as_millis();
        return u64::try_from(ms).unwrap_or(u64::MAX).saturating_add(1);
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let ms = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000;
    secs.saturating_mul(1000).saturating_add(ms).max(1)
}

/// The last second RFC 3339 can write: 9999-12-31T23:59:59Z.
pub const MAX_RFC3339: u64 = 253_402_300_799;

/// `t` (unix seconds) as RFC 3339 UTC, e.g. `2026-11-23T19:00:00Z`. Any `u64`
/// formats: a time past year 9999 (a provider's absurd `expires_in`) shows as the
/// last second RFC 3339 can write.
pub fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(t.min(MAX_RFC3339))).to_string()
}

/// Serialises a time both ways: `NAME` as RFC 3339 and `NAME_unix` as seconds, so
/// JSON readers get a readable time and an exact one.
pub(crate) fn serialize_time<S: serde::ser::SerializeStruct>(
    s: &mut S,
    name: &'static str,
    unix_name: &'static str,
    t: Option<u64>,
) -> Result<(), S::Error> {
    s.serialize_field(name, &t.map(rfc3339))?;
    s.serialize_field(unix_name, &t)
}
