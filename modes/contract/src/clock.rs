//! The clock seam: where monotonic time enters a decision, it comes through a [`Clock`], so a
//! test can hold time still or move it at will (a drain bound of fifteen minutes is tested in
//! microseconds). `std::time::Instant::now` is disallowed elsewhere (`clippy.toml`).
//!
//! The control plane's async code reads `tokio::time::Instant::now`, which is already such a
//! seam: tests pause and advance it. This one is for synchronous code (the modes). Where the
//! decision itself is a function that takes `now` (the userspace mode's affinity table), the
//! I/O around it reads [`SystemClock`] and the tests call the function with instants of their
//! own.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A source of monotonic time.
pub trait Clock: fmt::Debug + Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The machine's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[expect(
        clippy::disallowed_methods,
        reason = "the clock seam: the one place synchronous code reads the monotonic clock"
    )]
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to; clones share one time (a test keeps one clone and
/// hands the other to the code under test).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<Instant>>);

impl ManualClock {
    /// A clock standing at the system clock's present instant.
    pub fn new() -> Self {
        ManualClock(Arc::new(Mutex::new(SystemClock.now())))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_follow() {
        let clock = ManualClock::new();
        let seen_by_code = clock.clone();
        let t0 = seen_by_code.now();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(seen_by_code.now(), t0);
        clock.advance(Duration::from_secs(900));
        assert_eq!(seen_by_code.now() - t0, Duration::from_secs(900));
    }

    #[test]
    fn the_system_clock_moves_forward() {
        let t0 = SystemClock.now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(SystemClock.now() > t0);
    }
}
