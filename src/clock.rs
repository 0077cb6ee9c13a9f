//! Time, in one place: wall-clock seconds for token times and key expiry ([`Clock`]),
//! wall-clock milliseconds for the changelog's last poll, a monotonic millisecond clock for
//! cache TTLs ([`MillisClock`]), and the one saturating `Duration` → milliseconds conversion.
//! Clocks are functions so tests can move time.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch; a function so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Milliseconds on a monotonic clock; a function so tests can move time.
pub type MillisClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system's wall clock, in seconds since the epoch.
pub fn system_clock() -> Clock {
    Arc::new(now_secs)
}

/// Milliseconds since the clock was made, from [`Instant`] (never goes backwards).
pub fn monotonic_clock() -> MillisClock {
    let start = Instant::now();
    Arc::new(move || millis(start.elapsed()))
}

/// Seconds since the epoch now (0 on a clock set before 1970).
pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

/// Milliseconds since the epoch now (0 on a clock set before 1970).
pub fn now_millis() -> u64 {
    millis(since_epoch())
}

/// `d` in whole milliseconds, saturating at `u64::MAX` (about 584 million years).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}
