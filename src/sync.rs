//! The sync loop: the one owner of the cache and the mode.
//!
//! Updates from the source are folded into the cache as they arrive; a sync runs at most once
//! per `min_sync_period` (so bursts coalesce), at least once per `sync_period` (probing the mode
//! for drift, such as a flushed table, and then reading the kernel back and repairing it), with a
//! full read-back at least once per `full_sync_period` whatever the probe says, never before
//! Services and EndpointSlices have been listed once, and after a failure again with backoff (and
//! full). A failed sync is retried with backoff (1 s doubling to `sync_period`, with jitter; see
//! [`Schedule`]), and a failure that repeats is logged once, then summarised once a minute.
//! Time comes from tokio's clock, so tests run with a paused clock.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use kproxy_contract::{IpFamily, Mode, ModeError, Plan as _, PlanStats, ProxyState};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cache::{ClusterCache, Touched};
use crate::config::Config;
use crate::conntrack::{CleanupReport, ConntrackTable};
use crate::desired_state::{self, BuildContext};
use crate::health::Health;
use crate::node;
use crate::retry::{Jitter, Repeats, Say};
use crate::source::{SourceStatus, Update};

mod events;
mod first_sync;
mod schedule;
pub use events::{Event, Follower, Outcome};
pub use first_sync::{FirstSync, Gate};
pub use schedule::{Due, Schedule};

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Minimum time between two syncs.
    pub min_sync_period: Duration,
    /// Time between two periodic syncs; each first probes the mode for drift (canary).
    pub sync_period: Duration,
    /// Maximum time between two full syncs (reading the kernel back), drift or not. Upstream's
    /// `FullSyncPeriod` is an hour.
    pub full_sync_period: Duration,
    /// Print plans; apply nothing.
    pub dry_run: bool,
    /// Stop after the first complete sync.
    pub once: bool,
    /// Delete stale UDP/SCTP conntrack entries after every applied sync (see
    /// [`crate::conntrack`]). On for the kernel modes (iptables, nftables), whose rules NAT only
    /// a flow's first packet; a mode that proxies in userspace has no such entries. Needs a table
    /// ([`SyncLoop::with_conntrack`]); never runs in `--dry-run`.
    pub conntrack_cleanup: bool,
    /// How long the first sync waits for this node's Node to be listed with an address (zero:
    /// not at all). See [`FirstSync`].
    pub node_wait: Duration,
}

/// What one sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// Whether the live kernel state was read back (full sync).
    pub full: bool,
    /// Service ports in the desired state.
    pub service_ports: usize,
    /// Invalid objects left out.
    pub skipped: usize,
    /// What the plan changed.
    pub stats: PlanStats,
    /// Time spent in the whole sync (including conntrack cleanup).
    pub duration: Duration,
    /// What conntrack cleanup did: `None` when it did not run (dry run, disabled) or failed
    /// (logged as a warning; a cleanup failure never fails the sync).
    pub conntrack: Option<CleanupReport>,
}

impl SyncReport {
    /// Stale conntrack entries this sync deleted
    /// (`kubeproxy_conntrack_reconciler_deleted_entries_total`).
    pub fn conntrack_deleted(&self) -> usize {
        self.conntrack.as_ref().map_or(0, |c| c.deleted)
    }
}

/// Why the loop stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// `--once`: the first complete sync succeeded.
    Once,
    /// A shutdown signal arrived (the current sync, if any, finished first).
    Shutdown,
}

/// The loop's state. Generic over the mode: static dispatch, one owner, no locks.
pub struct SyncLoop<M: Mode> {
    mode: M,
    /// What the last render hands to the next (the mode's render is pure; the loop keeps this).
    memo: M::Memo,
    cache: ClusterCache,
    config: Arc<Config>,
    options: SyncOptions,
    /// What we believe the kernel holds: the last applied rules. `None` forces a full sync.
    believed: Option<M::Rules>,
    /// The last successful build; with `pending`, what an incremental build starts from.
    previous: Option<Arc<desired_state::Built>>,
    /// Skipped-object messages currently in effect, so each is logged once.
    reported: BTreeSet<String>,
    /// Changes since the last successful sync.
    pending: Touched,
    /// Failed applies in a row; after two, the next plan rewrites everything the mode owns.
    failures: u32,
    /// Where dry-run plans go.
    out: Box<dyn std::io::Write + Send>,
    /// What /healthz reports.
    health: Health,
    /// The conntrack table cleanup works on (none: no cleanup).
    conntrack: Option<Box<dyn ConntrackTable + Send>>,
    /// Who follows what the loop does (metrics, the admin socket, health-check node ports, ...).
    followers: Vec<Box<dyn Follower>>,
    /// Spreads retries of failed syncs.
    jitter: Jitter,
}

/// How long each phase of one sync took (the `sync complete` log line's fields).
#[derive(Debug, Clone, Copy, Default)]
struct PhaseTimes {
    build: Duration,
    render: Duration,
    plan: Duration,
    apply: Duration,
}

/// A sync before it reaches the kernel: the build, its rendering and the plan.
struct Prepared<M: Mode> {
    built: desired_state::Built,
    desired: M::Rules,
    plan: M::Plan,
    times: PhaseTimes,
}

/// A sync after the kernel took it (or `--dry-run` printed it).
struct Committed {
    built: desired_state::Built,
    stats: PlanStats,
    times: PhaseTimes,
    conntrack: Option<CleanupReport>,
}

impl<M: Mode> SyncLoop<M> {
    /// A loop around `mode`.
    pub fn new(mode: M, config: Arc<Config>, options: SyncOptions) -> Self {
        Self {
            mode,
            memo: M::Memo::default(),
            cache: ClusterCache::measuring_after(std::time::SystemTime::now()),
            config,
            believed: None,
            failures: 0,
            previous: None,
            reported: BTreeSet::new(),
            pending: Touched::default(),
            out: Box::new(std::io::stdout()),
            health: Health::new(options.sync_period),
            conntrack: None,
            followers: Vec::new(),
            jitter: Jitter::from_entropy(),
            options,
        }
    }

    /// Adds a collaborator that follows every [`Event`] of the loop, in the order added.
    pub fn follow(mut self, follower: impl Follower + 'static) -> Self {
        self.followers.push(Box::new(follower));
        self
    }

    /// Tells every follower.
    fn tell(&mut self, event: &Event<'_>) {
        for f in &mut self.followers {
            f.on(event);
        }
    }

    /// Reports to this health state (shared with the HTTP server).
    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Takes retry jitter from `jitter` (tests fix it).
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sends dry-run output somewhere other than stdout (tests).
    pub fn with_output(mut self, out: Box<dyn std::io::Write + Send>) -> Self {
        self.out = out;
        self
    }

    /// Cleans stale conntrack entries in `table` after each applied sync, when
    /// [`SyncOptions::conntrack_cleanup`] is on.
    pub fn with_conntrack(mut self, table: Box<dyn ConntrackTable + Send>) -> Self {
        self.conntrack = Some(table);
        self
    }

    /// The mode (tests inspect fakes through it).
    pub fn mode(&self) -> &M {
        &self.mode
    }

    /// What the sources have said so far, for [`FirstSync::gate`].
    fn listed(&self) -> first_sync::Listed {
        first_sync::Listed {
            services_and_slices: self.cache.is_synced(),
            node: self.cache.node_listed(),
            node_address: !node::node_ips(self.cache.node().map(|n| &**n)).is_empty(),
        }
    }

    /// Tells /healthz and the followers that changes wait for a sync.
    fn mark_queued(&mut self) {
        let now = std::time::SystemTime::now();
        self.health.queued(now);
        self.tell(&Event::Queued { at: now });
    }

    /// Schedules the first sync when its gate is open, and returns whether it did (then the
    /// changes that came meanwhile, `queued_early`, count as queued); otherwise keeps the
    /// gate's own deadline (the end of the Node wait) in `gate_deadline`.
    fn open_first_sync(
        &mut self,
        first: &FirstSync,
        schedule: &mut Schedule,
        gate_deadline: &mut Option<Instant>,
        queued_early: &mut bool,
    ) -> bool {
        let now = Instant::now();
        let gate = first.gate(self.listed(), now);
        if let Gate::Wait(deadline) = gate {
            *gate_deadline = deadline;
            return false;
        }
        *gate_deadline = None;
        self.starting_first_sync(gate, first);
        schedule.initialized(now);
        if std::mem::take(queued_early) {
            self.mark_queued();
        }
        true
    }

    /// Logs why the first sync runs now, and what it runs without.
    fn starting_first_sync(&self, gate: Gate, first: &FirstSync) {
        if gate == Gate::WithoutNode {
            tracing::warn!(
                node = %self.config.hostname,
                waited_ms = millis(first.node_wait()),
                listed = self.cache.node_listed(),
                "the Node was not seen with an address in time (not registered yet, no \
                 addresses yet, or not readable: kproxy needs to list and watch nodes); first \
                 sync without its addresses and zone, which are synced when it arrives"
            );
        } else {
            tracing::info!("services and endpoint slices listed; first sync");
        }
        if self.config.detect_local == crate::config::LocalDetectMode::NodeCidr
            && crate::node::pod_cidrs(self.cache.node().map(|n| &**n)).is_empty()
        {
            tracing::warn!(
                node = %self.config.hostname,
                "--detect-local-mode=NodeCIDR, but the Node has no spec.podCIDRs \
                 yet: no local-traffic detector until they are set (ClusterIP \
                 traffic is not masqueraded meanwhile, as with upstream's no-op \
                 detector)"
            );
        }
    }

    /// Runs until `--once` is satisfied, `shutdown` resolves, or the source ends.
    pub async fn run(
        &mut self,
        mut updates: mpsc::Receiver<Update>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<Stopped> {
        tokio::pin!(shutdown);
        let mut schedule = Schedule::new(
            self.options.min_sync_period,
            self.options.sync_period,
            self.options.full_sync_period,
        );
        let mut repeats = Repeats::default();
        let first = FirstSync::new(
            Instant::now(),
            self.options.node_wait,
            self.config.detect_local == crate::config::LocalDetectMode::NodeCidr,
        );
        // Until the first sync: when the gate opens by itself (the Node wait ends).
        let mut gate_deadline = None;
        let mut initialized = false;
        // Changes arrived before the first sync was due (marked queued once it is).
        let mut queued_early = false;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!("shutdown requested; rules stay in place");
                    return Ok(Stopped::Shutdown);
                }
                update = updates.recv() => {
                    let Some(update) = update else {
                        anyhow::bail!("the object source stopped unexpectedly");
                    };
                    let update = match update {
                        Update::Status(status) => {
                            self.source_status(status);
                            continue;
                        }
                        update => update,
                    };
                    let touched = self.cache.apply(update);
                    let (services, endpoints) = (touched.service_changes, touched.endpoint_changes);
                    if !touched.is_empty() {
                        if initialized {
                            self.mark_queued();
                        } else {
                            // Not while the first sync waits (for the Node up to 30 s): /healthz
                            // would time out on changes no sync may take yet.
                            queued_early = true;
                        }
                    }
                    self.pending.merge(touched);
                    self.tell(&Event::ChangesSeen {
                        services,
                        endpoints,
                        pending_services: self.pending.service_changes,
                        pending_endpoints: self.pending.endpoint_changes,
                    });
                    if initialized {
                        if !self.pending.is_empty() {
                            schedule.changed(Instant::now());
                        }
                        continue;
                    }
                    initialized = self.open_first_sync(&first, &mut schedule, &mut gate_deadline, &mut queued_early);
                }
                () = sleep_until(gate_deadline), if !initialized => {
                    initialized = self.open_first_sync(&first, &mut schedule, &mut gate_deadline, &mut queued_early);
                }
                () = sleep_until(schedule.deadline()) => {
                    let due = schedule.due(Instant::now());
                    let full = self.believed.is_none()
                        || (due.periodic
                            && (due.full_period_elapsed || block(|| self.mode.drifted())));
                    match self.sync(full) {
                        Ok(report) => {
                            let now = Instant::now();
                            schedule.succeeded(now, full, due);
                            if let Some(run) = repeats.succeeded(now) {
                                tracing::info!(
                                    failed_attempts = run.failures,
                                    failing_for_ms = millis(run.after),
                                    "sync succeeded again"
                                );
                            }
                            if self.options.once {
                                tracing::info!(
                                    full = report.full,
                                    service_ports = report.service_ports,
                                    skipped = report.skipped,
                                    added = report.stats.added,
                                    removed = report.stats.removed,
                                    elapsed_ms = millis(report.duration),
                                    "first sync complete (--once)"
                                );
                                return Ok(Stopped::Once);
                            }
                        }
                        Err(err) => {
                            self.tell(&Event::SyncFailed);
                            if self.options.once {
                                return Err(anyhow::Error::new(err).context("the sync failed"));
                            }
                            // A failed apply leaves the kernel as it was, but we no longer know
                            // for sure what it holds: read it back next time.
                            self.believed = None;
                            let now = Instant::now();
                            let retry_in = schedule.failed(now, self.jitter.next_unit());
                            let error = format_chain(&err);
                            match repeats.failed(&error, now) {
                                Say::Failed => tracing::error!(%error, ?retry_in, "sync failed; will retry with a full sync"),
                                Say::StillFailing { failures, unlogged, failing_for } => tracing::error!(
                                    %error,
                                    failed_attempts = failures,
                                    not_logged = unlogged,
                                    ?failing_for,
                                    ?retry_in,
                                    "sync still failing with the same error; retrying with backoff"
                                ),
                                Say::Quiet => tracing::debug!(%error, ?retry_in, failed_attempts = repeats.failures(), "sync failed again"),
                            }
                        }
                    }
                }
            }
        }
    }

    /// One sync: [`Self::prepare`] (build, render, plan against the believed or live rules),
    /// [`Self::commit`] (apply or print), [`Self::publish`] (metrics, admin socket, log).
    pub fn sync(&mut self, full: bool) -> Result<SyncReport, ModeError> {
        let started = Instant::now();
        let span = tracing::info_span!("sync", mode = %self.mode.name(), full);
        let _enter = span.enter();
        let prepared = self.prepare(full)?;
        let committed = self.commit(prepared)?;
        Ok(self.publish(committed, full, started))
    }

    /// Builds the desired state from the cache (incrementally from the last build when it can),
    /// and how long the build itself took.
    fn build(&mut self) -> (desired_state::Built, Duration) {
        let node_obj = self.cache.node().map(|n| n.as_ref());
        self.health.set_node(node_obj);
        let ctx = BuildContext::new(&self.config, node_obj, &node::local_addresses());
        let t_build = Instant::now();
        let built = match &self.previous {
            Some(prev) if !self.pending.everything => {
                desired_state::build_incremental(&self.cache, &ctx, prev, &self.pending.services)
            }
            prev => desired_state::build(&self.cache, &ctx, prev.as_ref().map(|b| &b.state)),
        };
        let build_time = t_build.elapsed();
        self.report_skipped(&built.skipped);
        (built, build_time)
    }

    /// Build, render, and plan against what the kernel holds: read back for a full sync, a dry
    /// run or after a failure, else the rules the last apply left.
    fn prepare(&mut self, full: bool) -> Result<Prepared<M>, ModeError> {
        let (built, build_time) = self.build();
        let facts = block(|| self.mode.observe());
        let t_render = Instant::now();
        let desired = block(|| self.mode.render(&built.state, &facts, &mut self.memo));
        let render_time = t_render.elapsed();

        let dry_run = self.options.dry_run;
        let live = if dry_run || full || self.believed.is_none() {
            match block(|| self.mode.read_live()) {
                Ok(live) => live,
                Err(err) if dry_run => {
                    let _ = writeln!(
                        self.out,
                        "# kproxy --dry-run: {}; {}.\n# Showing everything that would be written to an empty kernel.",
                        format_chain(&err),
                        if err.is_permission_denied() {
                            "run as root (or with CAP_NET_ADMIN) to diff against the live rules"
                        } else {
                            "the live state cannot be read here"
                        }
                    );
                    M::Rules::default()
                }
                Err(err) => return Err(err),
            }
        } else {
            self.believed.clone().unwrap_or_default()
        };
        let t_plan = Instant::now();
        let plan = if self.failures >= 2 && !dry_run {
            // Said once per run of failures; the later rebuilds are the same decision.
            if self.failures == 2 {
                tracing::warn!(
                    failures = self.failures,
                    "repeated failures: rewriting everything kproxy owns"
                );
            } else {
                tracing::debug!(
                    failures = self.failures,
                    "repeated failures: rewriting everything kproxy owns"
                );
            }
            self.mode.plan_rebuild(&live, &desired)
        } else {
            self.mode.plan(&live, &desired)
        };
        Ok(Prepared {
            built,
            desired,
            plan,
            times: PhaseTimes {
                build: build_time,
                render: render_time,
                plan: t_plan.elapsed(),
                apply: Duration::ZERO,
            },
        })
    }

    /// Applies the plan (or prints it for `--dry-run`), then what follows an apply: the
    /// followers of [`Event::Applied`] (the health-check servers, the other modes' leftovers),
    /// the believed rules, stale conntrack entries.
    fn commit(&mut self, prepared: Prepared<M>) -> Result<Committed, ModeError> {
        let Prepared {
            built,
            desired,
            plan,
            mut times,
        } = prepared;
        let dry_run = self.options.dry_run;
        let t_apply = Instant::now();
        let stats = plan.stats();
        if dry_run {
            let _ = writeln!(
                self.out,
                "# kproxy --dry-run: mode {}, {} service ports, {} skipped objects; {} rules added, {} removed, {} chains/sets touched",
                self.mode.name(),
                built.state.services.len(),
                built.skipped.len(),
                stats.added,
                stats.removed,
                stats.containers_touched,
            );
            let _ = write!(self.out, "{plan}");
            let _ = self.out.flush();
        } else if !plan.is_empty()
            && let Err(err) = block(|| self.mode.apply(&plan))
        {
            self.failures += 1;
            return Err(err);
        }
        self.failures = 0;
        if !dry_run {
            // Before conntrack cleanup, and inside the apply's time, as the rules they follow.
            self.tell(&Event::Applied {
                state: &built.state,
            });
        }
        times.apply = t_apply.elapsed();
        if !dry_run {
            self.believed = Some(desired);
            self.health.updated(std::time::SystemTime::now());
        }
        // After the apply: a deleted entry's next packet must meet the new rules.
        let conntrack = if dry_run {
            None
        } else {
            self.clean_conntrack(&built.state)
        };
        Ok(Committed {
            built,
            stats,
            times,
            conntrack,
        })
    }

    /// Tells the others what the sync did (metrics, the admin socket, the log), and makes its
    /// build the next sync's starting point.
    fn publish(&mut self, committed: Committed, full: bool, started: Instant) -> SyncReport {
        let Committed {
            built,
            stats,
            times,
            conntrack,
        } = committed;
        let dry_run = self.options.dry_run;
        let report = SyncReport {
            full,
            service_ports: built.state.services.len(),
            skipped: built.skipped.len(),
            stats,
            duration: started.elapsed(),
            conntrack,
        };
        // Shared, not copied: the admin socket reads the same build the next sync starts from.
        let built = Arc::new(built);
        if !dry_run {
            let objects = self
                .mode
                .count_objects(self.believed.as_ref().unwrap_or(&M::Rules::default()));
            let trigger_times = std::mem::take(&mut self.pending.trigger_times);
            let outcome = Outcome {
                built: &built,
                report: &report,
                apply: times.apply,
                objects: &objects,
                trigger_times: &trigger_times,
                at: std::time::SystemTime::now(),
            };
            self.tell(&Event::Synced(&outcome));
        }
        self.previous = Some(built);
        self.pending = Touched::default();
        tracing::info!(
            service_ports = report.service_ports,
            skipped = report.skipped,
            added = stats.added,
            removed = stats.removed,
            touched = stats.containers_touched,
            elapsed_ms = millis(report.duration),
            build_ms = millis(times.build),
            render_ms = millis(times.render),
            plan_ms = millis(times.plan),
            apply_ms = millis(times.apply),
            conntrack_deleted = report.conntrack_deleted(),
            conntrack_ms = report
                .conntrack
                .as_ref()
                .map_or(0.0, |c| millis(c.duration)),
            "sync complete"
        );
        report
    }

    /// Deletes stale UDP/SCTP conntrack entries against `current`. Failures are warnings.
    fn clean_conntrack(&mut self, current: &ProxyState) -> Option<CleanupReport> {
        if !self.options.conntrack_cleanup {
            return None;
        }
        let table = self.conntrack.as_mut()?;
        let previous = self.previous.as_ref().map(|b| &b.state);
        // A family with no service port now or before, and no service CIDR, has nothing of ours
        // to clean: no dump (a single-stack node never reads the other family's table).
        let families: Vec<IpFamily> = IpFamily::ALL
            .into_iter()
            .filter(|&f| {
                [Some(current), previous]
                    .into_iter()
                    .flatten()
                    .any(|s| s.family(f).next().is_some())
                    || current
                        .node
                        .service_cidrs
                        .iter()
                        .any(|n| IpFamily::of_net(n) == f)
            })
            .collect();
        match block(|| crate::conntrack::reconcile(table.as_mut(), &families, current, previous)) {
            Ok(report) => {
                tracing::debug!(
                    examined = report.examined,
                    stale = report.stale,
                    deleted = report.deleted,
                    failed = report.failed,
                    elapsed_ms = millis(report.duration),
                    "conntrack cleanup"
                );
                Some(report)
            }
            Err(err) => {
                tracing::warn!(error = %format_chain(&err), "conntrack cleanup failed; stale UDP/SCTP flows may persist until the next sync");
                None
            }
        }
    }

    /// Passes what the source says about itself on to /healthz and /metrics.
    fn source_status(&mut self, status: SourceStatus) {
        match status {
            SourceStatus::Unreadable { since, .. } => self.health.source_unreadable(Some(since)),
            SourceStatus::Readable => self.health.source_unreadable(None),
            SourceStatus::RemovalHeld => self.tell(&Event::RemovalHeld),
        }
    }

    /// Logs each invalid object once, for as long as it stays invalid.
    fn report_skipped(&mut self, skipped: &[desired_state::Skipped]) {
        let current: BTreeSet<String> = skipped.iter().map(ToString::to_string).collect();
        for msg in current.difference(&self.reported) {
            tracing::warn!("{msg}");
        }
        self.reported = current;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Runs blocking kernel work without stalling the runtime's other tasks (sources, probes).
pub(crate) fn block<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// An error with its causes, one line.
pub fn format_chain(err: &(dyn std::error::Error + 'static)) -> String {
    kproxy_contract::Chain(err).to_string()
}

/// A duration in milliseconds with microsecond resolution, for log fields: `87.721`, not the
/// float noise of `as_secs_f64() * 1000.0` (`87.72093299999999`).
fn millis(d: Duration) -> f64 {
    // Microseconds fit an f64 exactly for any duration a sync could take.
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests;
