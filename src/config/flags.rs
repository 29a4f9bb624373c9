//! Command-line flags over the defaulted configuration.
//!
//! A flag given on the command line sets its field as given (never re-defaulted, as upstream).
//! Deliberate difference: upstream ignores most flags when `--config` is given; kproxy lets them
//! win over the file's fields (and logs each one), which keeps `--config` plus a flag or two
//! working as people expect. With no `--config`, this is exactly upstream's flag handling,
//! including its mode-dependent sync-period flags.

use std::collections::BTreeMap;

use kproxy_contract::ModeName;

use crate::cli::{Args, BindFlag};

use super::ConfigError;
use super::defaults::{HEALTHZ_PORT, METRICS_PORT};
use super::duration::GoDuration;
use super::v1alpha1::{KubeProxyConfiguration, VModuleItem};

/// What the flags did besides setting fields: which config-file fields they replaced, which
/// field each flag set (so errors name the flag), and flags that had no effect.
#[derive(Debug, Default)]
pub struct FlagReport {
    /// Config-file fields a flag overrode (only with `--config`).
    pub overridden: Vec<String>,
    /// Field path → the flag that set it.
    pub origins: BTreeMap<String, String>,
    /// Flags that were accepted but changed nothing, with why.
    pub without_effect: Vec<(String, String)>,
    /// `--proxy-mode`, when given: the mode, typed (the file's `mode` is text to parse).
    pub mode: Option<ModeName>,
}

impl FlagReport {
    /// The name to use for `path` in a message: the flag that set it, or the field path.
    pub fn origin(&self, path: &str) -> String {
        self.origins
            .get(path)
            .cloned()
            .unwrap_or_else(|| path.to_string())
    }
}

/// Applies the flags in `args` to `cfg`. `from_file` tells whether `cfg` came from `--config`.
pub fn apply(
    args: &Args,
    cfg: &mut KubeProxyConfiguration,
    from_file: bool,
) -> Result<FlagReport, ConfigError> {
    let mut report = FlagReport::default();
    let mut set = |report: &mut FlagReport, path: &str, flag: &str| {
        if from_file {
            report.overridden.push(path.to_string());
        }
        report.origins.insert(path.to_string(), flag.to_string());
    };
    macro_rules! fields {
        ($($value:expr => $path:literal, $flag:literal, |$v:ident| $assign:expr;)*) => {
            $(if let Some($v) = $value {
                $assign;
                set(&mut report, $path, $flag);
            })*
        };
    }

    if let Some(m) = args.proxy_mode {
        // The effective configuration shows it; validation takes the typed value.
        cfg.mode = m.as_str().into();
        report.mode = Some(m);
        set(&mut report, "mode", "--proxy-mode");
    }
    let mode = cfg.mode.clone();
    // One line per flag whose value goes to one field as it is: the flag's value, the field's
    // path (for messages), the flag's name, and the assignment.
    fields! {
        &args.hostname_override => "hostnameOverride", "--hostname-override",
            |v| cfg.hostname_override = v.trim().to_lowercase();
        args.bind_address => "bindAddress", "--bind-address", |v| cfg.bind_address = v.to_string();
        args.bind_address_hard_fail => "bindAddressHardFail", "--bind-address-hard-fail",
            |v| cfg.bind_address_hard_fail = v;
        &args.kubeconfig => "clientConnection.kubeconfig", "--kubeconfig",
            |v| cfg.client_connection.kubeconfig = v.display().to_string();
        args.kube_api_qps => "clientConnection.qps", "--kube-api-qps",
            |v| cfg.client_connection.qps = v;
        args.kube_api_burst => "clientConnection.burst", "--kube-api-burst",
            |v| cfg.client_connection.burst = v;
        &args.kube_api_content_type => "clientConnection.contentType", "--kube-api-content-type",
            |v| cfg.client_connection.content_type = v.clone();
        &args.cluster_cidr => "clusterCIDR", "--cluster-cidr", |v| cfg.cluster_cidr = v.clone();
        &args.detect_local_mode => "detectLocalMode", "--detect-local-mode",
            |v| cfg.detect_local_mode = v.clone();
        &args.pod_bridge_interface => "detectLocal.bridgeInterface", "--pod-bridge-interface",
            |v| cfg.detect_local.bridge_interface = v.clone();
        &args.pod_interface_name_prefix => "detectLocal.interfaceNamePrefix",
            "--pod-interface-name-prefix",
            |v| cfg.detect_local.interface_name_prefix = v.clone();
        args.iptables_masquerade_bit => "iptables.masqueradeBit", "--iptables-masquerade-bit",
            |v| cfg.iptables.masquerade_bit = Some(v);
        args.iptables_localhost_nodeports => "iptables.localhostNodePorts",
            "--iptables-localhost-nodeports",
            |v| cfg.iptables.localhost_node_ports = Some(v);
        &args.ipvs_scheduler => "ipvs.scheduler", "--ipvs-scheduler",
            |v| cfg.ipvs.scheduler = v.clone();
        args.ipvs_strict_arp => "ipvs.strictARP", "--ipvs-strict-arp", |v| cfg.ipvs.strict_arp = v;
        args.ipvs_tcp_timeout => "ipvs.tcpTimeout", "--ipvs-tcp-timeout",
            |v| cfg.ipvs.tcp_timeout = v;
        args.ipvs_tcpfin_timeout => "ipvs.tcpFinTimeout", "--ipvs-tcpfin-timeout",
            |v| cfg.ipvs.tcp_fin_timeout = v;
        args.ipvs_udp_timeout => "ipvs.udpTimeout", "--ipvs-udp-timeout",
            |v| cfg.ipvs.udp_timeout = v;
        args.conntrack_max_per_core => "conntrack.maxPerCore", "--conntrack-max-per-core",
            |v| cfg.conntrack.max_per_core = Some(v);
        args.conntrack_min => "conntrack.min", "--conntrack-min", |v| cfg.conntrack.min = Some(v);
        args.conntrack_tcp_timeout_established => "conntrack.tcpEstablishedTimeout",
            "--conntrack-tcp-timeout-established",
            |v| cfg.conntrack.tcp_established_timeout = Some(v);
        args.conntrack_tcp_timeout_close_wait => "conntrack.tcpCloseWaitTimeout",
            "--conntrack-tcp-timeout-close-wait",
            |v| cfg.conntrack.tcp_close_wait_timeout = Some(v);
        args.conntrack_tcp_be_liberal => "conntrack.tcpBeLiberal", "--conntrack-tcp-be-liberal",
            |v| cfg.conntrack.tcp_be_liberal = v;
        args.conntrack_udp_timeout => "conntrack.udpTimeout", "--conntrack-udp-timeout",
            |v| cfg.conntrack.udp_timeout = v;
        args.conntrack_udp_timeout_stream => "conntrack.udpStreamTimeout",
            "--conntrack-udp-timeout-stream",
            |v| cfg.conntrack.udp_stream_timeout = v;
        args.oom_score_adj => "oomScoreAdj", "--oom-score-adj", |v| cfg.oom_score_adj = Some(v);
        args.config_sync_period => "configSyncPeriod", "--config-sync-period",
            |v| cfg.config_sync_period = v;
        args.profiling => "enableProfiling", "--profiling", |v| cfg.enable_profiling = v;
        &args.show_hidden_metrics_for_version => "showHiddenMetricsForVersion",
            "--show-hidden-metrics-for-version",
            |v| cfg.show_hidden_metrics_for_version = v.clone();
    }
    if !args.nodeport_addresses.is_empty() {
        cfg.node_port_addresses = Some(split_list(&args.nodeport_addresses));
        set(&mut report, "nodePortAddresses", "--nodeport-addresses");
    }

    // Masquerading: upstream's --masquerade-all is the running mode's; --iptables-masquerade-bit
    // is the iptables section's, which the ipvs mode also reads and the nftables mode does not.
    if let Some(v) = args.masquerade_all {
        if mode == "nftables" {
            cfg.nftables.masquerade_all = v;
            set(&mut report, "nftables.masqueradeAll", "--masquerade-all");
        } else {
            cfg.iptables.masquerade_all = v;
            set(&mut report, "iptables.masqueradeAll", "--masquerade-all");
        }
    }
    if args.iptables_masquerade_bit.is_some() && mode == "nftables" {
        report.without_effect.push((
            "--iptables-masquerade-bit".into(),
            "the nftables mode uses nftables.masqueradeBit from the --config file, as upstream \
             does"
                .into(),
        ));
    }

    sync_periods(args, cfg, &mode, from_file, &mut report, &mut set);

    if !args.ipvs_exclude_cidrs.is_empty() {
        cfg.ipvs.exclude_cidrs = Some(split_list(&args.ipvs_exclude_cidrs));
        set(&mut report, "ipvs.excludeCIDRs", "--ipvs-exclude-cidrs");
    }

    if !args.feature_gates.is_empty() {
        for (name, on) in feature_gates(&args.feature_gates)? {
            cfg.feature_gates.insert(name, on);
        }
        set(&mut report, "featureGates", "--feature-gates");
    }

    bind_addresses(args, cfg, &mut report, &mut set);
    logging(args, cfg, &mut report, &mut set)?;
    for (value, flag) in [
        (&args.boot_id_file, "--boot-id-file"),
        (&args.machine_id_file, "--machine-id-file"),
    ] {
        if value.is_some() {
            report.without_effect.push((
                flag.into(),
                "a cAdvisor flag upstream's binary happens to register; it changes nothing in \
                 a proxy"
                    .into(),
            ));
        }
    }
    Ok(report)
}

type SetFn<'a> = dyn FnMut(&mut FlagReport, &str, &str) + 'a;

/// Upstream's sync-period flags are per mode: `--ipvs-*` in ipvs mode, `--iptables-*` in every
/// other mode (nftables included: upstream has no `--nftables-*` flags; kproxy's are aliases for
/// that mode). The userspace mode uses the iptables section.
fn sync_periods(
    args: &Args,
    cfg: &mut KubeProxyConfiguration,
    mode: &str,
    from_file: bool,
    report: &mut FlagReport,
    set: &mut SetFn<'_>,
) {
    // The flag that applies in this mode: kproxy's nftables alias first, then upstream's.
    let pick = |alias: Option<GoDuration>,
                alias_name: &'static str,
                upstream: Option<GoDuration>,
                name: &'static str| {
        alias
            .map(|v| (v, alias_name))
            .or(upstream.map(|v| (v, name)))
    };
    let (section, sync, min) = match mode {
        "ipvs" => (
            "ipvs",
            args.ipvs_sync_period.map(|v| (v, "--ipvs-sync-period")),
            args.ipvs_min_sync_period
                .map(|v| (v, "--ipvs-min-sync-period")),
        ),
        "nftables" => (
            "nftables",
            pick(
                args.nftables_sync_period,
                "--nftables-sync-period",
                args.iptables_sync_period,
                "--iptables-sync-period",
            ),
            pick(
                args.nftables_min_sync_period,
                "--nftables-min-sync-period",
                args.iptables_min_sync_period,
                "--iptables-min-sync-period",
            ),
        ),
        _ => (
            "iptables",
            args.iptables_sync_period
                .map(|v| (v, "--iptables-sync-period")),
            args.iptables_min_sync_period
                .map(|v| (v, "--iptables-min-sync-period")),
        ),
    };
    let (sync_field, min_field) = match section {
        "ipvs" => (&mut cfg.ipvs.sync_period, &mut cfg.ipvs.min_sync_period),
        "nftables" => (
            &mut cfg.nftables.sync_period,
            &mut cfg.nftables.min_sync_period,
        ),
        _ => (
            &mut cfg.iptables.sync_period,
            &mut cfg.iptables.min_sync_period,
        ),
    };
    // Without a file, upstream's flag defaults come from the iptables section, so the ipvs
    // mode's minimum sync period is 1s there (0s only from a file).
    if !from_file && section == "ipvs" && min_field.is_zero() {
        *min_field = GoDuration::secs(1);
    }
    if let Some((v, flag)) = sync {
        *sync_field = v;
        set(report, &format!("{section}.syncPeriod"), flag);
    }
    if let Some((v, flag)) = min {
        *min_field = v;
        set(report, &format!("{section}.minSyncPeriod"), flag);
    }
}

/// `--healthz-bind-address` / `--metrics-bind-address` with the deprecated port flags, as
/// upstream combines them: a port flag only completes a bare IP, and 0 turns the server off.
/// An empty address flag also turns it off (upstream's help text promises that; its code keeps
/// the default).
fn bind_addresses(
    args: &Args,
    cfg: &mut KubeProxyConfiguration,
    report: &mut FlagReport,
    set: &mut SetFn<'_>,
) {
    for (addr_flag, port_flag, default_port, path, field) in [
        (
            args.healthz_bind_address,
            args.healthz_port,
            HEALTHZ_PORT,
            "healthzBindAddress",
            &mut cfg.healthz_bind_address,
        ),
        (
            args.metrics_bind_address,
            args.metrics_port,
            METRICS_PORT,
            "metricsBindAddress",
            &mut cfg.metrics_bind_address,
        ),
    ] {
        let (addr_name, port_name) = if path == "healthzBindAddress" {
            ("--healthz-bind-address", "--healthz-port")
        } else {
            ("--metrics-bind-address", "--metrics-port")
        };
        match (addr_flag, port_flag) {
            (_, Some(0)) | (Some(BindFlag::Off), _) => {
                field.clear();
                set(
                    report,
                    path,
                    if port_flag == Some(0) {
                        port_name
                    } else {
                        addr_name
                    },
                );
            }
            (Some(BindFlag::Ip(ip)), port) => {
                *field = std::net::SocketAddr::new(ip, port.unwrap_or(default_port)).to_string();
                set(report, path, addr_name);
            }
            (Some(BindFlag::Socket(sa)), port) => {
                *field = sa.to_string();
                set(report, path, addr_name);
                if port.is_some() {
                    report.without_effect.push((
                        port_name.into(),
                        format!("{addr_name} already has a port (upstream ignores it too)"),
                    ));
                }
            }
            (None, Some(_)) => report.without_effect.push((
                port_name.into(),
                "it only completes a bare IP given to the bind-address flag (upstream ignores \
                 it too)"
                    .into(),
            )),
            (None, None) => {}
        }
    }
}

/// The klog / component-base logging flags.
fn logging(
    args: &Args,
    cfg: &mut KubeProxyConfiguration,
    report: &mut FlagReport,
    set: &mut SetFn<'_>,
) -> Result<(), ConfigError> {
    let l = &mut cfg.logging;
    if let Some(f) = args.log_format {
        l.format = match f {
            crate::cli::LogFormat::Text => "text".into(),
            crate::cli::LogFormat::Json => "json".into(),
        };
        set(report, "logging.format", "--logging-format");
    }
    if let Some(v) = args.verbosity {
        l.verbosity = v;
        set(report, "logging.verbosity", "--v");
    }
    if let Some(v) = args.log_flush_frequency {
        l.flush_frequency = v;
        set(report, "logging.flushFrequency", "--log-flush-frequency");
    }
    if let Some(text) = &args.vmodule {
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parsed = item
                .split_once('=')
                .and_then(|(p, n)| Some((p.trim(), n.trim().parse::<u32>().ok()?)))
                .filter(|(p, _)| !p.is_empty());
            let Some((pattern, verbosity)) = parsed else {
                return Err(ConfigError {
                    field: "--vmodule".into(),
                    value: item.into(),
                    reason: "expected PATTERN=N entries separated by commas".into(),
                });
            };
            l.vmodule.push(VModuleItem {
                file_pattern: pattern.into(),
                verbosity,
            });
        }
        set(report, "logging.vmodule", "--vmodule");
    }
    for (value, stream, flag) in [
        (
            args.log_text_split_stream,
            "text",
            "--log-text-split-stream",
        ),
        (
            args.log_json_split_stream,
            "json",
            "--log-json-split-stream",
        ),
    ] {
        if let Some(v) = value {
            match stream {
                "text" => l.options.text.split_stream = v,
                _ => l.options.json.split_stream = v,
            }
            set(
                report,
                &format!("logging.options.{stream}.splitStream"),
                flag,
            );
        }
    }
    for (value, stream, flag) in [
        (
            &args.log_text_info_buffer_size,
            "text",
            "--log-text-info-buffer-size",
        ),
        (
            &args.log_json_info_buffer_size,
            "json",
            "--log-json-info-buffer-size",
        ),
    ] {
        if let Some(v) = value {
            match stream {
                "text" => l.options.text.info_buffer_size = v.clone(),
                _ => l.options.json.info_buffer_size = v.clone(),
            }
            set(
                report,
                &format!("logging.options.{stream}.infoBufferSize"),
                flag,
            );
        }
    }
    Ok(())
}

/// A repeatable, comma-separated list flag (pflag's stringSlice): every value split on commas,
/// spaces trimmed, empty items dropped (`--nodeport-addresses=` gives an empty list).
fn split_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `--feature-gates NAME=BOOL[,NAME=BOOL]`, repeatable, later values winning.
pub fn feature_gates(values: &[String]) -> Result<Vec<(String, bool)>, ConfigError> {
    let mut out = Vec::new();
    for pair in values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let bad = |reason: String| ConfigError {
            field: "--feature-gates".into(),
            value: pair.into(),
            reason,
        };
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=true or NAME=false".into()))?;
        let on = crate::cli::go_bool(value.trim()).map_err(bad)?;
        out.push((name.trim().to_string(), on));
    }
    Ok(out)
}
