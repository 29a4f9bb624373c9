//! Why the daemon stops other than by a signal, carried from whoever decides it (the config
//! watcher, a listener that may not fail) to the run loop, which then exits with status 1. The
//! rules stay in the kernel in every case, as on SIGTERM: the next kproxy takes them over.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::sync::mpsc;

/// A reason to stop with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The `--config` file's content changed: the pod restarts with the new settings, as
    /// upstream kube-proxy does.
    ConfigChanged(PathBuf),
    /// A listener could not be served and `--bind-address-hard-fail` is set.
    ListenerFailed {
        /// `/healthz` or `/metrics`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: String,
    },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::ConfigChanged(path) => write!(
                f,
                "the --config file {} changed; exiting so that kproxy restarts with the new \
                 settings (as upstream kube-proxy does); the rules stay in place meanwhile",
                path.display()
            ),
            StopReason::ListenerFailed { what, addr, error } => write!(
                f,
                "cannot serve {what} on {addr}: {error} (--bind-address-hard-fail)"
            ),
        }
    }
}

/// The sending side, cloned to every component that may stop the daemon.
#[derive(Debug, Clone)]
pub struct StopHandle(mpsc::UnboundedSender<StopReason>);

impl StopHandle {
    /// Asks the daemon to stop. The first reason wins.
    pub fn stop(&self, reason: StopReason) {
        // The run loop may already be gone; then there is nothing left to stop.
        let _ = self.0.send(reason);
    }
}

/// A handle and the receiver the run loop waits on.
pub fn channel() -> (StopHandle, mpsc::UnboundedReceiver<StopReason>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (StopHandle(tx), rx)
}
