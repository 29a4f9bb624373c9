//! Validated, typed settings, built the way upstream kube-proxy builds its own:
//!
//! 1. decode the `--config` file (`file.rs`; no file is an empty one);
//! 2. apply the v1alpha1 defaulting (`defaults::v1alpha1`): zero values mean "unset";
//! 3. apply the command-line flags (`flags.rs`), as given;
//! 4. apply the Linux platform defaults (`defaults::platform`);
//! 5. validate as upstream does, plus kproxy's own checks (`validate.rs`);
//! 6. report what kproxy accepts but does not act on (`notices.rs`).
//!
//! The result keeps the effective [`v1alpha1::KubeProxyConfiguration`] (what
//! `--write-config-to` writes) next to the typed settings the rest of kproxy reads.
//!
//! Deliberate difference from kube-proxy: upstream ignores most flags when `--config` is given;
//! kproxy lets a flag given on the command line override the file's field (and logs it), which
//! is what people expect and keeps upstream's common `--config` + `--hostname-override` setup
//! working unchanged.

pub mod defaults;
pub mod duration;
pub mod file;
pub mod flags;
pub mod notices;
pub mod v1alpha1;
mod validate;
pub mod watch;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use kproxy_contract::ModeName;

use crate::cli::{Args, BackendArg, LogFormat};

pub use notices::Notice;
pub use validate::{NodePortSetting, PortRange, check_overlap, parse_cidr_list, parse_cidrs};

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
        if self.value.is_empty() {
            write!(f, "invalid {}: {}", self.field, self.reason)
        } else {
            write!(
                f,
                "invalid {} {:?}: {}",
                self.field, self.value, self.reason
            )
        }
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
        /// `--kubeconfig` / `clientConnection.kubeconfig`.
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

/// `detectLocalMode` with its setting: how the rules recognise traffic from this node's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDetectMode {
    /// Source inside `clusterCIDR` (upstream's default).
    ClusterCidr,
    /// Source inside the Node object's `spec.podCIDRs`.
    NodeCidr,
    /// Arrived on this bridge (`detectLocal.bridgeInterface`).
    BridgeInterface(String),
    /// Arrived on an interface whose name starts with this (`detectLocal.interfaceNamePrefix`).
    InterfaceNamePrefix(String),
}

/// The ipvs mode's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct IpvsSettings {
    /// `ipvs.scheduler` (default `rr`).
    pub scheduler: String,
    /// `ipvs.strictARP`: raise `arp_ignore`/`arp_announce` so service addresses on the dummy
    /// interface are not announced.
    pub strict_arp: bool,
    /// `ipvs.excludeCIDRs`: virtual servers in these ranges are never removed by kproxy.
    pub exclude_cidrs: Vec<IpNet>,
    /// `ipvs.tcpTimeout` (0 leaves the kernel's).
    pub tcp_timeout: Duration,
    /// `ipvs.tcpFinTimeout` (0 leaves the kernel's).
    pub tcp_fin_timeout: Duration,
    /// `ipvs.udpTimeout` (0 leaves the kernel's).
    pub udp_timeout: Duration,
}

/// Client-side limits on requests to the API server (`clientConnection.qps` / `burst`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApiRateLimit {
    /// Requests per second once the burst is used; 0 or less: no limit.
    pub qps: f32,
    /// Requests allowed at once.
    pub burst: u32,
}

/// The `--config` file as read at start, so a change can be told from a touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// `--config`.
    pub path: PathBuf,
    /// Its bytes when kproxy started.
    pub bytes: Vec<u8>,
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
    /// `bindAddress` when it names an address: it becomes the node's primary IP of its family.
    pub bind_address: Option<IpAddr>,
    /// Pod CIDRs (at most one per family).
    pub cluster_cidrs: Vec<IpNet>,
    /// How local pod traffic is recognised.
    pub detect_local: LocalDetectMode,
    /// Service CIDRs (at most one per family).
    pub service_cidrs: Vec<IpNet>,
    /// `--service-node-port-range`: the NodePorts a manifest may use (the API server checks its
    /// own range; objects from the API are not checked again).
    pub node_port_range: PortRange,
    /// `--external-ip-cidrs`: the allow-list of externalIPs and LoadBalancer IPs; `None` when
    /// not given (any address but the special ones and the node's own).
    pub external_ip_cidrs: Option<Vec<IpNet>>,
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
    /// Exit when /healthz or /metrics cannot be served instead of retrying.
    pub bind_address_hard_fail: bool,
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
    /// The ipvs mode's settings.
    pub ipvs: IpvsSettings,
    /// `oomScoreAdj`, written to the process's own `oom_score_adj` at start.
    pub oom_score_adj: Option<i32>,
    /// Client-side API rate limit.
    pub api_rate_limit: ApiRateLimit,
    /// The admin socket (`--admin-socket`); `None` disables it.
    pub admin_socket: Option<PathBuf>,
    /// The `--config` file, watched for changes.
    pub config_file: Option<ConfigFile>,
    /// `--write-config-to`: write [`Config::effective`] there and exit.
    pub write_config_to: Option<PathBuf>,
    /// `--init-only`: set the node up and exit.
    pub init_only: bool,
    /// Print the diff, change nothing.
    pub dry_run: bool,
    /// Exit after the first complete sync.
    pub once: bool,
    /// Remove everything and exit.
    pub cleanup: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Log verbosity (`--v`, `logging.verbosity`).
    pub verbosity: u32,
    /// The effective configuration in upstream's shape.
    pub effective: v1alpha1::KubeProxyConfiguration,
    /// What kproxy accepted but does not act on, and unknown fields: warned about at start.
    pub notices: Vec<Notice>,
    /// Config-file fields that a command-line flag overrode.
    pub overridden_fields: Vec<String>,
}

/// Builds the configuration from the command line (and the file it names).
pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
    let (document, unknown_fields, config_file) = match &args.config {
        Some(path) => {
            let loaded = file::load(path)?;
            let config_file = ConfigFile {
                path: path.clone(),
                bytes: loaded.bytes,
            };
            (loaded.document, loaded.unknown_fields, Some(config_file))
        }
        None => (file::Document::default(), Vec::new(), None),
    };
    let localhost_nodeports_in_file = document
        .iptables
        .as_ref()
        .and_then(|i| i.localhost_node_ports);
    let mut effective = defaults::v1alpha1(document)?;
    let report = flags::apply(args, &mut effective, config_file.is_some())?;
    defaults::platform(&mut effective);
    let checked = validate::check(&effective, &report)?;

    let explicit_localhost_nodeports = args
        .iptables_localhost_nodeports
        .or(localhost_nodeports_in_file);
    let notices = notices::collect(
        &effective,
        &report,
        &unknown_fields,
        explicit_localhost_nodeports,
    );

    let source = match &args.manifests {
        // A directory that cannot be listed is a bad flag (exit 2), not a runtime failure.
        Some(dir) => match std::fs::read_dir(dir) {
            Ok(_) => SourceConfig::Manifests(dir.clone()),
            Err(e) => {
                return Err(ConfigError {
                    field: "--manifests".into(),
                    value: dir.display().to_string(),
                    reason: format!("cannot read the directory: {e}"),
                });
            }
        },
        None => SourceConfig::Api {
            kubeconfig: Some(effective.client_connection.kubeconfig.trim())
                .filter(|k| !k.is_empty())
                .map(PathBuf::from),
            master: args.master.clone(),
        },
    };
    let service_cidrs = match &args.service_cluster_ip_range {
        Some(v) => parse_cidrs(v, "--service-cluster-ip-range")?,
        None => Vec::new(),
    };
    check_overlap(&service_cidrs, &checked.cluster_cidrs)?;
    let node_port_range = match &args.service_node_port_range {
        Some(v) => PortRange::parse(v, "--service-node-port-range")?,
        None => PortRange::DEFAULT_NODE_PORTS,
    };
    let external_ip_cidrs = parse_cidr_list(&args.external_ip_cidrs, "--external-ip-cidrs")?;

    let conntrack = conntrack_settings(&effective.conntrack);
    let userspace = |value: Option<duration::GoDuration>, name: &str, default_secs: u64| match value
    {
        None => Ok(Duration::from_secs(default_secs)),
        Some(d) if d.is_zero() => Err(ConfigError {
            field: name.into(),
            value: d.to_string(),
            reason: "must be greater than 0".into(),
        }),
        Some(d) => Ok(d.0),
    };
    let e = &effective;
    Ok(Config {
        mode: checked.mode,
        source,
        hostname: checked.hostname,
        bind_address: checked.bind_address,
        cluster_cidrs: checked.cluster_cidrs,
        detect_local: checked.detect_local,
        service_cidrs,
        node_port_range,
        external_ip_cidrs,
        nodeport_addresses: checked.nodeport_addresses,
        masquerade_all: match checked.mode {
            ModeName::Nftables => e.nftables.masquerade_all,
            _ => e.iptables.masquerade_all,
        },
        masquerade_bit: checked.masquerade_bit,
        healthz_bind: checked.healthz_bind,
        metrics_bind: checked.metrics_bind,
        bind_address_hard_fail: e.bind_address_hard_fail,
        sync_period: checked.sync_period,
        min_sync_period: checked.min_sync_period,
        iptables_backend: match args.iptables_backend {
            None | Some(BackendArg::Auto) => BackendChoice::Auto,
            Some(BackendArg::Nft) => BackendChoice::Nft,
            Some(BackendArg::Legacy) => BackendChoice::Legacy,
        },
        udp_timeout: userspace(args.udp_timeout, "--udp-timeout", 30)?,
        userspace_grace_period: userspace(
            args.userspace_grace_period,
            "--userspace-grace-period",
            10,
        )?,
        tcp_be_liberal: conntrack.tcp_be_liberal,
        conntrack,
        ipvs: IpvsSettings {
            scheduler: match e.ipvs.scheduler.trim() {
                "" => "rr".to_string(),
                s => s.to_string(),
            },
            strict_arp: e.ipvs.strict_arp,
            exclude_cidrs: checked.ipvs_exclude_cidrs,
            tcp_timeout: e.ipvs.tcp_timeout.0,
            tcp_fin_timeout: e.ipvs.tcp_fin_timeout.0,
            udp_timeout: e.ipvs.udp_timeout.0,
        },
        oom_score_adj: e.oom_score_adj,
        api_rate_limit: ApiRateLimit {
            qps: e.client_connection.qps,
            burst: u32::try_from(e.client_connection.burst).unwrap_or(0),
        },
        // A string, not a PathBuf, on the command line: clap refuses an empty path, and empty
        // is how the socket is turned off.
        admin_socket: match args.admin_socket.as_deref().map(str::trim) {
            None => Some(PathBuf::from(defaults::ADMIN_SOCKET)),
            Some("") => None,
            Some(p) => Some(PathBuf::from(p)),
        },
        config_file,
        write_config_to: args.write_config_to.clone(),
        init_only: args.init_only == Some(true),
        dry_run: args.dry_run,
        once: args.once,
        cleanup: args.cleanup(),
        log_format: checked.log_format,
        verbosity: e.logging.verbosity,
        notices,
        overridden_fields: report.overridden.clone(),
        effective,
    })
}

/// The conntrack section as the sysctl writer takes it (negative values were refused by
/// validation; a null pointer cannot survive defaulting).
fn conntrack_settings(c: &v1alpha1::Conntrack) -> crate::conntrack::sysctl::ConntrackSysctls {
    let defaults = crate::conntrack::sysctl::ConntrackSysctls::default();
    let count = |v: Option<i32>, d: u64| v.map_or(d, |n| u64::try_from(n).unwrap_or(0));
    crate::conntrack::sysctl::ConntrackSysctls {
        max_per_core: count(c.max_per_core, defaults.max_per_core),
        min: count(c.min, defaults.min),
        tcp_established_timeout: c
            .tcp_established_timeout
            .map_or(defaults.tcp_established_timeout, |d| d.0),
        tcp_close_wait_timeout: c
            .tcp_close_wait_timeout
            .map_or(defaults.tcp_close_wait_timeout, |d| d.0),
        tcp_be_liberal: c.tcp_be_liberal,
        udp_timeout: c.udp_timeout.0,
        udp_stream_timeout: c.udp_stream_timeout.0,
    }
}

/// `--write-config-to`: the effective configuration as YAML, written whole or not at all.
pub fn write_effective(config: &Config, path: &std::path::Path) -> std::io::Result<()> {
    std::fs::write(path, config.effective.to_yaml())
}

#[cfg(test)]
mod tests;
