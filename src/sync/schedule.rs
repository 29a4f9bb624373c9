//! When the sync loop syncs next: the loop's timers as one value that takes `now` and returns
//! the next deadline, so the timing rules are tested without a runtime.
//!
//! - Changes sync at most once per `min_sync_period` after the last sync (bursts coalesce).
//! - A periodic sync runs `sync_period` after the last periodic, full or first sync.
//! - A failed sync is retried with [`Backoff`]: 1 s doubling to `sync_period`, plus up to 20 %
//!   jitter. While retrying, the retry is the only deadline: a periodic sync that fell due
//!   during the failure does not pull the retry forward (issue #20: the periodic deadline only
//!   moved on success, so a past deadline woke the loop at once, about once a millisecond).
//!   The retry syncs everything, changes included.

use std::time::Duration;

use tokio::time::Instant;

use crate::retry::Backoff;

/// The first retry waits this long.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// What a sync that falls due at `now` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The periodic deadline has passed: probe for drift.
    pub periodic: bool,
    /// The full-sync period has passed since the last full sync (or there never was one).
    pub full_period_elapsed: bool,
}

/// The loop's timers. See the module documentation.
#[derive(Debug, Clone)]
pub struct Schedule {
    min_sync_period: Duration,
    sync_period: Duration,
    full_sync_period: Duration,
    backoff: Backoff,
    /// A sync for changes (or the first sync).
    next_sync: Option<Instant>,
    /// The next periodic sync.
    next_periodic: Option<Instant>,
    last_sync: Option<Instant>,
    last_full: Option<Instant>,
    /// After a failure: when to retry, and how many retries came before.
    retry: Option<(Instant, u32)>,
}

impl Schedule {
    /// Timers for these periods; nothing is due until [`Schedule::initialized`].
    pub fn new(
        min_sync_period: Duration,
        sync_period: Duration,
        full_sync_period: Duration,
    ) -> Self {
        Self {
            min_sync_period,
            sync_period,
            full_sync_period,
            backoff: Backoff::new(FIRST_RETRY.max(min_sync_period), sync_period),
            next_sync: None,
            next_periodic: None,
            last_sync: None,
            last_full: None,
            retry: None,
        }
    }

    /// The next deadline (none: wait for changes).
    pub fn deadline(&self) -> Option<Instant> {
        if let Some((at, _)) = self.retry {
            return Some(at);
        }
        match (self.next_sync, self.next_periodic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Both lists arrived: the first sync is due now.
    pub fn initialized(&mut self, now: Instant) {
        self.next_sync = Some(now);
    }

    /// Changes are pending: sync at the earliest `min_sync_period` after the last sync. A sync
    /// already scheduled (or a retry) takes them along.
    pub fn changed(&mut self, now: Instant) {
        if self.next_sync.is_none() && self.retry.is_none() {
            let earliest = self.last_sync.map_or(now, |t| t + self.min_sync_period);
            self.next_sync = Some(earliest.max(now));
        }
    }

    /// What the sync that runs at `now` is.
    pub fn due(&self, now: Instant) -> Due {
        Due {
            periodic: self.next_periodic.is_some_and(|t| t <= now),
            full_period_elapsed: self
                .last_full
                .is_none_or(|t| t + self.full_sync_period <= now),
        }
    }

    /// The sync that started as `due` succeeded at `now` (full: it read the kernel back).
    pub fn succeeded(&mut self, now: Instant, full: bool, due: Due) {
        self.last_sync = Some(now);
        self.next_sync = None;
        self.retry = None;
        if full {
            self.last_full = Some(now);
        }
        if full || due.periodic || self.next_periodic.is_none() {
            self.next_periodic = Some(now + self.sync_period);
        }
    }

    /// The sync failed at `now`: the retry is scheduled with backoff (`unit` in [0, 1] picks the
    /// jitter). Returns the delay.
    pub fn failed(&mut self, now: Instant, unit: f64) -> Duration {
        let attempt = self.retry.map_or(0, |(_, n)| n);
        let delay = self.backoff.delay(attempt, unit);
        self.retry = Some((now + delay, attempt.saturating_add(1)));
        self.next_sync = None;
        delay
    }

    /// Whether the last sync failed (a retry is scheduled).
    pub fn retrying(&self) -> bool {
        self.retry.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn schedule() -> Schedule {
        Schedule::new(S, 5 * S, 3600 * S)
    }

    #[test]
    fn nothing_before_the_lists_then_the_first_sync_at_once() {
        let t0 = Instant::now();
        let mut s = schedule();
        assert_eq!(s.deadline(), None);
        s.changed(t0);
        // Changes before the first sync wait for it (the loop only calls `changed` after
        // `initialized`; a first sync is due at once either way).
        let mut s = schedule();
        s.initialized(t0);
        assert_eq!(s.deadline(), Some(t0));
        let due = s.due(t0);
        assert_eq!(
            due,
            Due {
                periodic: false,
                full_period_elapsed: true
            }
        );
        s.succeeded(t0, true, due);
        assert_eq!(s.deadline(), Some(t0 + 5 * S), "the next periodic sync");
    }

    #[test]
    fn changes_coalesce_within_the_min_sync_period() {
        let t0 = Instant::now();
        let mut s = schedule();
        s.initialized(t0);
        s.succeeded(t0, true, s.due(t0));
        s.changed(t0 + S / 10);
        assert_eq!(s.deadline(), Some(t0 + S));
        s.changed(t0 + S / 2);
        assert_eq!(
            s.deadline(),
            Some(t0 + S),
            "a second change joins the first"
        );
        s.succeeded(t0 + S, false, s.due(t0 + S));
        assert_eq!(s.deadline(), Some(t0 + 5 * S));
        s.changed(t0 + 3 * S);
        assert_eq!(
            s.deadline(),
            Some(t0 + 3 * S),
            "past the min period: at once"
        );
    }

    #[test]
    fn periodic_syncs_and_the_full_period() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S, 5 * S, 12 * S);
        s.initialized(t0);
        s.succeeded(t0, true, s.due(t0));
        let due = s.due(t0 + 5 * S);
        assert_eq!(
            due,
            Due {
                periodic: true,
                full_period_elapsed: false
            }
        );
        s.succeeded(t0 + 5 * S, false, due);
        assert_eq!(s.deadline(), Some(t0 + 10 * S));
        assert!(s.due(t0 + 15 * S).full_period_elapsed);
    }

    /// Issue #20 item 1: a failure that lasts past the periodic deadline must not make the loop
    /// spin. Simulates the loop: wake at the deadline, fail, schedule; count the wake-ups.
    #[test]
    fn a_persistent_failure_is_retried_with_backoff_not_at_every_wakeup() {
        for unit in [0.0, 1.0] {
            let t0 = Instant::now();
            let mut s = schedule();
            s.initialized(t0);
            s.succeeded(t0, true, s.due(t0));
            // A change at 1 s; from then on every sync fails, for a minute.
            s.changed(t0 + S);
            let mut wakeups = Vec::new();
            while let Some(t) = s.deadline() {
                if t > t0 + 61 * S {
                    break;
                }
                wakeups.push(t.duration_since(t0));
                s.failed(t, unit);
            }
            let gaps: Vec<Duration> = wakeups.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(
                gaps.iter().all(|&g| g >= S),
                "unit {unit}: retries faster than 1 s: {gaps:?}"
            );
            // 1, 2, 4, then 5 s (+ jitter): 1 + 3 + ~10 in a minute.
            assert!(
                (12..=15).contains(&wakeups.len()),
                "unit {unit}: {} attempts in a minute: {wakeups:?}",
                wakeups.len()
            );
            let base: Vec<Duration> = gaps.iter().take(4).copied().collect();
            let want: Vec<Duration> = [1, 2, 4, 5]
                .iter()
                .map(|&n| (n * S).mul_f64(1.0 + crate::retry::JITTER * unit))
                .collect();
            assert_eq!(base, want, "unit {unit}");
            // Recovery: back to the periodic rhythm, and the backoff starts over.
            let now = t0 + 62 * S;
            assert!(s.retrying());
            let due = s.due(now);
            assert!(due.periodic);
            s.succeeded(now, true, due);
            assert!(!s.retrying());
            assert_eq!(s.deadline(), Some(now + 5 * S));
            assert_eq!(s.failed(now + 6 * S, 0.0), S);
        }
    }

    #[test]
    fn changes_during_a_retry_wait_for_it() {
        let t0 = Instant::now();
        let mut s = schedule();
        s.initialized(t0);
        assert_eq!(s.failed(t0, 0.0), S);
        s.changed(t0 + S / 2);
        assert_eq!(s.deadline(), Some(t0 + S));
    }
}
