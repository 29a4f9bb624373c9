//! The command line: every kube-proxy flag for Linux with upstream's name and type, plus
//! kproxy's own.
//!
//! Every setting is an `Option` (or an empty list) so [`crate::config`] can tell "given on the
//! command line" from "not given" and layer flags over a `--config` file. Values are parsed into
//! their types here, so a bad value is refused naming the flag (exit status 2). Boolean flags
//! accept Go's spellings (`--masquerade-all`, `--masquerade-all=true`, `--masquerade-all=0`).

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use kproxy_contract::ModeName;

use crate::config::duration::GoDuration;

/// kproxy: a kube-proxy replacement with iptables, nftables, ipvs and userspace modes.
///
/// Every kube-proxy flag for Linux is accepted with upstream's name, type and meaning (the README's
/// Flags section gives each one's status); flags given on the command line override the
/// `--config` file's fields.
#[derive(Debug, Parser, Default)]
#[command(name = "kproxy", version = crate::version::VERSION, about, long_about = None)]
pub struct Args {
    /// Data-plane mode: iptables (default; also for an empty value), nftables, ipvs or
    /// userspace.
    #[arg(global = true, long, value_name = "MODE", value_parser = parse_mode)]
    pub proxy_mode: Option<ModeName>,

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

    /// Overrides the node's primary IP of its family (upstream's meaning: no socket is bound to
    /// it); 0.0.0.0 or :: leaves the Node object's addresses in charge.
    #[arg(long, value_name = "IP")]
    pub bind_address: Option<IpAddr>,

    /// Exit (status 1) when /healthz or /metrics cannot be served, instead of retrying every 5s.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub bind_address_hard_fail: Option<bool>,

    /// Pod CIDR(s), at most one per family: the ClusterCIDR local-traffic detector's ranges.
    #[arg(global = true, long, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Option<String>,

    /// How traffic from local pods is recognised: ClusterCIDR (default), NodeCIDR (the Node's
    /// spec.podCIDRs), BridgeInterface (--pod-bridge-interface) or InterfaceNamePrefix
    /// (--pod-interface-name-prefix).
    #[arg(global = true, long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,

    /// With --detect-local-mode=BridgeInterface: the bridge local pods are attached to.
    #[arg(global = true, long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// With --detect-local-mode=InterfaceNamePrefix: the name prefix of local pods' interfaces.
    #[arg(global = true, long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// Service CIDR(s), at most one per family. Must not overlap --cluster-cidr. With
    /// --manifests, a ClusterIP outside them is refused (the API server allocates inside).
    #[arg(global = true, long, value_name = "CIDR[,CIDR]")]
    pub service_cluster_ip_range: Option<String>,

    /// With --manifests: the NodePort range, `N-M` (upstream API server's flag and default,
    /// 30000-32767); a NodePort or healthCheckNodePort outside it is refused.
    #[arg(global = true, long, value_name = "N-M")]
    pub service_node_port_range: Option<String>,

    /// The allow-list of externalIPs and LoadBalancer ingress IPs: when given, one outside
    /// these CIDRs is refused, and one that is an address of this node is accepted only inside
    /// them (without the flag, a frontend on a node address is always refused).
    #[arg(global = true, long, value_name = "CIDR[,CIDR]", action = ArgAction::Append)]
    pub external_ip_cidrs: Vec<String>,

    /// Which local addresses accept NodePorts: CIDRs, or `primary` (the node's primary IPs).
    /// Unset: every local address except loopback (nftables mode: primary). Repeatable.
    #[arg(global = true, long, value_name = "CIDR[,CIDR]|primary", action = ArgAction::Append)]
    pub nodeport_addresses: Vec<String>,

    /// SNAT every connection to a service, whatever its source.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub masquerade_all: Option<bool>,

    /// The fwmark bit (0-31) that marks connections for SNAT (iptables and ipvs modes).
    #[arg(long, value_name = "BIT", allow_negative_numbers = true)]
    pub iptables_masquerade_bit: Option<i32>,

    /// Serve NodePorts on 127.0.0.1 (iptables mode); accepted, not implemented: see the README.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub iptables_localhost_nodeports: Option<bool>,

    /// Where /healthz and /livez listen: IP or IP:PORT (default 0.0.0.0:10256; a bare IP gets
    /// --healthz-port; empty disables).
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_bind)]
    pub healthz_bind_address: Option<BindFlag>,

    /// Where /metrics listens: IP or IP:PORT (default 127.0.0.1:10249; a bare IP gets
    /// --metrics-port; empty disables).
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_bind)]
    pub metrics_bind_address: Option<BindFlag>,

    /// Deprecated (upstream too): the port for a bare --healthz-bind-address IP; 0 disables.
    #[arg(long, value_name = "PORT", hide = true)]
    pub healthz_port: Option<u16>,

    /// Deprecated (upstream too): the port for a bare --metrics-bind-address IP; 0 disables.
    #[arg(long, value_name = "PORT", hide = true)]
    pub metrics_port: Option<u16>,

    /// Full resync period in iptables and nftables modes (Go duration, default 30s).
    #[arg(long, value_name = "DURATION")]
    pub iptables_sync_period: Option<GoDuration>,

    /// Minimum time between syncs in iptables and nftables modes (default 1s).
    #[arg(long, value_name = "DURATION")]
    pub iptables_min_sync_period: Option<GoDuration>,

    /// kproxy's own alias of --iptables-sync-period for nftables mode (upstream has no
    /// --nftables-* flags).
    #[arg(long, value_name = "DURATION")]
    pub nftables_sync_period: Option<GoDuration>,

    /// kproxy's own alias of --iptables-min-sync-period for nftables mode.
    #[arg(long, value_name = "DURATION")]
    pub nftables_min_sync_period: Option<GoDuration>,

    /// Full resync period in ipvs mode (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_sync_period: Option<GoDuration>,

    /// Minimum time between syncs in ipvs mode (default 1s; 0s from a --config file).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_min_sync_period: Option<GoDuration>,

    /// IPVS scheduler in ipvs mode: rr (default), wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq,
    /// mh, fo, ovf, twos.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,

    /// ipvs mode: CIDRs whose IPVS virtual servers kproxy leaves alone. Repeatable.
    #[arg(long, value_name = "CIDR[,CIDR]", action = ArgAction::Append)]
    pub ipvs_exclude_cidrs: Vec<String>,

    /// ipvs mode: set arp_ignore=1 and arp_announce=2, so the node does not answer ARP for
    /// service addresses on kproxy-ipvs0.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub ipvs_strict_arp: Option<bool>,

    /// ipvs mode: IPVS's idle timeout of TCP connections (0 leaves the kernel's).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcp_timeout: Option<GoDuration>,

    /// ipvs mode: IPVS's timeout of TCP connections after a FIN (0 leaves the kernel's).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcpfin_timeout: Option<GoDuration>,

    /// ipvs mode: IPVS's timeout of UDP flows (0 leaves the kernel's).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_udp_timeout: Option<GoDuration>,

    /// Userspace mode: how long an idle UDP flow lives (upstream's old flag; default 30s).
    #[arg(long, value_name = "DURATION")]
    pub udp_timeout: Option<GoDuration>,

    /// Userspace mode: how long a connection to an endpoint that is no longer serving stays
    /// open (default 10s).
    #[arg(long, value_name = "DURATION")]
    pub userspace_grace_period: Option<GoDuration>,

    /// Connections to track per CPU core: nf_conntrack_max becomes max(this x CPUs,
    /// --conntrack-min), only ever raised (default 32768; 0 leaves the limit alone).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub conntrack_max_per_core: Option<i32>,

    /// The floor of nf_conntrack_max (default 131072).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub conntrack_min: Option<i32>,

    /// nf_conntrack_tcp_timeout_established (Go duration, default 24h; 0 leaves it).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_established: Option<GoDuration>,

    /// nf_conntrack_tcp_timeout_close_wait (default 1h; 0 leaves it).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_close_wait: Option<GoDuration>,

    /// Set nf_conntrack_tcp_be_liberal=1 (out-of-window TCP packets are not INVALID); the
    /// iptables mode then installs no INVALID-drop rule.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub conntrack_tcp_be_liberal: Option<bool>,

    /// nf_conntrack_udp_timeout (default 0: leave the kernel's value).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout: Option<GoDuration>,

    /// nf_conntrack_udp_timeout_stream (default 0: leave the kernel's value).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout_stream: Option<GoDuration>,

    /// The OOM score of the kproxy process, -1000 to 1000 (default -999).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub oom_score_adj: Option<i32>,

    /// Upstream's informer resync period (default 15m). Validated; kproxy's watches need no
    /// resync (see the README).
    #[arg(long, value_name = "DURATION")]
    pub config_sync_period: Option<GoDuration>,

    /// Requests per second kproxy may send to the API server (default 5).
    #[arg(long, value_name = "QPS")]
    pub kube_api_qps: Option<f32>,

    /// Requests kproxy may send to the API server in a burst (default 10).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub kube_api_burst: Option<i32>,

    /// The content type of API requests (default application/vnd.kubernetes.protobuf); kproxy
    /// always speaks JSON.
    #[arg(long, value_name = "TYPE")]
    pub kube_api_content_type: Option<String>,

    /// Feature gates as NAME=BOOL pairs (comma-separated, repeatable). Known gates are listed
    /// in the README; unknown ones are warned about.
    #[arg(long, value_name = "NAME=BOOL,...", action = ArgAction::Append)]
    pub feature_gates: Vec<String>,

    /// Upstream serves Go's /debug/pprof with this; accepted, warned about when on.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub profiling: Option<bool>,

    /// Upstream re-shows metrics hidden in that version; kproxy hides none.
    #[arg(long, value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,

    /// An iptables backend: auto (detect what the host uses), nft or legacy.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub iptables_backend: Option<BackendArg>,

    /// The admin socket: the daemon serves what it applied there, and `kproxy services`
    /// asks it (default /run/kproxy/kproxy.sock; empty disables).
    #[arg(global = true, long, value_name = "PATH")]
    pub admin_socket: Option<String>,

    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1). Flags given on the
    /// command line override its fields. kproxy exits (status 1) when the file changes, so the
    /// pod restarts with the new settings, as upstream does.
    #[arg(global = true, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Write the effective configuration (defaults applied, flags included) as a
    /// KubeProxyConfiguration to FILE and exit.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,

    /// Do the privileged node set-up (sysctls) and exit, as upstream's init container does.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub init_only: Option<bool>,

    /// Compute and print the rule diff against the live kernel; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Exit after the first complete sync (status 0 on success).
    #[arg(long)]
    pub once: bool,

    /// Remove everything any kproxy mode created, then exit.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub cleanup: Option<bool>,

    /// Log format: text or json (upstream's --logging-format; --log-format is kproxy's older
    /// spelling).
    #[arg(
        long = "logging-format",
        alias = "log-format",
        value_enum,
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,

    /// Log verbosity as kube-proxy's --v: 0-1 info, 2-3 debug, 4+ trace. RUST_LOG overrides.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u32>,

    /// klog's per-file verbosity (pattern=N,...); accepted, warned about (kproxy's logs are not
    /// Go files; use RUST_LOG).
    #[arg(long, value_name = "PATTERN=N,...")]
    pub vmodule: Option<String>,

    /// How often klog flushes (default 5s); kproxy writes every line at once.
    #[arg(long, value_name = "DURATION")]
    pub log_flush_frequency: Option<GoDuration>,

    /// klog's alpha option: info to stdout, errors to stderr; accepted, warned about.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub log_text_split_stream: Option<bool>,

    /// klog's alpha option; accepted, warned about.
    #[arg(long, value_name = "QUANTITY", hide = true)]
    pub log_text_info_buffer_size: Option<String>,

    /// klog's alpha option: info to stdout, errors to stderr; accepted, warned about.
    #[arg(long, value_name = "BOOL", value_parser = go_bool, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub log_json_split_stream: Option<bool>,

    /// klog's alpha option; accepted, warned about.
    #[arg(long, value_name = "QUANTITY", hide = true)]
    pub log_json_info_buffer_size: Option<String>,

    /// cAdvisor's flag, which upstream's binary registers; no meaning for kproxy.
    #[arg(long, value_name = "FILE", hide = true)]
    pub boot_id_file: Option<String>,

    /// cAdvisor's flag, which upstream's binary registers; no meaning for kproxy.
    #[arg(long, value_name = "FILE", hide = true)]
    pub machine_id_file: Option<String>,

    /// A subcommand; without one, kproxy runs the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Args {
    /// Parses the process's arguments as upstream's flag library would: `_` and `-` are the same
    /// in a flag's name (`--hostname_override`), and a lone `--version=true` prints the version.
    pub fn parse_go_style() -> Self {
        Self::parse_from(normalize(std::env::args_os()))
    }

    /// [`Args::parse_go_style`] over a given argument list (the first is the program name).
    pub fn try_parse_go_style<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Self::try_parse_from(normalize(args))
    }

    /// Whether `--cleanup` asks for a clean-up run.
    pub fn cleanup(&self) -> bool {
        self.cleanup == Some(true)
    }
}

/// Rewrites `--flag_name[=v]` to `--flag-name[=v]` (pflag's word-separator normalisation, which
/// upstream installs) and `--version=true|raw` to `--version`. Values are left alone.
fn normalize<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut flags_done = false;
    for arg in args {
        let arg: OsString = arg.into();
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if flags_done || !text.starts_with("--") || text == "--" {
            flags_done |= text == "--";
            out.push(arg);
            continue;
        }
        let (name, value) = match text.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (text, None),
        };
        let name = name.replace('_', "-");
        out.push(match (name.as_str(), value) {
            ("--version", Some("true" | "raw")) => "--version".into(),
            (_, Some(v)) => format!("{name}={v}").into(),
            (_, None) => name.into(),
        });
    }
    out
}

/// A Go boolean, as `strconv.ParseBool` reads it (what pflag's boolean flags take).
pub fn go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true or false)")),
    }
}

/// `--proxy-mode`: a mode, or empty for the default (upstream's "best available" on Linux:
/// iptables).
fn parse_mode(text: &str) -> Result<ModeName, String> {
    match text.trim() {
        "" => Ok(ModeName::Iptables),
        name => name
            .parse()
            .map_err(|e| format!("{e}: use iptables, nftables, ipvs or userspace")),
    }
}

/// `--healthz-bind-address` / `--metrics-bind-address` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindFlag {
    /// Empty: do not serve.
    Off,
    /// A bare IP: the port comes from `--healthz-port` / `--metrics-port` or the default.
    Ip(IpAddr),
    /// IP and port.
    Socket(SocketAddr),
}

fn parse_bind(text: &str) -> Result<BindFlag, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(BindFlag::Off);
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(BindFlag::Ip(ip));
    }
    t.parse::<SocketAddr>()
        .map(BindFlag::Socket)
        .map_err(|_| format!("{t:?} is not IP or IP:PORT (e.g. 0.0.0.0:10256, [::]:10256)"))
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
    /// Where the packet comes from; default: node if the source is a local address, pod if the
    /// local-traffic detector says so (its CIDR holds the source, or --in-interface matches its
    /// interface), else external.
    #[arg(long, value_enum)]
    pub from: Option<OriginArg>,
    /// The packet's ingress interface (`--in-interface`).
    #[command(flatten)]
    pub ingress: crate::trace::IngressArgs,
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
