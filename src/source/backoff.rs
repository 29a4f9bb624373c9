//! The API watchers' retry backoff, reset only by real progress.
//!
//! kube-runtime's `default_backoff` resets on every `Ok` item of the watcher stream, and a
//! watcher that (re)lists first yields `Ok(Event::Init)` before its list request is even sent.
//! So while the API server is down every attempt started from the minimum delay again: measured
//! in `tests/e2e/reliability/api_faults.rs`, about one connection per second per watcher for the
//! whole outage instead of a growing interval. Here only an object or the end of a list
//! (`InitApply`, `InitDone`, `Apply`, `Delete`) counts as progress and resets the delay.
//!
//! Delays follow client-go's reflector: 800 ms doubling to 30 s, with jitter. The jitter adds at
//! most 20 % (client-go's may double a delay), so a watcher is back at most 36 s after the API
//! server returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::runtime::utils::Backoff;
use kube::runtime::watcher::Event;

const MIN: Duration = Duration::from_millis(800);
const MAX: Duration = Duration::from_secs(30);
/// The largest fraction of a delay added as jitter.
const JITTER: f64 = 0.2;

/// Exponential backoff for one watcher; see the module documentation.
#[derive(Debug)]
pub struct ProgressBackoff {
    attempt: u32,
    progress: Arc<AtomicBool>,
}

impl ProgressBackoff {
    /// A backoff and the flag that marks progress (set it with [`mark_progress`] as events go
    /// by, before the stream's backoff layer sees them).
    pub fn new() -> (Self, Arc<AtomicBool>) {
        let progress = Arc::new(AtomicBool::new(false));
        (
            Self {
                attempt: 0,
                progress: Arc::clone(&progress),
            },
            progress,
        )
    }

    /// The delay before retry `attempt` (0-based), without jitter.
    pub fn base_delay(attempt: u32) -> Duration {
        MIN.saturating_mul(2u32.saturating_pow(attempt.min(16)))
            .min(MAX)
    }
}

/// Sets `flag` when `event` is real progress (anything but the start of a list).
pub fn mark_progress<K>(
    flag: &AtomicBool,
    event: &Result<Event<K>, kube::runtime::watcher::Error>,
) {
    if matches!(event, Ok(e) if !matches!(e, Event::Init)) {
        flag.store(true, Ordering::Relaxed);
    }
}

impl Iterator for ProgressBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = Self::base_delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        // Sub-second clock noise is plenty for spreading retries of several nodes apart.
        let noise = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let fraction = f64::from(noise % 1000) / 1000.0;
        Some(base.mul_f64(1.0 + JITTER * fraction))
    }
}

impl Backoff for ProgressBackoff {
    fn reset(&mut self) {
        if self.progress.swap(false, Ordering::Relaxed) {
            self.attempt = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_bounded_jitter() {
        let (mut b, _) = ProgressBackoff::new();
        let delays: Vec<Duration> = (&mut b).take(10).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = ProgressBackoff::base_delay(u32::try_from(i).unwrap_or(u32::MAX));
            assert!(*d >= base && *d <= base.mul_f64(1.0 + JITTER), "{i}: {d:?}");
        }
        assert_eq!(ProgressBackoff::base_delay(0), MIN);
        assert_eq!(ProgressBackoff::base_delay(3), MIN * 8);
        assert_eq!(ProgressBackoff::base_delay(9), MAX);
        assert_eq!(ProgressBackoff::base_delay(u32::MAX), MAX);
    }

    #[test]
    fn resets_only_after_progress() {
        let (mut b, progress) = ProgressBackoff::new();
        b.next();
        b.next();
        b.next();
        // The start of a relist is not progress: the delay keeps growing.
        mark_progress::<()>(&progress, &Ok(Event::Init));
        b.reset();
        assert!(b.next().unwrap_or_default() >= MIN * 8);
        // An object is.
        mark_progress::<()>(&progress, &Ok(Event::InitDone));
        b.reset();
        assert!(b.next().unwrap_or_default() < MIN * 2);
    }
}
