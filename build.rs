//! Records the git commit the binary is built from, so `kproxy --version` names it. Outside a
//! git checkout (an image build from a source archive) `KPROXY_GIT_COMMIT` supplies it.
#![allow(
    clippy::disallowed_methods,
    reason = "the build script asks git for the commit"
)]

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KPROXY_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("KPROXY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KPROXY_GIT_COMMIT={}", commit.trim());
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}
