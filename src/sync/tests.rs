//! Timing tests of the loop with a paused clock and a recording fake mode.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::source::slim::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_contract::{ModeName, Plan, PlanStats};

use super::*;
use crate::cli::Args;
use crate::source::Change;

#[derive(Debug, Default)]
struct Log {
    applies: usize,
    /// Apply calls, failed or not.
    attempts: usize,
    reads: usize,
    fail_applies: usize,
    /// What the next drift probe reports.
    drifted: bool,
    /// Applies of incremental plans fail; rebuild plans succeed.
    reject_incremental: bool,
    rebuilds: usize,
    /// Renders of a desired state (one per sync that built something).
    renders: usize,
}

struct FakeMode(Arc<Mutex<Log>>);

#[derive(Debug)]
struct FakePlan(usize, usize, bool);

impl fmt::Display for FakePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "+{} -{}", self.0, self.1)
    }
}

impl Plan for FakePlan {
    fn is_empty(&self) -> bool {
        self.0 == 0 && self.1 == 0
    }
    fn stats(&self) -> PlanStats {
        PlanStats {
            added: self.0,
            removed: self.1,
            containers_touched: 0,
        }
    }
}

impl Mode for FakeMode {
    type Rules = BTreeSet<String>;
    type Plan = FakePlan;
    type Memo = ();
    type Facts = ();
    fn name(&self) -> ModeName {
        ModeName::Iptables
    }
    fn observe(&self) {}
    fn render(&self, desired: &ProxyState, (): &(), (): &mut ()) -> Self::Rules {
        self.0.lock().unwrap().renders += 1;
        desired
            .services
            .keys()
            .map(|k| format!("{:?}", k))
            .collect()
    }
    fn read_live(&mut self) -> Result<Self::Rules, ModeError> {
        self.0.lock().unwrap().reads += 1;
        Ok(BTreeSet::new())
    }
    fn plan(&self, live: &Self::Rules, desired: &Self::Rules) -> FakePlan {
        FakePlan(
            desired.difference(live).count(),
            live.difference(desired).count(),
            false,
        )
    }
    fn plan_rebuild(&self, live: &Self::Rules, desired: &Self::Rules) -> FakePlan {
        FakePlan(desired.len(), live.len(), true)
    }
    fn apply(&mut self, plan: &FakePlan) -> Result<(), ModeError> {
        let mut log = self.0.lock().unwrap();
        log.attempts += 1;
        if plan.2 {
            log.rebuilds += 1;
        } else if log.reject_incremental {
            return Err(ModeError::Unsupported(
                "an incremental plan the kernel accepts",
            ));
        }
        if log.fail_applies > 0 {
            log.fail_applies -= 1;
            return Err(ModeError::Unsupported("a working fake"));
        }
        log.applies += 1;
        Ok(())
    }
    fn cleanup(&mut self) -> Result<(), ModeError> {
        Ok(())
    }
    fn drifted(&mut self) -> bool {
        std::mem::take(&mut self.0.lock().unwrap().drifted)
    }
}

fn config() -> Arc<Config> {
    let args = Args {
        hostname_override: Some("node-a".into()),
        ..Args::default()
    };
    Arc::new(crate::config::from_args(&args).unwrap())
}

fn options(dry_run: bool) -> SyncOptions {
    SyncOptions {
        min_sync_period: Duration::from_secs(1),
        sync_period: Duration::from_secs(30),
        full_sync_period: Duration::from_secs(3600),
        dry_run,
        once: false,
        conntrack_cleanup: false,
        node_wait: Duration::ZERO,
    }
}

fn svc(name: &str, ip: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
    }))
    .unwrap()
}

struct Harness {
    log: Arc<Mutex<Log>>,
    tx: mpsc::Sender<Update>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<Stopped>>,
}

fn start(dry_run: bool) -> Harness {
    start_with(options(dry_run))
}

fn start_with(options: SyncOptions) -> Harness {
    start_with_config(options, config())
}

fn start_with_config(options: SyncOptions, config: Arc<Config>) -> Harness {
    let log = Arc::new(Mutex::new(Log::default()));
    let (tx, rx) = mpsc::channel(100);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut sl = SyncLoop::new(FakeMode(log.clone()), config, options)
        .with_output(Box::new(std::io::sink()))
        .with_jitter(crate::retry::Jitter::Fixed(0.0));
    let task = tokio::spawn(async move {
        sl.run(rx, async move {
            let _ = stopped.await;
        })
        .await
    });
    Harness {
        log,
        tx,
        stop: Some(stop),
        task,
    }
}

impl Harness {
    async fn send(&self, u: Update) {
        self.tx.send(u).await.unwrap();
        // Let the loop take it.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fn applies(&self) -> usize {
        self.log.lock().unwrap().applies
    }
    fn reads(&self) -> usize {
        self.log.lock().unwrap().reads
    }
    async fn stop(mut self) -> Stopped {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap()
    }
}

async fn lists(h: &Harness, services: Vec<Service>) {
    h.send(Update::Services(Change::Reset(services).shared()))
        .await;
    h.send(Update::EndpointSlices(
        Change::Reset(Vec::<EndpointSlice>::new())
            .map(crate::source::slim::slice)
            .shared(),
    ))
    .await;
}

#[tokio::test(start_paused = true)]
async fn no_sync_before_both_lists_then_one_even_when_empty() {
    let h = start(false);
    h.send(Update::Services(Change::Reset(vec![]).shared()))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.reads(), 0, "no sync before EndpointSlices are listed");
    h.send(Update::EndpointSlices(
        Change::Reset(vec![])
            .map(crate::source::slim::slice)
            .shared(),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.reads(), 1, "first sync is full (reads the kernel)");
    assert_eq!(h.stop().await, Stopped::Shutdown);
}

/// With `--detect-local-mode=NodeCIDR` the detector is the Node's `spec.podCIDRs`: the first
/// sync also waits for the Node's list (upstream waits for the pod CIDRs before it starts).
#[tokio::test(start_paused = true)]
async fn node_cidr_detection_waits_for_the_node_before_the_first_sync() {
    let args = Args {
        hostname_override: Some("node-a".into()),
        detect_local_mode: Some("NodeCIDR".into()),
        ..Args::default()
    };
    let config = Arc::new(crate::config::from_args(&args).unwrap());
    let h = start_with_config(options(false), config);
    lists(&h, vec![]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.reads(), 0, "no sync before the Node is listed");
    h.send(Update::Node(Change::Reset(Vec::new()).shared()))
        .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        h.reads(),
        1,
        "the Node's list, even an empty one, completes the lists"
    );
    assert_eq!(h.stop().await, Stopped::Shutdown);
}

fn node_with(addresses: &[&str]) -> k8s_openapi::api::core::v1::Node {
    let addresses: Vec<_> = addresses
        .iter()
        .map(|a| serde_json::json!({"type": "InternalIP", "address": a}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "node-a"},
        "status": {"addresses": addresses}
    }))
    .unwrap()
}

fn waiting_for_node() -> SyncOptions {
    SyncOptions {
        node_wait: Duration::from_secs(30),
        ..options(false)
    }
}

/// From the API, the first sync waits for the Node to come with an address (its watch is a
/// stream of its own): a Node listed without addresses is not enough, one with an address is.
#[tokio::test(start_paused = true)]
async fn the_first_sync_waits_for_the_nodes_address_from_the_api() {
    let h = start_with(waiting_for_node());
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.reads(), 0, "no sync before the Node is listed");
    h.send(Update::Node(Change::Reset(vec![node_with(&[])]).shared()))
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.reads(), 0, "a Node without addresses is awaited further");
    h.send(Update::Node(
        Change::Apply(node_with(&["192.168.0.10"])).shared(),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.reads(), 1, "the Node's address opens the first sync");
    assert_eq!(h.applies(), 1);
    assert_eq!(h.stop().await, Stopped::Shutdown);
}

/// A Node that never comes (not registered, or RBAC denies it) holds the first sync back for
/// the wait only, counted from the loop's start; what comes later syncs as a change.
#[tokio::test(start_paused = true)]
async fn a_node_that_never_comes_delays_the_first_sync_by_the_wait_only() {
    let h = start_with(waiting_for_node());
    tokio::time::sleep(Duration::from_secs(10)).await;
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_millis(19_900)).await;
    assert_eq!(h.reads(), 0, "still inside the wait");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.reads(),
        1,
        "the wait ended 30 s after the start: first sync"
    );
    assert_eq!(h.applies(), 1);
    h.send(Update::Node(
        Change::Reset(vec![node_with(&["192.168.0.10"])]).shared(),
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.log.lock().unwrap().renders,
        2,
        "the late Node is synced as a change"
    );
    assert_eq!(h.stop().await, Stopped::Shutdown);
}

/// The wait ends early when the lists were there all along: the Node arriving at second 3 is
/// enough, and nothing waits for the rest of the 30 s.
#[tokio::test(start_paused = true)]
async fn a_node_in_time_ends_the_wait_at_once() {
    let h = start_with(waiting_for_node());
    lists(&h, vec![]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.send(Update::Node(
        Change::Reset(vec![node_with(&["fd00::10"])]).shared(),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.reads(), 1);
    assert_eq!(h.stop().await, Stopped::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn bursts_coalesce_into_one_sync_per_min_period() {
    let h = start(false);
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.applies(), 1);
    for i in 0..20 {
        h.send(Update::Services(
            Change::Apply(svc(&format!("b{i}"), &format!("10.96.1.{i}"))).shared(),
        ))
        .await;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(h.applies(), 1, "still inside min-sync-period");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.applies(), 2, "one sync for the whole burst");
    assert_eq!(h.reads(), 1, "partial syncs do not read the kernel");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn periodic_full_resync_reads_the_kernel() {
    let h = start(false);
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.reads(), 1);
    // Periodic syncs probe the canary; without drift they do not read the kernel back.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(h.reads(), 1);
    // A flushed table (drift) makes the next periodic sync a full one.
    h.log.lock().unwrap().drifted = true;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.reads(), 2);
    // And at least once per full-sync period regardless.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(h.reads() >= 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_sync_is_retried_with_backoff_and_full() {
    let h = start(false);
    h.log.lock().unwrap().fail_applies = 2;
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!((h.applies(), h.reads()), (0, 1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!((h.applies(), h.reads()), (0, 2), "retry after 1s, full");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        (h.applies(), h.reads()),
        (1, 3),
        "second retry after 2s succeeds"
    );
    h.stop().await;
}

/// Issue #20 item 1: with a 5 s sync period and every apply failing, the loop used to retry at
/// every wake-up once the periodic deadline had passed (about once a millisecond). The fake
/// succeeds after 1,000 failed attempts, so the old loop ends up idle too and the test ends.
#[tokio::test(start_paused = true)]
async fn a_persistent_failure_backs_off_past_the_periodic_deadline() {
    let h = start_with(SyncOptions {
        sync_period: Duration::from_secs(5),
        ..options(false)
    });
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.applies(), 1);
    h.log.lock().unwrap().fail_applies = 1000;
    let before = h.log.lock().unwrap().attempts;
    h.send(Update::Services(
        Change::Apply(svc("b", "10.96.0.2")).shared(),
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let attempts = h.log.lock().unwrap().attempts - before;
    // Attempts at 1 s (the change) and then 1, 2, 4, 5 s later: 2, 4, 8, 13 s.
    assert_eq!(attempts, 5, "{attempts} attempts in 15 s");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let attempts = h.log.lock().unwrap().attempts - before;
    assert!((16..=18).contains(&attempts), "{attempts} attempts in 75 s");
    h.log.lock().unwrap().fail_applies = 0;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let applies = h.applies();
    assert_eq!(applies, 2, "recovered within one capped retry");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn dry_run_never_applies() {
    let h = start(true);
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    h.send(Update::Services(
        Change::Apply(svc("b", "10.96.0.2")).shared(),
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(h.applies(), 0);
    assert!(h.reads() >= 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn repeated_failures_escalate_to_a_rebuild() {
    let h = start(false);
    h.log.lock().unwrap().reject_incremental = true;
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.log.lock().unwrap().rebuilds, 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        h.log.lock().unwrap().rebuilds,
        0,
        "second attempt is still incremental"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let counts = {
        let log = h.log.lock().unwrap();
        (log.rebuilds, log.applies)
    };
    assert_eq!(counts, (1, 1), "third attempt rebuilds and succeeds");
    h.stop().await;
}

/// A conntrack table that records when it is read, shared with the test.
#[derive(Default)]
struct CtLog {
    /// (family, applies the mode had done when the dump happened).
    dumps: Vec<(IpFamily, usize)>,
    deleted: usize,
    fail: bool,
}

struct FakeTable {
    ct: Arc<Mutex<CtLog>>,
    mode: Arc<Mutex<Log>>,
    entries: Vec<crate::conntrack::Flow>,
}

impl ConntrackTable for FakeTable {
    fn dump(
        &mut self,
        family: IpFamily,
    ) -> Result<Vec<crate::conntrack::Flow>, crate::conntrack::ConntrackError> {
        let mut ct = self.ct.lock().unwrap();
        ct.dumps.push((family, self.mode.lock().unwrap().applies));
        if ct.fail {
            return Err(crate::conntrack::ConntrackError::Protocol("broken".into()));
        }
        Ok(self
            .entries
            .iter()
            .filter(|f| f.family() == family)
            .cloned()
            .collect())
    }

    fn delete(
        &mut self,
        flows: &[crate::conntrack::Flow],
    ) -> Result<crate::conntrack::DeleteOutcome, crate::conntrack::ConntrackError> {
        self.ct.lock().unwrap().deleted += flows.len();
        Ok(crate::conntrack::DeleteOutcome {
            deleted: flows.len(),
            ..Default::default()
        })
    }
}

fn udp_svc(name: &str, ip: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 53, "protocol": "UDP"}]}
    }))
    .unwrap()
}

/// A loop over the fake mode and a fake table holding one flow DNATed to an endpoint the
/// service (which has no endpoints) does not have.
fn loop_with_table(
    dry_run: bool,
    cleanup: bool,
    fail: bool,
) -> (SyncLoop<FakeMode>, Arc<Mutex<CtLog>>) {
    let mode_log = Arc::new(Mutex::new(Log::default()));
    let ct = Arc::new(Mutex::new(CtLog {
        fail,
        ..CtLog::default()
    }));
    let flow = crate::conntrack::Flow {
        protocol: kproxy_contract::Protocol::Udp,
        original: crate::conntrack::Tuple {
            src: "10.0.1.2:40000".parse().unwrap(),
            dst: "10.96.0.10:53".parse().unwrap(),
        },
        reply: crate::conntrack::Tuple {
            src: "10.244.1.10:53".parse().unwrap(),
            dst: "10.0.1.2:40000".parse().unwrap(),
        },
        dnat: true,
        snat: false,
        zone: None,
        id: None,
    };
    let table = FakeTable {
        ct: ct.clone(),
        mode: mode_log.clone(),
        entries: vec![flow],
    };
    let mut opts = options(dry_run);
    opts.conntrack_cleanup = cleanup;
    let mut sl = SyncLoop::new(FakeMode(mode_log), config(), opts)
        .with_output(Box::new(std::io::sink()))
        .with_conntrack(Box::new(table));
    sl.cache.apply(Update::Services(
        Change::Reset(vec![udp_svc("dns", "10.96.0.10")]).shared(),
    ));
    sl.cache.apply(Update::EndpointSlices(
        Change::Reset(Vec::new())
            .map(crate::source::slim::slice)
            .shared(),
    ));
    (sl, ct)
}

#[test]
fn conntrack_cleanup_runs_after_the_apply() {
    let (mut sl, ct) = loop_with_table(false, true, false);
    let report = sl.sync(true).unwrap();
    assert_eq!(report.conntrack_deleted(), 1);
    let ct = ct.lock().unwrap();
    // Only the family that has services (no IPv6 service or service CIDR here), after the one
    // apply.
    assert_eq!(ct.dumps, vec![(IpFamily::V4, 1)]);
    assert_eq!(ct.deleted, 1);
}

/// Followers hear each applied sync once, in order: `Applied` right after the apply (before
/// conntrack cleanup, so health-check ports and leftover removal follow the rules at once),
/// then `Synced` with the sync's figures. `--dry-run` and a failed sync publish neither.
#[test]
fn followers_hear_each_applied_sync_once_in_order() {
    for (dry_run, fail) in [(false, false), (true, false), (false, true)] {
        let (sl, ct) = loop_with_table(dry_run, true, false);
        let heard = Arc::new(Mutex::new(Vec::<String>::new()));
        let (to, table) = (heard.clone(), ct.clone());
        let mut sl = sl.follow(move |event: &Event<'_>| {
            let dumps = table.lock().unwrap().dumps.len();
            to.lock().unwrap().push(match event {
                Event::Applied { state } => {
                    format!("applied {} ports, {dumps} dumps", state.services.len())
                }
                Event::Synced(o) => format!(
                    "synced {} ports, {dumps} dumps, {} deleted",
                    o.report.service_ports,
                    o.report.conntrack_deleted()
                ),
                other => format!("{other:?}"),
            });
        });
        sl.mode().0.lock().unwrap().fail_applies = usize::from(fail);
        assert_eq!(sl.sync(true).is_ok(), !fail);
        let expected: &[&str] = match (dry_run, fail) {
            (false, false) => &[
                "applied 1 ports, 0 dumps",
                "synced 1 ports, 1 dumps, 1 deleted",
            ],
            _ => &[],
        };
        assert_eq!(
            *heard.lock().unwrap(),
            expected,
            "dry run {dry_run}, failing {fail}"
        );
    }
}

#[test]
fn conntrack_cleanup_is_skipped_in_dry_run_and_when_disabled() {
    for (dry_run, cleanup) in [(true, true), (false, false)] {
        let (mut sl, ct) = loop_with_table(dry_run, cleanup, false);
        let report = sl.sync(true).unwrap();
        assert!(report.conntrack.is_none());
        assert!(ct.lock().unwrap().dumps.is_empty());
    }
}

#[test]
fn a_conntrack_failure_does_not_fail_the_sync() {
    let (mut sl, ct) = loop_with_table(false, true, true);
    let report = sl.sync(true).unwrap();
    assert!(report.conntrack.is_none());
    assert_eq!(ct.lock().unwrap().dumps.len(), 1);
    // The rules were applied and are believed.
    assert!(sl.believed.is_some());
}

/// While the first sync waits for the Node, the lists' changes are not counted as queued:
/// /healthz would otherwise turn unhealthy after twice the sync period on changes no sync may
/// take yet. They count once the first sync is due.
#[tokio::test(start_paused = true)]
async fn changes_wait_quietly_while_the_first_sync_waits_for_the_node() {
    let log = Arc::new(Mutex::new(Log::default()));
    let health = crate::health::Health::new(Duration::from_secs(30));
    let (tx, rx) = mpsc::channel(100);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut sl = SyncLoop::new(FakeMode(log.clone()), config(), waiting_for_node())
        .with_output(Box::new(std::io::sink()))
        .with_health(health.clone())
        .with_jitter(crate::retry::Jitter::Fixed(0.0));
    let task = tokio::spawn(async move {
        sl.run(rx, async move {
            let _ = stopped.await;
        })
        .await
    });
    let h = Harness {
        log,
        tx,
        stop: Some(stop),
        task,
    };
    lists(&h, vec![svc("a", "10.96.0.1")]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.reads(), 0, "still waiting for the Node");
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    assert!(
        health.verdict(later).healthy,
        "the lists' changes were counted as queued during the wait"
    );
    h.send(Update::Node(
        Change::Reset(vec![node_with(&["192.168.0.10"])]).shared(),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.applies(), 1);
    assert!(health.verdict(later).healthy, "synced: nothing is pending");
    assert_eq!(h.stop().await, Stopped::Shutdown);
}
