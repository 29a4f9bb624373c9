//! Errors a person can act on.

use crate::ModeName;

/// Why a mode's kernel operation failed: the one cause type behind every [`ModeError`]. Four
/// kinds: a program kproxy ran (`NotFound`, `Io`, `Failed`), a kernel interface it talks to
/// directly (`Netlink`), output it could not parse (`Unreadable`), a time limit (`TimedOut`).
/// Each prints its own message only; what caused it is its `source`, printed once by
/// [`Chain`].
///
/// Retrying: every variant fails the sync that ran the operation, and the sync loop retries a
/// failed sync with backoff (1 s doubling to the sync period), so none is retried here. Only
/// [`Cause::NotFound`] and a permission problem ([`Cause::is_permission_denied`]) cannot go
/// away by themselves; they are reported with what to do.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
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
    /// A kernel interface kproxy talks to without a program (nf_tables or IPVS over netlink)
    /// failed; the cause says how.
    #[error("{interface} failed")]
    Netlink {
        /// The interface: `nf_tables netlink`, `IPVS netlink`.
        interface: &'static str,
        /// What went wrong.
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The program succeeded, but what it printed could not be read.
    #[error("could not read what `{program}` printed")]
    Unreadable {
        /// The program that was run.
        program: String,
        /// Why.
        #[source]
        cause: Box<dyn std::error::Error + Send + Sync + 'static>,
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

impl Cause {
    /// Whether the failure means "permission denied" (not root / no CAP_NET_ADMIN).
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Self::Io { cause, .. } => cause.kind() == std::io::ErrorKind::PermissionDenied,
            Self::Failed { stderr, .. } => {
                let s = stderr.to_ascii_lowercase();
                s.contains("permission denied") || s.contains("operation not permitted")
            }
            Self::Netlink { cause, .. } => {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(cause.as_ref());
                while let Some(err) = source {
                    if err
                        .downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
                    {
                        return true;
                    }
                    source = err.source();
                }
                false
            }
            Self::NotFound { .. } | Self::TimedOut { .. } | Self::Unreadable { .. } => false,
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
        cause: Cause,
    },
    /// The live state could not be read.
    #[error("could not read the live {mode} state")]
    ReadLive {
        /// The mode.
        mode: ModeName,
        /// The failing command.
        #[source]
        cause: Cause,
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

/// Displays an error with its causes, `error: cause: root cause`. kproxy's errors keep their
/// cause out of their own message (it is their `source`), so each cause is printed once, by
/// this; a log line or report that shows an error uses it.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink failure prints its cause once, and a permission problem deep in it is found.
    #[test]
    fn causes_print_once_and_permission_is_found_in_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("nf_tables netlink unavailable: opening the socket")]
        struct Unavailable(#[source] std::io::Error);

        let err = ModeError::Rejected {
            mode: ModeName::Nftables,
            cause: Cause::Netlink {
                interface: "nf_tables netlink",
                cause: Box::new(Unavailable(std::io::Error::from_raw_os_error(1))),
            },
        };
        assert_eq!(
            Chain(&err).to_string(),
            "the kernel rejected the nftables transaction: nf_tables netlink failed: \
             nf_tables netlink unavailable: opening the socket: Operation not permitted (os error 1)"
        );
        assert!(err.is_permission_denied());
        let other = Cause::Netlink {
            interface: "IPVS netlink",
            cause: Box::new(Unavailable(std::io::Error::from_raw_os_error(2))),
        };
        assert!(!other.is_permission_denied());
    }
}
