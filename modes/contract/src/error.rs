//! Errors a person can act on.

use crate::ModeName;

/// A system command (iptables-restore, nft, ...) that failed.
///
/// Retrying: every variant fails the sync that ran the command, and the sync loop retries a
/// failed sync with backoff (1 s doubling to the sync period), so none is retried here. Only
/// [`CommandError::NotFound`] and a permission problem ([`CommandError::is_permission_denied`])
/// cannot go away by themselves; they are reported with what to do.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program is not installed.
    #[error("`{program}` was not found; install the `{package}` package")]
    NotFound {
        /// The program that was run.
        program: String,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The program could not be started or talked to.
    #[error("could not run `{program}`")]
    Io {
        /// The program that was run.
        program: String,
        /// What went wrong.
        #[source]
        cause: std::io::Error,
    },
    /// The program exited with a failure status.
    #[error("`{program}` exited with {status}: {stderr}")]
    Failed {
        /// The program that was run.
        program: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// The program ran longer than its time limit and was killed. The kernel transaction it
    /// was sending (an iptables-restore `COMMIT`, an `nft -f` batch) is all or nothing, so a
    /// killed run applied nothing.
    #[error("`{program}` did not finish within {limit:?} and was killed")]
    TimedOut {
        /// The program that was run.
        program: String,
        /// Its time limit.
        limit: std::time::Duration,
    },
}

impl CommandError {
    /// Whether the failure means "permission denied" (not root / no CAP_NET_ADMIN).
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Self::Io { cause, .. } => cause.kind() == std::io::ErrorKind::PermissionDenied,
            Self::Failed { stderr, .. } => {
                let s = stderr.to_ascii_lowercase();
                s.contains("permission denied") || s.contains("operation not permitted")
            }
            Self::NotFound { .. } | Self::TimedOut { .. } => false,
        }
    }
}

/// Why a mode could not read or program the kernel.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    /// The kernel (or its userland) rejected a transaction; nothing was applied.
    #[error("the kernel rejected the {mode} transaction")]
    Rejected {
        /// The mode.
        mode: ModeName,
        /// The failing command, with the line it reported.
        #[source]
        cause: CommandError,
    },
    /// The live state could not be read.
    #[error("could not read the live {mode} state")]
    ReadLive {
        /// The mode.
        mode: ModeName,
        /// The failing command.
        #[source]
        cause: CommandError,
    },
    /// The kernel lacks a feature this mode needs.
    #[error("this kernel lacks {0}")]
    Unsupported(&'static str),
}

impl ModeError {
    /// Whether the failure is a permission problem (the usual cause: not running as root).
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Self::Rejected { cause, .. } | Self::ReadLive { cause, .. } => {
                cause.is_permission_denied()
            }
            Self::Unsupported(_) => false,
        }
    }
}
