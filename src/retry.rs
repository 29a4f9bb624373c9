//! Retry timing as plain values: how long to wait before the next attempt ([`Backoff`], fed a
//! random unit from [`Jitter`]) and what to log about a failure that keeps repeating
//! ([`Repeats`]). Nothing here reads a clock or sleeps: callers pass `now`, so every decision is
//! unit-tested without waiting. Used by the sync loop (a failing restore, `src/sync.rs`) and the
//! manifests source (a directory that cannot be read).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The largest fraction of a delay added as jitter (as the API watchers' backoff,
/// [`crate::source::backoff`]).
pub const JITTER: f64 = 0.2;

/// Exponential backoff: `initial` doubling per attempt up to `cap`, plus up to [`JITTER`] of
/// that as jitter. Jitter only ever adds, so retries are never faster than the doubling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The delay before the first retry.
    pub initial: Duration,
    /// The largest delay before jitter.
    pub cap: Duration,
}

impl Backoff {
    /// `initial` doubling to `cap` (a cap below `initial` is raised to it).
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap: cap.max(initial),
        }
    }

    /// The delay before retry `attempt` (0-based), without jitter.
    pub fn base(&self, attempt: u32) -> Duration {
        self.initial
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.cap)
    }

    /// The delay before retry `attempt` with jitter: `base × (1 + JITTER × unit)`, `unit` in
    /// [0, 1] (clamped).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let base = self.base(attempt);
        base + base.mul_f64(JITTER * unit)
    }
}

/// Where jitter comes from: a small pseudo-random generator (splitmix64), or a fixed value
/// (tests).
#[derive(Debug, Clone)]
pub enum Jitter {
    /// Pseudo-random units from this state.
    Random(u64),
    /// Always this unit.
    Fixed(f64),
}

impl Jitter {
    /// Seeded from the clock and the process id, so nodes that fail together spread apart.
    pub fn from_entropy() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        #[allow(
            clippy::cast_possible_truncation,
            reason = "only the low bits matter for a seed"
        )]
        let seed = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
        Self::Random(seed)
    }

    /// The next unit in [0, 1).
    pub fn next_unit(&mut self) -> f64 {
        match self {
            Self::Fixed(unit) => *unit,
            Self::Random(state) => {
                *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = *state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                #[allow(
                    clippy::cast_precision_loss,
                    reason = "53 random bits become the mantissa"
                )]
                let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
                unit
            }
        }
    }
}

/// How often a failure that keeps repeating with the same message is logged again.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What to log about one failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// The first failure of a run, or one whose message differs from the last logged: log it
    /// in full.
    Failed,
    /// The same failure again, [`SUMMARY_EVERY`] after the last line: log one line for all the
    /// attempts since then.
    StillFailing {
        /// Failed attempts in this run so far.
        failures: u32,
        /// Attempts since the last line that were not logged.
        unlogged: u32,
        /// How long the run of failures has lasted.
        failing_for: Duration,
    },
    /// The same failure again, soon after the last line: log it at debug level only.
    Quiet,
}

/// A run of failures that ended with a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Failed attempts before the success.
    pub failures: u32,
    /// From the first failure to the success.
    pub after: Duration,
}

/// Summarises a failure that repeats: the first occurrence and every change of message are
/// logged, repeats of the same message at most once per [`SUMMARY_EVERY`], and the end of the
/// run once.
#[derive(Debug, Clone, Default)]
pub struct Repeats {
    run: Option<Run>,
}

#[derive(Debug, Clone)]
struct Run {
    started: Instant,
    failures: u32,
    last_message: String,
    last_logged: Instant,
    unlogged: u32,
}

impl Repeats {
    /// A failure with `message` at `now`: what to log.
    pub fn failed(&mut self, message: &str, now: Instant) -> Say {
        let Some(run) = &mut self.run else {
            self.run = Some(Run {
                started: now,
                failures: 1,
                last_message: message.to_owned(),
                last_logged: now,
                unlogged: 0,
            });
            return Say::Failed;
        };
        run.failures += 1;
        if run.last_message != message {
            run.last_message = message.to_owned();
            run.last_logged = now;
            run.unlogged = 0;
            return Say::Failed;
        }
        if now.saturating_duration_since(run.last_logged) >= SUMMARY_EVERY {
            let say = Say::StillFailing {
                failures: run.failures,
                unlogged: run.unlogged,
                failing_for: now.saturating_duration_since(run.started),
            };
            run.last_logged = now;
            run.unlogged = 0;
            return say;
        }
        run.unlogged += 1;
        Say::Quiet
    }

    /// A success at `now`: the run of failures it ends, if any.
    pub fn succeeded(&mut self, now: Instant) -> Option<Recovered> {
        self.run.take().map(|run| Recovered {
            failures: run.failures,
            after: now.saturating_duration_since(run.started),
        })
    }

    /// Failed attempts in the current run (0 when the last attempt succeeded).
    pub fn failures(&self) -> u32 {
        self.run.as_ref().map_or(0, |r| r.failures)
    }

    /// When the current run of failures started.
    pub fn since(&self) -> Option<Instant> {
        self.run.as_ref().map(|r| r.started)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_doubles_to_the_cap_and_jitter_only_adds() {
        let b = Backoff::new(S, 5 * S);
        let bases: Vec<u64> = (0..6).map(|a| b.base(a).as_secs()).collect();
        assert_eq!(bases, [1, 2, 4, 5, 5, 5]);
        assert_eq!(b.base(u32::MAX), 5 * S);
        assert_eq!(b.delay(0, 0.0), S);
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(1200));
        assert_eq!(b.delay(5, 0.5), Duration::from_millis(5500));
        // Out-of-range units are clamped: never below the base, never above base × 1.2.
        assert_eq!(b.delay(1, -3.0), 2 * S);
        assert_eq!(b.delay(1, 7.0), Duration::from_millis(2400));
        assert_eq!(b.delay(1, f64::NAN), 2 * S);
        // A cap below the start is the start.
        assert_eq!(Backoff::new(S, Duration::ZERO).base(3), S);
    }

    #[test]
    fn attempts_in_a_window_are_bounded_by_the_doubling() {
        // With the largest jitter and with none, 15 s of a persistent failure under a 5 s cap
        // is 5 attempts (at 0, 1, 3, 7, 12 s without jitter).
        for unit in [0.0, 0.5, 1.0] {
            let b = Backoff::new(S, 5 * S);
            let (mut t, mut attempts, mut attempt) = (Duration::ZERO, 0, 0);
            while t <= 15 * S {
                attempts += 1;
                t += b.delay(attempt, unit);
                attempt += 1;
            }
            assert!((4..=5).contains(&attempts), "unit {unit}: {attempts}");
        }
    }

    #[test]
    fn jitter_units_are_in_range_and_spread() {
        let mut j = Jitter::Random(42);
        let units: Vec<f64> = (0..1000).map(|_| j.next_unit()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = units.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "{mean}");
        assert!(units.iter().any(|&u| u < 0.1) && units.iter().any(|&u| u > 0.9));
        assert_eq!(Jitter::Fixed(0.25).next_unit(), 0.25);
        // Different seeds give different sequences.
        assert_ne!(Jitter::Random(1).next_unit(), Jitter::Random(2).next_unit());
    }

    #[test]
    fn repeats_are_summarised_once_a_minute_and_changes_logged_at_once() {
        let t0 = Instant::now();
        let mut r = Repeats::default();
        assert_eq!(r.failures(), 0);
        assert_eq!(r.failed("lock held", t0), Say::Failed);
        // Every 5 s for a minute: quiet.
        for i in 1..12 {
            assert_eq!(r.failed("lock held", t0 + 5 * i * S), Say::Quiet, "{i}");
        }
        assert_eq!(
            r.failed("lock held", t0 + 60 * S),
            Say::StillFailing {
                failures: 13,
                unlogged: 11,
                failing_for: 60 * S
            }
        );
        assert_eq!(r.failed("lock held", t0 + 65 * S), Say::Quiet);
        // A different error is news.
        assert_eq!(r.failed("out of memory", t0 + 70 * S), Say::Failed);
        assert_eq!(r.failed("out of memory", t0 + 75 * S), Say::Quiet);
        assert_eq!(r.failures(), 16);
        assert_eq!(r.since(), Some(t0));
        assert_eq!(
            r.succeeded(t0 + 80 * S),
            Some(Recovered {
                failures: 16,
                after: 80 * S
            })
        );
        // A success without failures before it says nothing; the next failure starts anew.
        assert_eq!(r.succeeded(t0 + 81 * S), None);
        assert_eq!(r.failed("lock held", t0 + 90 * S), Say::Failed);
    }
}
