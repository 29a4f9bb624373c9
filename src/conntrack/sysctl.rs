//! Conntrack sysctl tuning at start-up (`--conntrack-*`, `conntrack.*` in the config file), as
//! upstream's `pkg/proxy/conntrack/sysctls.go` does it:
//!
//! * `nf_conntrack_max = max(maxPerCore × online CPUs, min)`, capped at 1,048,576, and only ever
//!   raised; `maxPerCore = 0` leaves the limit alone. The hash table (`hashsize`, a module
//!   parameter) is grown to `max / 4` when smaller, so lookups stay short.
//! * The TCP established and close-wait timeouts, the UDP timeouts and `tcp_be_liberal` are set
//!   when configured (a zero duration leaves the kernel's value).
//!
//! Two deliberate differences:
//!
//! * `nf_conntrack_max` and `hashsize` are host-wide. kproxy writes them only from the initial
//!   network namespace; anywhere else (a test namespace, a node container with its own netns) it
//!   logs what it would have set and leaves them alone, instead of failing as upstream does. The
//!   kernel refuses those writes outside the initial namespace anyway, and a proxy that exits
//!   over a table-size hint takes every Service on the node down with it.
//! * A write that fails (read-only `/proc/sys` or `/sys`, as some container runtimes mount them)
//!   is a warning naming the sysctl and the value, not a fatal error; the rest still apply.

use std::path::PathBuf;
use std::time::Duration;

/// Upstream's cap on the computed `nf_conntrack_max`, so very large machines do not pin memory.
pub const MAX_LIMIT: u64 = 1_048_576;

/// What to set. `None` / zero means "leave the kernel's value".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackSysctls {
    /// `--conntrack-max-per-core` (default 32768); 0 leaves `nf_conntrack_max` alone.
    pub max_per_core: u64,
    /// `--conntrack-min` (default 131072).
    pub min: u64,
    /// `--conntrack-tcp-timeout-established` (default 24h).
    pub tcp_established_timeout: Duration,
    /// `--conntrack-tcp-timeout-close-wait` (default 1h).
    pub tcp_close_wait_timeout: Duration,
    /// `--conntrack-tcp-be-liberal`: accept out-of-window TCP packets instead of marking them
    /// INVALID (which also makes the iptables mode skip its INVALID-drop rule).
    pub tcp_be_liberal: bool,
    /// `--conntrack-udp-timeout` (default 0: leave).
    pub udp_timeout: Duration,
    /// `--conntrack-udp-timeout-stream` (default 0: leave).
    pub udp_stream_timeout: Duration,
}

impl Default for ConntrackSysctls {
    fn default() -> Self {
        Self {
            max_per_core: 32_768,
            min: 131_072,
            tcp_established_timeout: Duration::from_secs(24 * 3600),
            tcp_close_wait_timeout: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }
}

impl ConntrackSysctls {
    /// The `nf_conntrack_max` to ensure on a machine with `cpus` online CPUs; `None` leaves it.
    pub fn wanted_max(&self, cpus: u64) -> Option<u64> {
        if self.max_per_core == 0 {
            return None;
        }
        let scaled = self.max_per_core.saturating_mul(cpus);
        Some(if scaled > MAX_LIMIT {
            MAX_LIMIT
        } else {
            scaled.max(self.min)
        })
    }
}

/// One sysctl write kproxy decided on, for the log and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Written.
    Set {
        /// The file, relative to the sysctl root.
        name: &'static str,
        /// The value written.
        value: u64,
    },
    /// Host-wide and this process is not in the initial network namespace: left alone.
    SkippedHostWide {
        /// The file.
        name: &'static str,
        /// What would have been written.
        value: u64,
    },
    /// The write failed.
    Failed {
        /// The file.
        name: &'static str,
        /// The value.
        value: u64,
        /// Why.
        error: String,
    },
}

/// The files, behind a trait so the decision logic is tested without a kernel.
pub trait SysctlFs {
    /// Reads an integer sysctl (`net/netfilter/...`) or module parameter.
    fn read(&self, name: &str) -> std::io::Result<u64>;
    /// Writes one.
    fn write(&self, name: &str, value: u64) -> std::io::Result<()>;
    /// Whether this process runs in the initial network namespace.
    fn in_initial_netns(&self) -> bool;
    /// Online CPUs of the node (not of this process's cpuset: the limit is host-wide).
    fn cpus(&self) -> u64;
}

const MAX: &str = "net/netfilter/nf_conntrack_max";
const HASHSIZE: &str = "module/nf_conntrack/parameters/hashsize";

/// Applies `wanted`; never fails, every problem is an [`Action::Failed`] (logged by the caller).
pub fn apply(wanted: &ConntrackSysctls, fs: &dyn SysctlFs) -> Vec<Action> {
    let mut actions = Vec::new();
    if let Some(max) = wanted.wanted_max(fs.cpus()) {
        let host = fs.in_initial_netns();
        // Only ever raised: a node admin's larger value stays.
        if !matches!(fs.read(MAX), Ok(cur) if cur >= max) {
            actions.push(if host {
                write(fs, MAX, max)
            } else {
                Action::SkippedHostWide {
                    name: MAX,
                    value: max,
                }
            });
        }
        if fs.read(HASHSIZE).is_ok_and(|cur| cur < max / 4) {
            actions.push(if host {
                write(fs, HASHSIZE, max / 4)
            } else {
                Action::SkippedHostWide {
                    name: HASHSIZE,
                    value: max / 4,
                }
            });
        }
    }
    let per_netns = [
        (
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            wanted.tcp_established_timeout.as_secs(),
        ),
        (
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            wanted.tcp_close_wait_timeout.as_secs(),
        ),
        (
            "net/netfilter/nf_conntrack_tcp_be_liberal",
            u64::from(wanted.tcp_be_liberal),
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout",
            wanted.udp_timeout.as_secs(),
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            wanted.udp_stream_timeout.as_secs(),
        ),
    ];
    for (name, value) in per_netns {
        // Zero means "not configured" for every one of these (be_liberal is only ever turned
        // on, as upstream does).
        if value == 0 || fs.read(name).is_ok_and(|cur| cur == value) {
            continue;
        }
        actions.push(write(fs, name, value));
    }
    actions
}

fn write(fs: &dyn SysctlFs, name: &'static str, value: u64) -> Action {
    match fs.write(name, value) {
        Ok(()) => Action::Set { name, value },
        Err(err) => Action::Failed {
            name,
            value,
            error: err.to_string(),
        },
    }
}

/// Logs what [`apply`] did, one line per sysctl.
pub fn log(actions: &[Action]) {
    for action in actions {
        match action {
            Action::Set { name, value } => tracing::info!(sysctl = name, value, "set sysctl"),
            Action::SkippedHostWide { name, value } => tracing::info!(
                sysctl = name,
                value,
                "not in the host network namespace: leaving this host-wide conntrack setting alone"
            ),
            Action::Failed { name, value, error } => tracing::warn!(
                sysctl = name,
                value,
                %error,
                "could not set a conntrack sysctl; continuing with the kernel's value"
            ),
        }
    }
}

/// The real files under `/proc/sys` and `/sys`.
#[derive(Debug)]
pub struct ProcSys {
    proc_sys: PathBuf,
    sys: PathBuf,
}

impl Default for ProcSys {
    fn default() -> Self {
        Self {
            proc_sys: PathBuf::from("/proc/sys"),
            sys: PathBuf::from("/sys"),
        }
    }
}

impl ProcSys {
    fn path(&self, name: &str) -> PathBuf {
        if name.starts_with("module/") {
            self.sys.join(name)
        } else {
            self.proc_sys.join(name)
        }
    }
}

impl SysctlFs for ProcSys {
    fn read(&self, name: &str) -> std::io::Result<u64> {
        let text = std::fs::read_to_string(self.path(name))?;
        text.trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    fn write(&self, name: &str, value: u64) -> std::io::Result<()> {
        std::fs::write(self.path(name), value.to_string())
    }

    fn in_initial_netns(&self) -> bool {
        // The kernel makes nf_conntrack_max read-only (0444) in every namespace but the
        // initial one, which is exactly the property that matters here. (Comparing
        // /proc/self/ns/net with /proc/1/ns/net needs ptrace rights over PID 1, which a
        // container may not have.)
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(self.path(MAX)).is_ok_and(|m| m.permissions().mode() & 0o200 != 0)
    }

    fn cpus(&self) -> u64 {
        std::fs::read_to_string(self.sys.join("devices/system/cpu/online"))
            .ok()
            .and_then(|s| count_cpu_list(s.trim()))
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as u64)
            })
            .unwrap_or(1)
    }
}

/// Counts a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<u64> {
    let mut n = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>().ok()?.checked_sub(a.parse::<u64>().ok()?)? + 1,
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    struct Fake {
        values: RefCell<BTreeMap<String, u64>>,
        host: bool,
        cpus: u64,
        read_only: bool,
    }

    impl Fake {
        fn new(host: bool) -> Self {
            let values = [
                (MAX, 262_144),
                (HASHSIZE, 65_536),
                (
                    "net/netfilter/nf_conntrack_tcp_timeout_established",
                    432_000,
                ),
                ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", 60),
                ("net/netfilter/nf_conntrack_tcp_be_liberal", 0),
                ("net/netfilter/nf_conntrack_udp_timeout", 30),
                ("net/netfilter/nf_conntrack_udp_timeout_stream", 120),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            Self {
                values: RefCell::new(values),
                host,
                cpus: 16,
                read_only: false,
            }
        }
    }

    impl SysctlFs for Fake {
        fn read(&self, name: &str) -> std::io::Result<u64> {
            self.values
                .borrow()
                .get(name)
                .copied()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
        fn write(&self, name: &str, value: u64) -> std::io::Result<()> {
            if self.read_only {
                return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
            }
            self.values.borrow_mut().insert(name.to_string(), value);
            Ok(())
        }
        fn in_initial_netns(&self) -> bool {
            self.host
        }
        fn cpus(&self) -> u64 {
            self.cpus
        }
    }

    #[test]
    fn max_follows_upstreams_formula() {
        let s = ConntrackSysctls::default();
        assert_eq!(s.wanted_max(2), Some(131_072), "the floor wins on 2 cores");
        assert_eq!(s.wanted_max(16), Some(524_288));
        assert_eq!(s.wanted_max(64), Some(MAX_LIMIT), "capped");
        let off = ConntrackSysctls {
            max_per_core: 0,
            ..s
        };
        assert_eq!(off.wanted_max(16), None);
    }

    #[test]
    fn on_the_host_raises_max_and_hashsize_and_sets_timeouts() {
        let fs = Fake::new(true);
        let actions = apply(&ConntrackSysctls::default(), &fs);
        assert_eq!(fs.read(MAX).ok(), Some(524_288));
        assert_eq!(fs.read(HASHSIZE).ok(), Some(131_072));
        assert_eq!(
            fs.read("net/netfilter/nf_conntrack_tcp_timeout_established")
                .ok(),
            Some(86_400)
        );
        assert_eq!(
            fs.read("net/netfilter/nf_conntrack_tcp_timeout_close_wait")
                .ok(),
            Some(3600)
        );
        // Unconfigured values stay.
        assert_eq!(
            fs.read("net/netfilter/nf_conntrack_udp_timeout").ok(),
            Some(30)
        );
        assert_eq!(
            fs.read("net/netfilter/nf_conntrack_tcp_be_liberal").ok(),
            Some(0)
        );
        assert_eq!(actions.len(), 4, "{actions:?}");
        // Idempotent: a second run writes nothing.
        assert!(apply(&ConntrackSysctls::default(), &fs).is_empty());
    }

    #[test]
    fn a_larger_max_is_never_lowered() {
        let fs = Fake::new(true);
        fs.values.borrow_mut().insert(MAX.into(), 2_000_000);
        fs.values.borrow_mut().insert(HASHSIZE.into(), 500_000);
        let actions = apply(&ConntrackSysctls::default(), &fs);
        assert_eq!(fs.read(MAX).ok(), Some(2_000_000));
        assert!(
            actions.iter().all(
                |a| !matches!(a, Action::Set { name, .. } if *name == MAX || *name == HASHSIZE)
            )
        );
    }

    #[test]
    fn outside_the_host_namespace_host_wide_values_are_left_alone() {
        let fs = Fake::new(false);
        let wanted = ConntrackSysctls {
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(45),
            ..ConntrackSysctls::default()
        };
        let actions = apply(&wanted, &fs);
        assert_eq!(fs.read(MAX).ok(), Some(262_144));
        assert_eq!(fs.read(HASHSIZE).ok(), Some(65_536));
        assert!(actions.contains(&Action::SkippedHostWide {
            name: MAX,
            value: 524_288
        }));
        assert_eq!(
            fs.read("net/netfilter/nf_conntrack_tcp_be_liberal").ok(),
            Some(1)
        );
        assert_eq!(
            fs.read("net/netfilter/nf_conntrack_udp_timeout").ok(),
            Some(45)
        );
    }

    #[test]
    fn failed_writes_are_reported_not_fatal() {
        let mut fs = Fake::new(true);
        fs.read_only = true;
        let actions = apply(&ConntrackSysctls::default(), &fs);
        assert!(!actions.is_empty());
        assert!(actions.iter().all(|a| matches!(a, Action::Failed { .. })));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("x"), None);
    }
}
