//! Validated, typed settings: a `--config` file (if any) with command-line flags over it.
//!
//! Deliberate difference from kube-proxy: upstream ignores most flags when `--config` is given;
//! kproxy lets a flag given on the command line override the file's field (and logs it), which
//! is what people expect and keeps upstream's common `--config` + `--hostname-override` setup
//! working unchanged.

pub mod duration;
pub mod file;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use kproxy_contract::ModeName;

use crate::cli::{Args, BackendArg, LogFormat, ProxyModeArg};

pub use validate::{NodePortSetting, check_overlap, parse_cidrs};

/// A configuration error: names the field (flag or config path) and the bad value. Exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `--flag` or `config.path`.
    pub field: String,
    /// The offending value.
    pub value: String,
    /// Why it is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: {}",
            self.field, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Where objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    /// A directory of manifests.
    Manifests(PathBuf),
    /// The Kubernetes API.
    Api {
        /// `--kubeconfig`.
        kubeconfig: Option<PathBuf>,
        /// `--master`.
        master: Option<String>,
    },
}

/// Which iptables backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Detect.
    Auto,
    /// iptables-nft.
    Nft,
    /// iptables-legacy.
    Legacy,
}

/// Everything kproxy runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data-plane mode.
    pub mode: ModeName,
    /// Object source.
    pub source: SourceConfig,
    /// This node's name.
    pub hostname: String,
    /// Pod CIDRs (at most one per family).
    pub cluster_cidrs: Vec<IpNet>,
    /// Service CIDRs (at most one per family).
    pub service_cidrs: Vec<IpNet>,
    /// NodePort addresses.
    pub nodeport_addresses: NodePortSetting,
    /// SNAT all service traffic.
    pub masquerade_all: bool,
    /// The masquerade fwmark bit.
    pub masquerade_bit: u8,
    /// `/healthz` listen address; `None` disables.
    pub healthz_bind: Option<SocketAddr>,
    /// `/metrics` listen address; `None` disables.
    pub metrics_bind: Option<SocketAddr>,
    /// Full resync period of the selected mode.
    pub sync_period: Duration,
    /// Minimum time between syncs of the selected mode.
    pub min_sync_period: Duration,
    /// iptables backend.
    pub iptables_backend: BackendChoice,
    /// Userspace mode: idle timeout of a UDP flow (`--udp-timeout`).
    pub udp_timeout: Duration,
    /// Userspace mode: how long a connection to a removed endpoint stays open.
    pub userspace_grace_period: Duration,
    /// `conntrack.tcpBeLiberal` / `--conntrack-tcp-be-liberal` (also in [`Config::conntrack`]).
    pub tcp_be_liberal: bool,
    /// Conntrack sysctls set at start-up (`--conntrack-*`, `conntrack.*`).
    pub conntrack: crate::conntrack::sysctl::ConntrackSysctls,
    /// The IPVS scheduler (`--ipvs-scheduler`, `ipvs.scheduler`; default `rr`).
    pub ipvs_scheduler: String,
    /// The admin socket (`--admin-socket`); `None` disables it.
    pub admin_socket: Option<PathBuf>,
    /// Print the diff, change nothing.
    pub dry_run: bool,
    /// Exit after the first complete sync.
    pub once: bool,
    /// Remove everything and exit.
    pub cleanup: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Fields of the config file kproxy ignored (warned about once logging is up).
    pub ignored_fields: Vec<String>,
    /// Config-file fields that a command-line flag overrode.
    pub overridden_fields: Vec<String>,
}

/// Builds the configuration from the command line (and the file it names).
pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
    let (file, ignored_fields) = match &args.config {
        Some(path) => file::load(path)?,
        None => (file::KubeProxyConfiguration::default(), Vec::new()),
    };
    let mut overridden = Vec::new();
    // A flag given on the command line wins over the file; record when both are set.
    let mut pick =
        |flag: Option<String>, field: Option<String>, name: &str| -> Option<(String, String)> {
            match (flag, field) {
                (Some(v), Some(_)) => {
                    overridden.push(name.to_string());
                    Some((v, format!("--{}", flag_name(name))))
                }
                (Some(v), None) => Some((v, format!("--{}", flag_name(name)))),
                (None, Some(v)) => Some((v, name.to_string())),
                (None, None) => None,
            }
        };

    let mode_text = pick(
        args.proxy_mode.map(|m| mode_arg(m).as_str().to_string()),
        file.mode.clone().filter(|m| !m.is_empty()),
        "mode",
    );
    let mode = match mode_text {
        None => ModeName::Iptables,
        Some((v, field)) => parse_mode(&v).ok_or_else(|| ConfigError {
            field,
            value: v.clone(),
            reason: "expected one of iptables, nftables, ipvs, userspace".into(),
        })?,
    };

    let source = match &args.manifests {
        Some(dir) => SourceConfig::Manifests(dir.clone()),
        None => SourceConfig::Api {
            kubeconfig: args.kubeconfig.clone().or_else(|| {
                file.client_connection
                    .kubeconfig
                    .clone()
                    .filter(|k| !k.is_empty())
                    .map(PathBuf::from)
            }),
            master: args.master.clone(),
        },
    };

    let hostname = match pick(
        args.hostname_override.clone(),
        file.hostname_override.clone().filter(|h| !h.is_empty()),
        "hostnameOverride",
    ) {
        Some((h, _)) => h.trim().to_lowercase(),
        None => validate::system_hostname(),
    };
    if hostname.is_empty() {
        return Err(ConfigError {
            field: "--hostname-override".into(),
            value: hostname,
            reason: "the node name is empty and the host name could not be read".into(),
        });
    }

    let cluster_cidrs = match pick(
        args.cluster_cidr.clone(),
        file.cluster_cidr.clone(),
        "clusterCIDR",
    ) {
        Some((v, field)) => parse_cidrs(&v, &field)?,
        None => Vec::new(),
    };
    let service_cidrs = match &args.service_cluster_ip_range {
        Some(v) => parse_cidrs(v, "--service-cluster-ip-range")?,
        None => Vec::new(),
    };
    check_overlap(&service_cidrs, &cluster_cidrs)?;

    let nodeport_addresses = match pick(
        args.nodeport_addresses.clone(),
        file.node_port_addresses.as_ref().map(|v| v.join(",")),
        "nodePortAddresses",
    ) {
        Some((v, field)) => NodePortSetting::parse(&v, &field)?,
        // Upstream's nftables mode serves NodePorts on the primary node IPs by default.
        None if mode == ModeName::Nftables => NodePortSetting::Primary,
        None => NodePortSetting::AllLocal,
    };

    let (file_masq_all, file_masq_bit) = match mode {
        ModeName::Nftables => (file.nftables.masquerade_all, file.nftables.masquerade_bit),
        _ => (file.iptables.masquerade_all, file.iptables.masquerade_bit),
    };
    let masquerade_all = args.masquerade_all.or(file_masq_all).unwrap_or(false);
    let masquerade_bit = match (args.iptables_masquerade_bit.map(i64::from), file_masq_bit) {
        (Some(b), _) => check_bit(b, "--iptables-masquerade-bit")?,
        (None, Some(b)) => check_bit(b, "iptables.masqueradeBit")?,
        (None, None) => 14,
    };

    let healthz_bind = bind_address(
        pick(
            args.healthz_bind_address.clone(),
            file.healthz_bind_address.clone(),
            "healthzBindAddress",
        ),
        "0.0.0.0:10256",
    )?;
    let metrics_bind = bind_address(
        pick(
            args.metrics_bind_address.clone(),
            file.metrics_bind_address.clone(),
            "metricsBindAddress",
        ),
        "127.0.0.1:10249",
    )?;

    let (sync_flag, min_flag, sync_file, min_file, section, default_min) = match mode {
        ModeName::Nftables => (
            &args.nftables_sync_period,
            &args.nftables_min_sync_period,
            &file.nftables.sync_period,
            &file.nftables.min_sync_period,
            "nftables",
            Duration::from_secs(1),
        ),
        ModeName::Ipvs => (
            &args.ipvs_sync_period,
            &args.ipvs_min_sync_period,
            &file.ipvs.sync_period,
            &file.ipvs.min_sync_period,
            "ipvs",
            Duration::ZERO,
        ),
        _ => (
            &args.iptables_sync_period,
            &args.iptables_min_sync_period,
            &file.iptables.sync_period,
            &file.iptables.min_sync_period,
            "iptables",
            Duration::from_secs(1),
        ),
    };
    let sync_period = period(
        pick(
            sync_flag.clone(),
            sync_file.clone(),
            &format!("{section}.syncPeriod"),
        ),
        Duration::from_secs(30),
    )?;
    let min_sync_period = period(
        pick(
            min_flag.clone(),
            min_file.clone(),
            &format!("{section}.minSyncPeriod"),
        ),
        default_min,
    )?;
    if sync_period.is_zero() {
        return Err(ConfigError {
            field: format!("{section}.syncPeriod"),
            value: "0".into(),
            reason: "must be greater than 0".into(),
        });
    }
    // Also check the other modes' durations parse, so a typo is caught whichever mode runs.
    for (flag, name) in [
        (&args.iptables_sync_period, "--iptables-sync-period"),
        (&args.iptables_min_sync_period, "--iptables-min-sync-period"),
        (&args.nftables_sync_period, "--nftables-sync-period"),
        (&args.nftables_min_sync_period, "--nftables-min-sync-period"),
        (&args.ipvs_sync_period, "--ipvs-sync-period"),
        (&args.ipvs_min_sync_period, "--ipvs-min-sync-period"),
    ] {
        if let Some(v) = flag {
            duration::parse(v).map_err(|reason| ConfigError {
                field: name.into(),
                value: v.clone(),
                reason,
            })?;
        }
    }

    let iptables_backend = match args.iptables_backend {
        None | Some(BackendArg::Auto) => BackendChoice::Auto,
        Some(BackendArg::Nft) => BackendChoice::Nft,
        Some(BackendArg::Legacy) => BackendChoice::Legacy,
    };

    let ipvs_scheduler = match pick(
        args.ipvs_scheduler.clone(),
        file.ipvs.scheduler.clone().filter(|s| !s.is_empty()),
        "ipvs.scheduler",
    ) {
        None => "rr".to_string(),
        Some((v, field)) => {
            let name = v.trim().to_string();
            if !kproxy_ipvs::SCHEDULERS.contains(&name.as_str()) {
                return Err(ConfigError {
                    field,
                    value: v,
                    reason: format!("expected one of {}", kproxy_ipvs::SCHEDULERS.join(", ")),
                });
            }
            name
        }
    };
    let conntrack = conntrack_settings(args, &file.conntrack, &mut overridden)?;
    let udp_timeout = userspace_duration(&args.udp_timeout, "--udp-timeout", 30)?;
    let userspace_grace_period =
        userspace_duration(&args.userspace_grace_period, "--userspace-grace-period", 10)?;

    Ok(Config {
        mode,
        source,
        hostname,
        cluster_cidrs,
        service_cidrs,
        nodeport_addresses,
        masquerade_all,
        masquerade_bit,
        healthz_bind,
        metrics_bind,
        sync_period,
        min_sync_period,
        iptables_backend,
        udp_timeout,
        userspace_grace_period,
        tcp_be_liberal: conntrack.tcp_be_liberal,
        conntrack,
        ipvs_scheduler,
        // A string, not a PathBuf, on the command line: clap refuses an empty path, and empty
        // is how the socket is turned off.
        admin_socket: match args.admin_socket.as_deref().map(str::trim) {
            None => Some(PathBuf::from(crate::admin::DEFAULT_SOCKET)),
            Some("") => None,
            Some(p) => Some(PathBuf::from(p)),
        },
        dry_run: args.dry_run,
        once: args.once,
        cleanup: args.cleanup,
        log_format: args.log_format,
        ignored_fields,
        overridden_fields: overridden,
    })
}

/// The `--conntrack-*` flags over the file's `conntrack` section.
fn conntrack_settings(
    args: &Args,
    file: &file::Conntrack,
    overridden: &mut Vec<String>,
) -> Result<crate::conntrack::sysctl::ConntrackSysctls, ConfigError> {
    let defaults = crate::conntrack::sysctl::ConntrackSysctls::default();
    let mut layer = |flag: Option<String>,
                     field: Option<String>,
                     flag_name: &str,
                     field_name: &str| match (flag, field) {
        (Some(v), Some(_)) => {
            overridden.push(field_name.to_string());
            Some((v, flag_name.to_string()))
        }
        (Some(v), None) => Some((v, flag_name.to_string())),
        (None, Some(v)) => Some((v, field_name.to_string())),
        (None, None) => None,
    };
    let count = |picked: Option<(String, String)>, default: u64| -> Result<u64, ConfigError> {
        match picked {
            None => Ok(default),
            Some((v, field)) => v.trim().parse::<u64>().map_err(|_| ConfigError {
                field,
                value: v,
                reason: "expected a whole number, 0 or more".into(),
            }),
        }
    };
    let timeout =
        |picked: Option<(String, String)>, default: Duration| -> Result<Duration, ConfigError> {
            match picked {
                None => Ok(default),
                Some((v, field)) => duration::parse(&v).map_err(|reason| ConfigError {
                    field,
                    value: v,
                    reason,
                }),
            }
        };
    let to_s = |v: Option<i64>| v.map(|n| n.to_string());
    Ok(crate::conntrack::sysctl::ConntrackSysctls {
        max_per_core: count(
            layer(
                to_s(args.conntrack_max_per_core),
                to_s(file.max_per_core),
                "--conntrack-max-per-core",
                "conntrack.maxPerCore",
            ),
            defaults.max_per_core,
        )?,
        min: count(
            layer(
                to_s(args.conntrack_min),
                to_s(file.min),
                "--conntrack-min",
                "conntrack.min",
            ),
            defaults.min,
        )?,
        tcp_established_timeout: timeout(
            layer(
                args.conntrack_tcp_timeout_established.clone(),
                file.tcp_established_timeout.clone(),
                "--conntrack-tcp-timeout-established",
                "conntrack.tcpEstablishedTimeout",
            ),
            defaults.tcp_established_timeout,
        )?,
        tcp_close_wait_timeout: timeout(
            layer(
                args.conntrack_tcp_timeout_close_wait.clone(),
                file.tcp_close_wait_timeout.clone(),
                "--conntrack-tcp-timeout-close-wait",
                "conntrack.tcpCloseWaitTimeout",
            ),
            defaults.tcp_close_wait_timeout,
        )?,
        tcp_be_liberal: args
            .conntrack_tcp_be_liberal
            .or(file.tcp_be_liberal)
            .unwrap_or(defaults.tcp_be_liberal),
        udp_timeout: timeout(
            layer(
                args.conntrack_udp_timeout.clone(),
                file.udp_timeout.clone(),
                "--conntrack-udp-timeout",
                "conntrack.udpTimeout",
            ),
            defaults.udp_timeout,
        )?,
        udp_stream_timeout: timeout(
            layer(
                args.conntrack_udp_timeout_stream.clone(),
                file.udp_stream_timeout.clone(),
                "--conntrack-udp-timeout-stream",
                "conntrack.udpStreamTimeout",
            ),
            defaults.udp_stream_timeout,
        )?,
    })
}

/// A userspace-mode duration flag: a Go duration greater than zero, or `default_secs`.
fn userspace_duration(
    flag: &Option<String>,
    name: &str,
    default_secs: u64,
) -> Result<Duration, ConfigError> {
    let Some(v) = flag else {
        return Ok(Duration::from_secs(default_secs));
    };
    let bad = |reason: String| ConfigError {
        field: name.into(),
        value: v.clone(),
        reason,
    };
    let d = duration::parse(v).map_err(bad)?;
    if d.is_zero() {
        return Err(bad("must be greater than 0".into()));
    }
    Ok(d)
}

fn mode_arg(m: ProxyModeArg) -> ModeName {
    match m {
        ProxyModeArg::Iptables => ModeName::Iptables,
        ProxyModeArg::Nftables => ModeName::Nftables,
        ProxyModeArg::Ipvs => ModeName::Ipvs,
        ProxyModeArg::Userspace => ModeName::Userspace,
    }
}

fn parse_mode(text: &str) -> Option<ModeName> {
    match text {
        "iptables" => Some(ModeName::Iptables),
        "nftables" => Some(ModeName::Nftables),
        "ipvs" => Some(ModeName::Ipvs),
        "userspace" => Some(ModeName::Userspace),
        _ => None,
    }
}

/// The command-line spelling of a config field, for messages.
fn flag_name(field: &str) -> String {
    match field {
        "mode" => "proxy-mode".into(),
        "clusterCIDR" => "cluster-cidr".into(),
        "nodePortAddresses" => "nodeport-addresses".into(),
        other => {
            let mut out = String::new();
            for c in other.chars() {
                match c {
                    '.' => out.push('-'),
                    c if c.is_ascii_uppercase() => {
                        out.push('-');
                        out.push(c.to_ascii_lowercase());
                    }
                    c => out.push(c),
                }
            }
            out
        }
    }
}

fn check_bit(bit: i64, field: &str) -> Result<u8, ConfigError> {
    u8::try_from(bit)
        .ok()
        .filter(|b| *b <= 31)
        .ok_or_else(|| ConfigError {
            field: field.into(),
            value: bit.to_string(),
            reason: "must be between 0 and 31".into(),
        })
}

fn period(value: Option<(String, String)>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some((v, field)) => duration::parse(&v).map_err(|reason| ConfigError {
            field,
            value: v,
            reason,
        }),
    }
}

fn bind_address(
    value: Option<(String, String)>,
    default: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    let (text, field) = value.unwrap_or_else(|| (default.to_string(), String::new()));
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim().parse().map(Some).map_err(|_| ConfigError {
        field,
        value: text.clone(),
        reason: "expected ADDRESS:PORT, e.g. 0.0.0.0:10256 or [::]:10256".into(),
    })
}

#[cfg(test)]
mod tests;
