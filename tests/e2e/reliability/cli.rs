//! The command line under abuse: every bad flag is an exit status 2 naming it, never a panic
//! (exit 101) or a hang; output to a reader that has gone (`| head`) ends quietly.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::kproxy::KPROXY;

/// Runs kproxy with `args` (no root needed: each run fails on its flags before doing anything).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(KPROXY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kproxy");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
                .expect("read stderr");
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kproxy {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_bad_flag_is_exit_2_naming_it() {
    let dir = tempfile::tempdir().expect("dir");
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; 2 << 20]).expect("write");
    let big = format!("--config={}", big.display());
    for (args, names) in [
        (
            vec!["--iptables-sync-period=5000000000000000h"],
            "--iptables-sync-period",
        ),
        (vec!["--iptables-sync-period=-1s"], "--iptables-sync-period"),
        (
            vec![
                "--iptables-sync-period=5s",
                "--iptables-min-sync-period=10s",
            ],
            "--iptables-sync-period",
        ),
        (vec!["--manifests=/nonexistent"], "--manifests"),
        (vec!["--config=/dev/zero"], "--config"),
        (vec![big.as_str()], "--config"),
        (vec!["--oom-score-adj=5000"], "--oom-score-adj"),
        (vec!["--proxy-mode=kernelspace"], "--proxy-mode"),
        (
            vec!["--healthz-bind-address=nowhere:1"],
            "--healthz-bind-address",
        ),
        (vec!["--no-such-flag"], "--no-such-flag"),
    ] {
        let mut all = vec!["--hostname-override=n"];
        all.extend(args.iter().copied());
        let (code, err) = run(&all);
        assert_eq!(code, Some(2), "{all:?}: {err}");
        assert!(err.contains(names), "{all:?} does not name {names}: {err}");
        assert!(!err.contains("panicked"), "{all:?}: {err}");
    }
}

/// `kproxy ... --dry-run --once 2>&1 | head -3`: the reader goes after three lines; kproxy ends
/// without a panic (it used to exit 101 with a message nobody could read).
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/demo");
    let (reader, writer) = std::io::pipe().expect("pipe");
    let writer2 = writer.try_clone().expect("clone");
    let mut child = Command::new(KPROXY)
        .args(["--manifests", &demo.display().to_string()])
        .args(["--hostname-override=node-a", "--dry-run", "--once"])
        // Nothing to diff against: an empty kernel, whoever runs the test.
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .spawn()
        .expect("spawn kproxy");
    let mut lines = BufReader::new(reader).lines();
    for _ in 0..3 {
        lines.next().expect("a line").expect("text");
    }
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "kproxy did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status}");
}
