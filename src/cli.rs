//! The command line: kube-proxy's flag names (see `cli-contract.md`) plus kproxy's own.
//!
//! Every setting is an `Option` so [`crate::config`] can tell "given on the command line" from
//! "not given" and layer flags over a `--config` file. Boolean flags accept Go's spellings
//! (`--masquerade-all`, `--masquerade-all=true`, `--masquerade-all=false`).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// kproxy: a kube-proxy replacement with iptables, nftables, ipvs and userspace modes.
#[derive(Debug, Parser, Default)]
#[command(name = "kproxy", version, about, long_about = None)]
pub struct Args {
    /// Data-plane mode: iptables (default), nftables, ipvs or userspace.
    #[arg(global = true, long, value_enum)]
    pub proxy_mode: Option<ProxyModeArg>,

    /// Path to a kubeconfig file. Without it and without --master, the in-cluster config is used.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes API server address (overrides the kubeconfig's); http:// works.
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// Read Services, EndpointSlices and Nodes from *.yaml/*.yml/*.json files in DIR instead of
    /// the API, reloading within a second of any change.
    #[arg(global = true, long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// This node's name (decides which endpoints are local). Defaults to the host name.
    #[arg(global = true, long, value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// Pod CIDR(s), at most one per family. Traffic from them is pod traffic.
    #[arg(global = true, long, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Option<String>,

    /// Service CIDR(s), at most one per family. Must not overlap --cluster-cidr.
    #[arg(global = true, long, value_name = "CIDR[,CIDR]")]
    pub service_cluster_ip_range: Option<String>,

    /// Which local addresses accept NodePorts: a CIDR list, or `primary` (the node's primary
    /// IPs). Unset: every local address except loopback.
    #[arg(global = true, long, value_name = "CIDR[,CIDR]|primary")]
    pub nodeport_addresses: Option<String>,

    /// SNAT every connection to a service, whatever its source.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,

    /// The fwmark bit (0-31) that marks connections for SNAT.
    #[arg(long, value_name = "BIT")]
    pub iptables_masquerade_bit: Option<u8>,

    /// Where /healthz and /livez listen (default 0.0.0.0:10256; empty disables).
    #[arg(long, value_name = "ADDR:PORT")]
    pub healthz_bind_address: Option<String>,

    /// Where /metrics listens (default 127.0.0.1:10249; empty disables).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_bind_address: Option<String>,

    /// Full resync period in iptables mode (Go duration, default 30s).
    #[arg(long, value_name = "DURATION")]
    pub iptables_sync_period: Option<String>,

    /// Minimum time between syncs in iptables mode (default 1s).
    #[arg(long, value_name = "DURATION")]
    pub iptables_min_sync_period: Option<String>,

    /// Full resync period in nftables mode (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub nftables_sync_period: Option<String>,

    /// Minimum time between syncs in nftables mode (default 1s).
    #[arg(long, value_name = "DURATION")]
    pub nftables_min_sync_period: Option<String>,

    /// Full resync period in ipvs mode (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_sync_period: Option<String>,

    /// Minimum time between syncs in ipvs mode (default 0s).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_min_sync_period: Option<String>,

    /// IPVS scheduler in ipvs mode: rr (default), wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq,
    /// mh, fo, ovf, twos.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,
    /// Userspace mode: how long an idle UDP flow lives (upstream's old flag; default 30s).
    #[arg(long, value_name = "DURATION")]
    pub udp_timeout: Option<String>,

    /// Userspace mode: how long a connection to an endpoint that is no longer serving stays
    /// open (default 10s).
    #[arg(long, value_name = "DURATION")]
    pub userspace_grace_period: Option<String>,

    /// Connections to track per CPU core: nf_conntrack_max becomes max(this x CPUs,
    /// --conntrack-min), only ever raised (default 32768; 0 leaves the limit alone).
    #[arg(long, value_name = "N")]
    pub conntrack_max_per_core: Option<i64>,

    /// The floor of nf_conntrack_max (default 131072).
    #[arg(long, value_name = "N")]
    pub conntrack_min: Option<i64>,

    /// nf_conntrack_tcp_timeout_established (Go duration, default 24h; 0 leaves it).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_established: Option<String>,

    /// nf_conntrack_tcp_timeout_close_wait (default 1h; 0 leaves it).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_close_wait: Option<String>,

    /// Set nf_conntrack_tcp_be_liberal=1 (out-of-window TCP packets are not INVALID); the
    /// iptables mode then installs no INVALID-drop rule.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<bool>,

    /// nf_conntrack_udp_timeout (default 0: leave the kernel's value).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout: Option<String>,

    /// nf_conntrack_udp_timeout_stream (default 0: leave the kernel's value).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout_stream: Option<String>,

    /// iptables backend: auto (detect what the host uses), nft or legacy.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub iptables_backend: Option<BackendArg>,

    /// The admin socket: the daemon serves what it applied there, and `kproxy services`
    /// asks it (default /run/kproxy/kproxy.sock; empty disables).
    #[arg(global = true, long, value_name = "PATH")]
    pub admin_socket: Option<String>,

    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1). Flags given on the
    /// command line override its fields.
    #[arg(global = true, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Compute and print the rule diff against the live kernel; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Exit after the first complete sync (status 0 on success).
    #[arg(long)]
    pub once: bool,

    /// Remove everything any kproxy mode created, then exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log verbosity as kube-proxy's --v: 0-1 info, 2-3 debug, 4+ trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u8>,

    /// A subcommand; without one, kproxy runs the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version and exit.
    Version,
    /// List what this node programs, service by service: from the running daemon (over
    /// --admin-socket), or computed from --manifests DIR.
    Services {
        /// `table` for people, `json` for tools.
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Explain where one packet goes and why: the verdict (service port, endpoints with their
    /// shares, masquerade, or DROP/REJECT and the rule that decided it) and the path through
    /// the mode's objects. Exit 0 forwarded, 3 dropped or rejected.
    Trace(TraceArgs),
}

/// `kproxy trace` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Source address, optionally with a port: IP[:PORT], [IPv6]:PORT.
    #[arg(long, value_name = "IP[:PORT]")]
    pub src: String,
    /// Destination: IP:PORT, [IPv6]:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub dst: String,
    /// Transport protocol: tcp, udp or sctp.
    #[arg(long, default_value = "tcp", value_name = "PROTO")]
    pub proto: String,
    /// Where the packet comes from; default: node if the source is a local address, pod if it
    /// is in --cluster-cidr, else external.
    #[arg(long, value_enum)]
    pub from: Option<OriginArg>,
    /// Trace over the rules read back from this node's kernel (root), and say where they
    /// disagree with the desired state.
    #[arg(long)]
    pub live: bool,
    /// `text` for people, `json` for tools.
    #[arg(long, value_enum, default_value = "text")]
    pub output: TraceOutput,
}

/// `kproxy trace --from` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OriginArg {
    /// A pod on this node.
    Pod,
    /// The node itself (host network).
    Node,
    /// Another host.
    External,
}

/// `kproxy trace --output` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TraceOutput {
    /// Verdict, then the path.
    Text,
    /// One JSON document.
    Json,
}

/// `--output` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

/// `--proxy-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyModeArg {
    /// iptables-restore transactions (default).
    Iptables,
    /// One nft transaction per sync.
    Nftables,
    /// IP Virtual Server.
    Ipvs,
    /// A userspace TCP/UDP proxy.
    Userspace,
}

/// `--iptables-backend` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Detect the backend the host uses.
    Auto,
    /// iptables-nft.
    Nft,
    /// iptables-legacy.
    Legacy,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}
