//! The circuit breaker in front of the relationship backend: after `failures` consecutive
//! failures it opens and callers fail fast (no request, no timeout to wait for) for
//! `open_for`; then it admits one probe at a time (half-open) until a probe succeeds.
//!
//! A tiny `std::sync::Mutex` guards the state: every critical section is a few field
//! reads and writes, never an await, so contention costs nanoseconds next to a network call.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::BackendError;
use crate::clock::millis;

/// What the breaker is doing now, for metrics and readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail fast until the open period ends.
    Open,
    /// The open period ended: one probe at a time is let through.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug)]
struct Inner {
    /// Consecutive failures while closed.
    failures: u32,
    /// `Some` while open or half-open: when the breaker (last) opened.
    opened_at: Option<Instant>,
    /// When the current half-open probe was admitted, if one is out.
    probe_since: Option<Instant>,
    /// The cause of the most recent failure, quoted in fast failures.
    last: String,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// `failures` consecutive failures open the breaker for `open_for`. `failures == 0`
    /// disables it (it never opens).
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Self {
            threshold: failures,
            open_for,
            inner: Mutex::new(Inner {
                failures: 0,
                opened_at: None,
                probe_since: None,
                last: String::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding this lock cannot leave the fields inconsistent
        // (each is written whole), so a poisoned lock is still good to use.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go out now. Open: fails fast with the last cause. After
    /// `open_for`, exactly one probe is admitted; the others keep failing fast until it
    /// reports [`success`](Self::success) or [`failure`](Self::failure).
    pub fn admit(&self) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let Some(opened_at) = inner.opened_at else {
            return Ok(());
        };
        let now = Instant::now();
        let open_until = opened_at + self.open_for;
        if now < open_until {
            return Err(BackendError::CircuitOpen {
                last: inner.last.clone(),
                retry_in_ms: millis(open_until - now),
            });
        }
        match inner.probe_since {
            // A probe whose caller never reported back (its request was cancelled) would
            // otherwise hold the breaker half-open forever: after another `open_for`,
            // consider it lost and admit a new one.
            Some(since) if now.duration_since(since) < self.open_for => {
                Err(BackendError::CircuitOpen {
                    last: inner.last.clone(),
                    retry_in_ms: millis(self.open_for - now.duration_since(since)),
                })
            }
            _ => {
                inner.probe_since = Some(now);
                Ok(())
            }
        }
    }

    /// The backend answered: close (from half-open) or reset the failure streak.
    pub fn success(&self) {
        let mut inner = self.lock();
        inner.failures = 0;
        inner.opened_at = None;
        inner.probe_since = None;
    }

    /// The backend failed (unreachable, timed out, 5xx). Opens the breaker at the threshold;
    /// a failed probe re-opens it for another `open_for`.
    pub fn failure(&self, cause: &str) {
        if self.threshold == 0 {
            return;
        }
        let mut inner = self.lock();
        cause.clone_into(&mut inner.last);
        let now = Instant::now();
        match inner.opened_at {
            None => {
                inner.failures = inner.failures.saturating_add(1);
                if inner.failures >= self.threshold {
                    inner.opened_at = Some(now);
                }
            }
            // Calls admitted before the breaker opened may fail late; they must not extend
            // the open period. Only a failure once the period is over (the probe's) re-opens.
            Some(opened_at) if now >= opened_at + self.open_for => {
                inner.opened_at = Some(now);
                inner.probe_since = None;
            }
            Some(_) => {}
        }
    }

    /// Open only while the open period lasts: once it ends the breaker reports half-open
    /// even before a call arrives, so readiness recovers without traffic (a pod taken out of
    /// rotation would otherwise never receive the call that probes).
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.opened_at {
            None => BreakerState::Closed,
            Some(at) if at.elapsed() < self.open_for => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// The cause of the most recent failure (empty if none yet).
    pub fn last_failure(&self) -> String {
        self.lock().last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_millis(60);

    fn open_breaker() -> CircuitBreaker {
        let b = CircuitBreaker::new(3, OPEN_FOR);
        for _ in 0..3 {
            b.admit().unwrap();
            b.failure("connection refused");
        }
        b
    }

    #[test]
    fn opens_after_consecutive_failures() {
        let b = CircuitBreaker::new(3, OPEN_FOR);
        b.failure("x");
        b.failure("x");
        b.success(); // the streak is broken
        b.failure("x");
        b.failure("x");
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit().is_ok());
        b.failure("connection refused");
        assert_eq!(b.state(), BreakerState::Open);
        match b.admit() {
            Err(BackendError::CircuitOpen { last, retry_in_ms }) => {
                assert_eq!(last, "connection refused");
                assert!(retry_in_ms <= 60, "{retry_in_ms}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn half_open_admits_one_probe_and_closes_on_success() {
        let b = open_breaker();
        std::thread::sleep(OPEN_FOR + Duration::from_millis(5));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit().is_ok(), "the probe");
        for _ in 0..5 {
            assert!(matches!(b.admit(), Err(BackendError::CircuitOpen { .. })));
        }
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit().is_ok());
        assert!(b.admit().is_ok());
    }

    #[test]
    fn failed_probe_reopens() {
        let b = open_breaker();
        std::thread::sleep(OPEN_FOR + Duration::from_millis(5));
        assert!(b.admit().is_ok());
        b.failure("timed out after 500ms");
        assert_eq!(b.state(), BreakerState::Open);
        match b.admit() {
            Err(BackendError::CircuitOpen { last, .. }) => {
                assert_eq!(last, "timed out after 500ms")
            }
            other => panic!("{other:?}"),
        }
        std::thread::sleep(OPEN_FOR + Duration::from_millis(5));
        assert!(b.admit().is_ok(), "a new probe after another open period");
    }

    #[test]
    fn late_failures_do_not_extend_the_open_period() {
        let b = open_breaker();
        std::thread::sleep(OPEN_FOR / 2);
        b.failure("straggler admitted before opening");
        std::thread::sleep(OPEN_FOR / 2 + Duration::from_millis(10));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn lost_probe_is_replaced() {
        let b = open_breaker();
        std::thread::sleep(OPEN_FOR + Duration::from_millis(5));
        assert!(b.admit().is_ok()); // this caller never reports back
        assert!(b.admit().is_err());
        std::thread::sleep(OPEN_FOR + Duration::from_millis(5));
        assert!(b.admit().is_ok());
    }

    #[test]
    fn zero_threshold_never_opens() {
        let b = CircuitBreaker::new(0, OPEN_FOR);
        for _ in 0..100 {
            b.failure("x");
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit().is_ok());
    }
}
