//! Host side: the lab driver, and the behaviour on a kernel without IPVS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::kproxy::{KPROXY, KproxyProcess};
use crate::support::netns::Netns;

/// The guest tests the lab must run and pass (every test in [`crate::guest`]).
const GUEST_TESTS: usize = 15;

/// Whether this kernel has IPVS (then the no-IPVS check cannot be made here).
fn host_has_ipvs() -> bool {
    Path::new("/proc/net/ip_vs").exists()
}

/// On a kernel without IPVS, `--proxy-mode ipvs` exits 1 at once with a message that names
/// the cause and the way out, and programs nothing.
#[test]
fn without_ipvs_the_mode_fails_with_an_actionable_error() {
    if !crate::support::require_root("without_ipvs_the_mode_fails_with_an_actionable_error") {
        return;
    }
    let ns = Netns::new("noipvs");
    let dir = tempfile::tempdir().unwrap();
    let (p, status) = KproxyProcess::run(
        &ns,
        &[
            "--proxy-mode",
            "ipvs",
            "--manifests",
            dir.path().to_str().unwrap(),
            "--hostname-override",
            "node-a",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            "--once",
        ],
        Duration::from_secs(20),
    );
    if host_has_ipvs() {
        assert!(status.success(), "IPVS is present here: {}", p.stderr());
        return;
    }
    assert_eq!(status.code(), Some(1), "{}", p.stderr());
    assert!(
        p.stderr().contains(
            "this kernel has no IPVS (CONFIG_IP_VS); use --proxy-mode nftables or iptables"
        ),
        "{}",
        p.stderr()
    );
    let links = ns.run("ip", &["-o", "link"]);
    assert!(!links.contains("kproxy-ipvs0"), "{links}");
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Boots the lab VM and runs the guest tests in it. Fails (never skips) when qemu or apt-get
/// is missing: `.ci/run` installs them, and CI must exercise real IPVS.
#[test]
fn guest_runs_the_ipvs_end_to_end_tests() {
    let exe = std::env::current_exe().unwrap();
    // target/debug/kproxy → target/ipvs-lab
    let cache = Path::new(KPROXY)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("ipvs-lab");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(repo_root().join("tests/ipvs-lab/run.sh"))
        .env("KPROXY_LAB_E2E", &exe)
        .env("KPROXY_LAB_KPROXY", KPROXY)
        .env("KPROXY_LAB_CACHE", &cache)
        .env(
            "KPROXY_LAB_CORPUS",
            crate::support::installers::corpus_dir(),
        )
        .env(
            "KPROXY_LAB_FILTER",
            std::env::var("KPROXY_LAB_FILTER").unwrap_or_else(|_| "guest::".into()),
        )
        .output()
        .expect("run tests/ipvs-lab/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    eprintln!("ipvs lab: {:?} in total", started.elapsed());
    assert!(
        out.status.success(),
        "the IPVS lab failed ({}): see its output above",
        out.status
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_else(|| panic!("no test summary from the guest:\n{stdout}"));
    let passed: usize = summary
        .split("ok. ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable guest summary: {summary}"));
    if std::env::var_os("KPROXY_LAB_FILTER").is_none() {
        assert_eq!(passed, GUEST_TESTS, "{summary}");
    }
}
