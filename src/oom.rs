//! `--oom-score-adj` / `oomScoreAdj`: the kernel's OOM-killer preference for the kproxy process
//! (upstream's default -999: the node's proxy is among the last processes to be killed, since
//! every pod's service traffic depends on it). Written to the process's own
//! `/proc/self/oom_score_adj` at start; a failure is a warning, as upstream.

use std::path::Path;

/// Writes `value` to `file` (the process's `oom_score_adj`, or a test's file).
pub fn apply(file: &Path, value: i32) -> std::io::Result<()> {
    std::fs::write(file, format!("{value}\n"))
}

/// Applies `value` to this process and logs the outcome.
pub fn apply_to_self(value: i32) {
    match apply(Path::new("/proc/self/oom_score_adj"), value) {
        Ok(()) => tracing::debug!(value, "oom_score_adj set"),
        Err(err) => tracing::warn!(
            value,
            error = %err,
            "cannot set this process's oom_score_adj (--oom-score-adj); continuing"
        ),
    }
}
