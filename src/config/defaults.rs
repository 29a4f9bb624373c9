//! Upstream's defaulting, in two steps as upstream runs them:
//!
//! 1. [`v1alpha1`]: the API type's defaulting, applied to the decoded file (or to an empty one
//!    when there is no `--config`): a zero duration, an empty string and a null pointer mean
//!    "unset" and become upstream's default, so the all-zero files kubeadm writes run with
//!    30s / 1s sync periods and serve /healthz on 0.0.0.0:10256.
//! 2. [`platform`]: the Linux defaults applied after the flags (an empty mode is iptables, an
//!    empty `detectLocalMode` is ClusterCIDR, nftables with no `nodePortAddresses` serves
//!    NodePorts on the primary IPs).
//!
//! Flags come between the two (see `flags.rs`): a value given on the command line is taken as
//! given, never re-defaulted (`--iptables-min-sync-period=0` means 0, as upstream).

use std::net::IpAddr;

use super::ConfigError;
use super::duration::GoDuration;
use super::file::{self, Document};
use super::v1alpha1::{
    API_VERSION, ClientConnection, Conntrack, DetectLocal, Iptables, Ipvs, KIND,
    KubeProxyConfiguration, Logging, LoggingOptions, Nftables, StreamOptions, VModuleItem,
    Winkernel,
};

/// `/healthz`'s default port.
pub const HEALTHZ_PORT: u16 = 10256;
/// `/metrics`'s default port.
pub const METRICS_PORT: u16 = 10249;
/// The admin socket's default path, shared by the daemon and the `kproxy services` client.
pub const ADMIN_SOCKET: &str = "/run/kproxy/kproxy.sock";
/// The API content type upstream asks for by default (kproxy speaks JSON whatever it is).
pub const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// The v1alpha1 type's defaulting of a decoded document.
pub fn v1alpha1(doc: Document) -> Result<KubeProxyConfiguration, ConfigError> {
    let text = |v: Option<String>| v.unwrap_or_default();
    let or = |d: Option<GoDuration>, default: GoDuration| match d {
        Some(d) if !d.is_zero() => d,
        _ => default,
    };
    let bind_address = match text(doc.bind_address) {
        b if b.trim().is_empty() => "0.0.0.0".to_string(),
        b => b,
    };
    // Upstream picks the IPv6 defaults when bindAddress is not an IPv4 address.
    let ipv4 = matches!(bind_address.trim().parse::<IpAddr>(), Ok(IpAddr::V4(_)))
        || matches!(bind_address.trim().parse::<IpAddr>(), Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some());
    let healthz_bind_address = match text(doc.healthz_bind_address) {
        h if h.is_empty() && ipv4 => format!("0.0.0.0:{HEALTHZ_PORT}"),
        h if h.is_empty() => format!("[::]:{HEALTHZ_PORT}"),
        h => append_port_if_needed(&h, HEALTHZ_PORT),
    };
    let metrics_bind_address = match text(doc.metrics_bind_address) {
        m if m.is_empty() && ipv4 => format!("127.0.0.1:{METRICS_PORT}"),
        m if m.is_empty() => format!("[::1]:{METRICS_PORT}"),
        m => append_port_if_needed(&m, METRICS_PORT),
    };

    let cc = doc.client_connection.unwrap_or_default();
    let client_connection = ClientConnection {
        accept_content_types: text(cc.accept_content_types),
        burst: cc.burst.filter(|b| *b != 0).unwrap_or(10),
        content_type: match cc.content_type {
            Some(c) if !c.trim().is_empty() => c,
            _ => PROTOBUF.into(),
        },
        kubeconfig: text(cc.kubeconfig),
        qps: cc.qps.filter(|q| *q != 0.0).unwrap_or(5.0),
    };

    let ct = doc.conntrack.unwrap_or_default();
    let conntrack = Conntrack {
        max_per_core: Some(ct.max_per_core.unwrap_or(32_768)),
        min: Some(ct.min.unwrap_or(131_072)),
        tcp_be_liberal: ct.tcp_be_liberal.unwrap_or(false),
        tcp_close_wait_timeout: Some(ct.tcp_close_wait_timeout.unwrap_or(GoDuration::secs(3600))),
        tcp_established_timeout: Some(
            ct.tcp_established_timeout
                .unwrap_or(GoDuration::secs(24 * 3600)),
        ),
        udp_stream_timeout: ct.udp_stream_timeout.unwrap_or_default(),
        udp_timeout: ct.udp_timeout.unwrap_or_default(),
    };

    let ipt = doc.iptables.unwrap_or_default();
    let iptables = Iptables {
        localhost_node_ports: Some(ipt.localhost_node_ports.unwrap_or(true)),
        masquerade_all: ipt.masquerade_all.unwrap_or(false),
        masquerade_bit: Some(ipt.masquerade_bit.unwrap_or(14)),
        min_sync_period: or(ipt.min_sync_period, GoDuration::secs(1)),
        sync_period: or(ipt.sync_period, GoDuration::secs(30)),
    };
    let ipvs_doc = doc.ipvs.unwrap_or_default();
    let ipvs = Ipvs {
        exclude_cidrs: ipvs_doc.exclude_cidrs,
        // Not defaulted upstream: 0s syncs as soon as a change arrives.
        min_sync_period: ipvs_doc.min_sync_period.unwrap_or_default(),
        scheduler: text(ipvs_doc.scheduler),
        strict_arp: ipvs_doc.strict_arp.unwrap_or(false),
        sync_period: or(ipvs_doc.sync_period, GoDuration::secs(30)),
        tcp_fin_timeout: ipvs_doc.tcp_fin_timeout.unwrap_or_default(),
        tcp_timeout: ipvs_doc.tcp_timeout.unwrap_or_default(),
        udp_timeout: ipvs_doc.udp_timeout.unwrap_or_default(),
    };
    let nft = doc.nftables.unwrap_or_default();
    let nftables = Nftables {
        masquerade_all: nft.masquerade_all.unwrap_or(false),
        masquerade_bit: Some(nft.masquerade_bit.unwrap_or(14)),
        min_sync_period: or(nft.min_sync_period, GoDuration::secs(1)),
        sync_period: or(nft.sync_period, GoDuration::secs(30)),
    };

    let dl = doc.detect_local.unwrap_or_default();
    let wk = doc.winkernel.unwrap_or_default();
    Ok(KubeProxyConfiguration {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        bind_address,
        bind_address_hard_fail: doc.bind_address_hard_fail.unwrap_or(false),
        client_connection,
        cluster_cidr: text(doc.cluster_cidr),
        config_sync_period: or(doc.config_sync_period, GoDuration::secs(15 * 60)),
        conntrack,
        detect_local: DetectLocal {
            bridge_interface: text(dl.bridge_interface),
            interface_name_prefix: text(dl.interface_name_prefix),
        },
        detect_local_mode: text(doc.detect_local_mode),
        enable_profiling: doc.enable_profiling.unwrap_or(false),
        feature_gates: doc.feature_gates.unwrap_or_default(),
        healthz_bind_address,
        hostname_override: text(doc.hostname_override),
        iptables,
        ipvs,
        logging: logging(doc.logging.unwrap_or_default())?,
        metrics_bind_address,
        mode: text(doc.mode),
        nftables,
        node_port_addresses: doc.node_port_addresses,
        oom_score_adj: Some(doc.oom_score_adj.unwrap_or(-999)),
        port_range: text(doc.port_range),
        show_hidden_metrics_for_version: text(doc.show_hidden_metrics_for_version),
        winkernel: Winkernel {
            enable_dsr: wk.enable_dsr.unwrap_or(false),
            forward_health_check_vip: wk.forward_health_check_vip.unwrap_or(false),
            network_name: text(wk.network_name),
            root_hns_endpoint_name: text(wk.root_hns_endpoint_name),
            source_vip: text(wk.source_vip),
        },
        windows_run_as_service: doc.windows_run_as_service.unwrap_or(false),
    })
}

/// component-base's recommended logging defaults: text format, 5s flush frequency.
fn logging(l: file::Logging) -> Result<Logging, ConfigError> {
    let flush_frequency = match l.flush_frequency {
        None | Some(serde_json::Value::Null) => GoDuration::ZERO,
        // A number is nanoseconds.
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(ns) => GoDuration(std::time::Duration::from_nanos(ns)),
            None => return Err(logging_error("logging.flushFrequency", &n.to_string())),
        },
        Some(serde_json::Value::String(s)) => s.parse().map_err(|reason| ConfigError {
            field: "logging.flushFrequency".into(),
            value: s.clone(),
            reason,
        })?,
        Some(other) => return Err(logging_error("logging.flushFrequency", &other.to_string())),
    };
    let stream = |o: Option<file::StreamOptions>| {
        let o = o.unwrap_or_default();
        StreamOptions {
            info_buffer_size: match o.info_buffer_size {
                None | Some(serde_json::Value::Null) => "0".into(),
                Some(serde_json::Value::String(s)) if s.trim().is_empty() => "0".into(),
                Some(serde_json::Value::String(s)) => s,
                Some(other) => other.to_string(),
            },
            split_stream: o.split_stream.unwrap_or(false),
        }
    };
    let options = l.options.unwrap_or_default();
    Ok(Logging {
        flush_frequency: if flush_frequency.is_zero() {
            GoDuration::secs(5)
        } else {
            flush_frequency
        },
        format: match l.format {
            Some(f) if !f.trim().is_empty() => f,
            _ => "text".into(),
        },
        options: LoggingOptions {
            json: stream(options.json),
            text: stream(options.text),
        },
        verbosity: l.verbosity.unwrap_or(0),
        vmodule: l
            .vmodule
            .unwrap_or_default()
            .into_iter()
            .map(|v| VModuleItem {
                file_pattern: v.file_pattern,
                verbosity: v.verbosity,
            })
            .collect(),
    })
}

fn logging_error(field: &str, value: &str) -> ConfigError {
    ConfigError {
        field: field.into(),
        value: value.into(),
        reason: "expected a Go duration (5s) or a number of nanoseconds".into(),
    }
}

/// The Linux defaults upstream applies after the flags.
pub fn platform(cfg: &mut KubeProxyConfiguration) {
    if cfg.mode.trim().is_empty() {
        cfg.mode = "iptables".into();
    }
    if cfg.mode == "nftables" && cfg.node_port_addresses.as_ref().is_none_or(Vec::is_empty) {
        cfg.node_port_addresses = Some(vec!["primary".into()]);
    }
    if cfg.detect_local_mode.trim().is_empty() {
        cfg.detect_local_mode = "ClusterCIDR".into();
    }
}

/// Upstream's `AppendPortIfNeeded`: an address that already has a port (even an empty one) is
/// kept, so validation can refuse it; a bare IP gets `port` (IPv6 in brackets); anything else is
/// kept for validation to refuse.
pub fn append_port_if_needed(addr: &str, port: u16) -> String {
    if split_host_port(addr).is_some() {
        return addr.to_string();
    }
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Err(_) => addr.to_string(),
    }
}

/// Go's `net.SplitHostPort`: `host:port` or `[host]:port`, exactly one unbracketed colon.
pub fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return (!port.contains(':')).then_some((host, port));
    }
    let (host, port) = addr.split_once(':')?;
    (!port.contains(':')).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_appended_as_upstream_appends_them() {
        for (input, want) in [
            ("0.0.0.0", "0.0.0.0:10256"),
            ("127.0.0.1", "127.0.0.1:10256"),
            ("::", "[::]:10256"),
            ("[::]", "[::]"),
            ("1.2.3.4:", "1.2.3.4:"),
            (":10256", ":10256"),
            ("1.2.3.4:80", "1.2.3.4:80"),
            ("[::1]:80", "[::1]:80"),
            ("localhost", "localhost"),
        ] {
            assert_eq!(append_port_if_needed(input, 10256), want, "{input}");
        }
    }

    #[test]
    fn an_all_zero_file_gets_upstream_defaults() {
        let (doc, _) = file::parse(
            "kind: KubeProxyConfiguration\nhealthzBindAddress: \"\"\nmetricsBindAddress: \"\"\n\
             iptables: {syncPeriod: 0s, minSyncPeriod: 0s, masqueradeBit: null}\n\
             conntrack: {maxPerCore: null, tcpEstablishedTimeout: null}\n\
             clientConnection: {qps: 0, burst: 0, contentType: \"\"}\nconfigSyncPeriod: 0s\n",
        )
        .expect("parses");
        let c = v1alpha1(doc).expect("defaults");
        assert_eq!(c.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(c.metrics_bind_address, "127.0.0.1:10249");
        assert_eq!(c.iptables.sync_period, GoDuration::secs(30));
        assert_eq!(c.iptables.min_sync_period, GoDuration::secs(1));
        assert_eq!(c.iptables.masquerade_bit, Some(14));
        assert_eq!(c.ipvs.min_sync_period, GoDuration::ZERO);
        assert_eq!(c.conntrack.max_per_core, Some(32_768));
        assert_eq!(
            c.conntrack.tcp_established_timeout,
            Some(GoDuration::secs(86_400))
        );
        assert_eq!(c.client_connection.qps, 5.0);
        assert_eq!(c.client_connection.burst, 10);
        assert_eq!(c.client_connection.content_type, PROTOBUF);
        assert_eq!(c.config_sync_period, GoDuration::secs(900));
        assert_eq!(c.oom_score_adj, Some(-999));
        assert_eq!(c.logging.flush_frequency, GoDuration::secs(5));
    }

    #[test]
    fn explicit_zero_pointers_stay_zero_and_ipv6_bind_address_moves_the_listeners() {
        let (doc, _) = file::parse(
            "bindAddress: \"::\"\nconntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s}\n\
             oomScoreAdj: 0\niptables: {masqueradeBit: 0}\n",
        )
        .expect("parses");
        let c = v1alpha1(doc).expect("defaults");
        assert_eq!(c.conntrack.max_per_core, Some(0));
        assert_eq!(c.conntrack.tcp_established_timeout, Some(GoDuration::ZERO));
        assert_eq!(c.oom_score_adj, Some(0));
        assert_eq!(c.iptables.masquerade_bit, Some(0));
        assert_eq!(c.healthz_bind_address, "[::]:10256");
        assert_eq!(c.metrics_bind_address, "[::1]:10249");
    }

    #[test]
    fn platform_defaults_fill_mode_detector_and_nftables_nodeports() {
        let mut c = v1alpha1(Document::default()).expect("defaults");
        platform(&mut c);
        assert_eq!(c.mode, "iptables");
        assert_eq!(c.detect_local_mode, "ClusterCIDR");
        assert_eq!(c.node_port_addresses, None);
        let mut c = v1alpha1(Document::default()).expect("defaults");
        c.mode = "nftables".into();
        platform(&mut c);
        assert_eq!(c.node_port_addresses, Some(vec!["primary".to_string()]));
    }
}
