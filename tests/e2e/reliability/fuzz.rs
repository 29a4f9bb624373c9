//! Guarantee 4, the random side: the `cargo fuzz` target `object_to_rules` (`fuzz/`) feeds
//! arbitrary text through manifest parsing, the desired-state builder, both kernel modes'
//! render and plan, and their fake kernels, for [`FUZZ_SECONDS`] per CI run, starting from the
//! seed corpus in `fuzz/corpus/object_to_rules`. A crash fails the test with the input that
//! caused it. A missing `cargo-fuzz` fails the test too (it is not skipped): `.ci/run` installs
//! it.
//!
//! Built with `--sanitizer none` (libFuzzer's coverage instrumentation only) and
//! `RUSTC_BOOTSTRAP=1`, so the pinned stable toolchain builds it; no nightly is needed. Built in
//! the dev profile: overflow checks and debug assertions stay on (more bugs become crashes), and
//! a cold build costs about half the CPU of a release one (7.8 against 16.8 CPU-minutes here:
//! the whole control plane, kube and tokio included, is instrumented).

use std::path::Path;
use std::process::Command;

/// How long libFuzzer runs.
const FUZZ_SECONDS: u32 = 20;

#[test]
fn fuzz_object_to_rules_briefly() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let version = Command::new(&cargo).args(["fuzz", "--version"]).output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "cargo-fuzz is not installed (`cargo install cargo-fuzz`; .ci/run does): {version:?}"
    );
    let work = tempfile::Builder::new()
        .prefix("kpx-fuzz-")
        .tempdir()
        .expect("temp dir");
    let corpus = work.path().join("corpus");
    std::fs::create_dir(&corpus).expect("corpus dir");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-target");
    let seeds = repo.join("fuzz/corpus/object_to_rules");
    let started = std::time::Instant::now();
    let out = Command::new(&cargo)
        .current_dir(repo.join("fuzz"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "fuzz",
            "run",
            "object_to_rules",
            "--sanitizer",
            "none",
            "--dev",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // New inputs go to the temp corpus; the seeds are read only.
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={FUZZ_SECONDS}"))
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", work.path().display()))
        .output()
        .expect("spawn cargo fuzz");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stats = stderr
        .lines()
        .rev()
        .find(|l| l.contains("Done ") || l.starts_with("stat::number_of_executed_units"))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "cargo fuzz object_to_rules: {} ({:?} including the build); {stats}",
        out.status,
        started.elapsed()
    );
    if !out.status.success() {
        let crashes: Vec<String> = std::fs::read_dir(work.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("crash-"))
            .map(|e| {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                format!(
                    "{}:\n{}",
                    e.path().display(),
                    String::from_utf8_lossy(&bytes)
                )
            })
            .collect();
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        panic!(
            "cargo fuzz failed ({}); crashing inputs: {crashes:#?}\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert!(
        stderr.contains("Done "),
        "libFuzzer did not finish its run:\n{stderr}"
    );
}
