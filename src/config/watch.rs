//! Watching the `--config` file: upstream kube-proxy exits when its configuration file changes,
//! so that the DaemonSet restarts it with the new settings; kproxy does the same.
//!
//! The file is read again every second and compared with what kproxy started with, rather than
//! watched with inotify: a ConfigMap volume replaces the file by swapping a symlinked directory,
//! which a watch on the file never sees (upstream misses such updates for that reason), and a
//! touch or chmod that leaves the content alone is no reason to restart. A read that fails (the
//! moment of a swap) is tried again at the next tick.

use std::time::Duration;

use super::ConfigFile;
use super::file::read_bounded;
use crate::stop::{StopHandle, StopReason};

/// How often the file is read.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Whether the file now differs from what kproxy started with: `Some(true)` changed,
/// `Some(false)` the same, `None` unreadable right now.
pub fn changed(file: &ConfigFile) -> Option<bool> {
    read_bounded(&file.path).ok().map(|now| now != file.bytes)
}

/// Checks the file every [`PERIOD`] until it changes, then asks the daemon to stop.
pub async fn run(file: ConfigFile, stop: StopHandle) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if changed(&file) == Some(true) {
            stop.stop(StopReason::ConfigChanged(file.path.clone()));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_content_counts_and_a_rewrite_of_the_same_bytes_does_not() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("config.conf");
        std::fs::write(&path, "mode: iptables\n").expect("write");
        let file = ConfigFile {
            path: path.clone(),
            bytes: b"mode: iptables\n".to_vec(),
        };
        assert_eq!(changed(&file), Some(false));
        std::fs::write(&path, "mode: iptables\n").expect("rewrite");
        assert_eq!(changed(&file), Some(false));
        // A ConfigMap-style swap: the path is a symlink into a directory that is replaced.
        let data = dir.path().join("..data_2");
        std::fs::create_dir(&data).expect("dir");
        std::fs::write(data.join("config.conf"), "mode: nftables\n").expect("write");
        std::fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink(data.join("config.conf"), &path).expect("link");
        assert_eq!(changed(&file), Some(true));
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(changed(&file), None);
    }
}
