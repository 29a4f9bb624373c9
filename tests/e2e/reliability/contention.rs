//! Guarantee 6, contention: another process holding the xtables lock, or writing its own rules
//! while kproxy syncs, never makes kproxy lose or corrupt a sync. A sync that cannot take the
//! lock fails as a whole (iptables-restore is one transaction), is logged and counted
//! (`kubeproxy_sync_proxy_rules_iptables_restore_failures_total`), leaves the old rules serving,
//! and is retried with backoff until it lands.
//!
//! The xtables lock is global across namespaces (`/run/xtables.lock`); these tests never touch
//! it. kproxy runs with `XTABLES_LOCKFILE` pointing at a temp file (iptables 1.8 honours it) and
//! the test holds or shares that file's lock.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::http;
use crate::support::kproxy::wait_until;
use crate::support::load::Load;
use crate::support::manifests::Port;
use crate::support::netns::Netns;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{Mode, PROBE, Scenario, sock};
use crate::support::topology::POD_V4;
use crate::support::traffic::tcp_request;

const HTTP: Port = Port::tcp("http", 80, 8080);
const VIP: &str = "10.96.0.10";
const METRICS: &str = "127.0.0.1:10249";
const RESTORE_FAILURES: &str = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total";
/// kproxy waits this long for the lock (`iptables-restore --wait 10`); the test holds it longer.
const HOLD: Duration = Duration::from_secs(13);

fn web(s: &Scenario, pods: &[usize]) {
    let eps: Vec<Ep> = pods.iter().map(|&i| Ep::ready(POD_V4[i])).collect();
    s.apply(&endpoint_slice("web", "web-v4", &eps, &[HTTP]));
}

fn setup(mut s: Scenario, extra: &[&str]) -> Scenario {
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V4[1], 8080, "ep2");
    s.apply(&Svc::new("web", &[VIP], &[HTTP]).json());
    web(&s, &[0]);
    s.start_kproxy(extra);
    let vip = sock(VIP, 80);
    s.wait_tcp("tcp 10.96.0.10:80", vip, "ep1");
    s
}

fn restore_failures(s: &Scenario) -> f64 {
    http::get(&s.topo.node, METRICS.parse().expect("addr"), "/metrics")
        .and_then(|(_, text)| http::metric(&text, RESTORE_FAILURES))
        .unwrap_or(-1.0)
}

/// The xtables lock is held for longer than kproxy waits: the sync fails, is reported (log and
/// metric), the old rules keep serving, and the change lands soon after the lock is released.
#[test]
fn xtables_lock_held_fails_the_sync_which_is_reported_and_retried() {
    if !crate::support::require_root(
        "xtables_lock_held_fails_the_sync_which_is_reported_and_retried",
    ) {
        return;
    }
    let lock = tempfile::NamedTempFile::new().expect("lock file");
    let lock_path = lock.path().display().to_string();
    let s = Scenario::with_manifests_in(Mode::Iptables)
        .legacy_iptables()
        .env("XTABLES_LOCKFILE", &lock_path);
    let mut s = setup(s, &["--metrics-bind-address", METRICS]);
    assert_eq!(restore_failures(&s), 0.0);
    let vip = sock(VIP, 80);
    let load = Load::start(&s.topo.client, Some(vip), None, Duration::from_millis(5));

    let holder = File::open(&lock_path).expect("open lock file");
    holder.lock().expect("take the lock");
    let held = Instant::now();
    web(&s, &[1]);
    // kproxy gives up after its 10 s wait and reports it.
    let reported = wait_until(HOLD - Duration::from_millis(500), || {
        s.kproxy
            .as_ref()
            .is_some_and(|k| k.stderr().contains("sync failed"))
    });
    assert!(reported, "no failed sync reported while the lock was held");
    let failures = restore_failures(&s);
    assert!(failures >= 1.0, "{RESTORE_FAILURES} = {failures}");
    // Nothing changed meanwhile: the old rules serve.
    assert_eq!(
        tcp_request(&s.topo.client, vip, PROBE).ok().as_deref(),
        Some("ep1")
    );
    std::thread::sleep(HOLD.saturating_sub(held.elapsed()));
    holder.unlock().expect("release the lock");
    let released = Instant::now();
    s.wait_tcp("the change after the lock is released", vip, "ep2");
    let converged = released.elapsed();
    let report = load.stop();
    let log = s.kproxy().stderr();
    let failed_syncs = log.lines().filter(|l| l.contains("sync failed")).count();
    eprintln!(
        "xtables lock held {HOLD:?}: failed syncs={failed_syncs}, {RESTORE_FAILURES}={failures}, \
         converged {converged:?} after release; tcp connections={} failed={}",
        report.tcp.sent(),
        report.tcp.failures.len()
    );
    assert!(
        report.tcp.failures.is_empty(),
        "connections failed while the lock was held: {:?}",
        report.tcp.failures
    );
    assert!(
        log.lines()
            .any(|l| l.contains("sync failed") && l.contains("lock")),
        "the failure does not name the lock:\n{log}"
    );
    s.kproxy().assert_running();
}

/// Another writer adding its own rules as fast as it can while kproxy applies 200 changes: no
/// write of either side is lost, the foreign rules are all there, kproxy converges, and no
/// connection fails.
fn concurrent_writer(s: Scenario, label: &str, writer: Writer) {
    let mut s = setup(s, &[]);
    let vip = sock(VIP, 80);
    writer.setup(&s.topo.node);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let thread = {
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        let ns = s.topo.node.name().to_string();
        let writer = writer.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let i = written.load(Ordering::Relaxed);
                let out = writer.write(&ns, i);
                assert!(
                    out.status.success(),
                    "foreign write {i} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let load = Load::start(&s.topo.client, Some(vip), None, Duration::from_millis(5));
    let sets: [&[usize]; 3] = [&[0, 1], &[1], &[0]];
    for i in 0..200 {
        web(&s, sets[i % 3]);
        std::thread::sleep(Duration::from_millis(15));
    }
    // The last set (199 % 3 == 1) is ep2 alone.
    s.wait_tcp("the last change", vip, "ep2");
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("foreign writer");
    let report = load.stop();
    let foreign = writer.count(&s.topo.node);
    let written = written.load(Ordering::Relaxed);
    let log = s.kproxy().stderr();
    let failed_syncs = log.lines().filter(|l| l.contains("sync failed")).count();
    let syncs = log.lines().filter(|l| l.contains("sync complete")).count();
    eprintln!(
        "concurrent writer {label}: foreign writes={written} present={foreign}; kproxy \
         syncs={syncs} failed (retried)={failed_syncs}; tcp connections={} failed={}",
        report.tcp.sent(),
        report.tcp.failures.len()
    );
    assert_eq!(foreign, written, "foreign rules lost");
    assert!(
        written > 50,
        "the foreign writer barely ran ({written} writes)"
    );
    assert!(report.tcp.failures.is_empty(), "{:?}", report.tcp.failures);
    s.kproxy().assert_running();
}

/// A scenario fed by the fake API server (every change reaches kproxy at once, so the 200
/// changes make many syncs).
fn api(mode: Mode) -> Scenario {
    let mut s = Scenario::with_api();
    s.mode = mode;
    s
}

/// How the other process writes: its own chain or table, one rule per write.
#[derive(Clone)]
enum Writer {
    /// `iptables-legacy -w` under the same (test) xtables lock file as kproxy.
    Legacy(String),
    /// `iptables-nft`: no lock; nf_tables transactions race on the ruleset generation.
    IptablesNft,
    /// `nft`: a foreign table.
    Nft,
}

impl Writer {
    fn cmd(&self) -> &'static str {
        match self {
            Writer::Legacy(_) => "iptables-legacy",
            Writer::IptablesNft => "iptables-nft",
            Writer::Nft => "nft",
        }
    }

    /// `ip netns exec NS CMD`, with the test's lock file for the legacy writer.
    fn command(&self, ns: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", ns, self.cmd()]);
        if let Writer::Legacy(lock) = self {
            c.env("XTABLES_LOCKFILE", lock);
        }
        c
    }

    fn setup(&self, ns: &Netns) {
        match self {
            Writer::Legacy(_) | Writer::IptablesNft => {
                let out = self
                    .command(ns.name())
                    .args(["-w", "-N", "FOREIGN-WRITER"])
                    .output()
                    .expect("spawn");
                assert!(out.status.success(), "{out:?}");
            }
            Writer::Nft => {
                ns.run("nft", &["add table inet foreign-writer"]);
                ns.run("nft", &["add chain inet foreign-writer c"]);
            }
        }
    }

    fn write(&self, ns: &str, i: usize) -> std::process::Output {
        let src = format!("192.0.{}.{}", 2 + i / 250, i % 250 + 1);
        let mut c = self.command(ns);
        match self {
            Writer::Legacy(_) | Writer::IptablesNft => {
                c.args(["-w", "-A", "FOREIGN-WRITER", "-s", &src, "-j", "RETURN"]);
            }
            Writer::Nft => {
                c.arg(format!(
                    "add rule inet foreign-writer c ip saddr {src} counter"
                ));
            }
        }
        c.output().expect("spawn foreign writer")
    }

    fn count(&self, ns: &Netns) -> usize {
        match self {
            Writer::Legacy(_) | Writer::IptablesNft => String::from_utf8_lossy(
                &self
                    .command(ns.name())
                    .args(["-w", "-S", "FOREIGN-WRITER"])
                    .output()
                    .expect("spawn")
                    .stdout,
            )
            .lines()
            .filter(|l| l.starts_with("-A"))
            .count(),
            Writer::Nft => ns
                .run("nft", &["list chain inet foreign-writer c"])
                .lines()
                .filter(|l| l.contains("ip saddr"))
                .count(),
        }
    }
}

#[test]
fn concurrent_writer_iptables_legacy_shared_lock() {
    if crate::support::require_root("concurrent_writer_iptables_legacy_shared_lock") {
        let lock = tempfile::NamedTempFile::new().expect("lock file");
        let path = lock.path().display().to_string();
        // kproxy and the writer share the test's lock file.
        let s = api(Mode::Iptables)
            .legacy_iptables()
            .env("XTABLES_LOCKFILE", &path);
        concurrent_writer(s, "iptables-legacy", Writer::Legacy(path));
    }
}

#[test]
fn concurrent_writer_iptables_nft() {
    if crate::support::require_root("concurrent_writer_iptables_nft") {
        concurrent_writer(api(Mode::Iptables), "iptables-nft", Writer::IptablesNft);
    }
}

#[test]
fn concurrent_writer_nftables() {
    if crate::support::require_root("concurrent_writer_nftables") {
        concurrent_writer(api(Mode::Nftables), "nftables", Writer::Nft);
    }
}
