//! What kproxy accepts but does not act on, reported once at start by name with the reason, so
//! nothing an operator set is dropped silently. A field left at upstream's default is not
//! reported (kproxy's behaviour is then the default one; the README's Flags section lists every
//! field's status); a field or flag set to something else is.

use super::defaults::PROTOBUF;
use super::duration::GoDuration;
use super::flags::FlagReport;
use super::v1alpha1::KubeProxyConfiguration;

/// One warning: the field or flag, and what a person should know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// A config path (`enableProfiling`) or a flag (`--profiling`).
    pub field: String,
    /// Why it has no effect, or what to do instead.
    pub message: String,
}

/// A feature gate upstream kube-proxy reads, and what kproxy does about it.
struct Gate {
    name: &'static str,
    /// Upstream's default in the releases kproxy follows.
    default: bool,
    /// What kproxy does, whatever the setting.
    kproxy: &'static str,
}

/// The gates kube-proxy consults (all GA and locked on in current releases, so kproxy always has
/// the behaviour), and gates of older releases that installers still pass.
const GATES: &[Gate] = &[
    Gate {
        name: "NFTablesProxyMode",
        default: true,
        kproxy: "the nftables mode is always available",
    },
    Gate {
        name: "MultiCIDRServiceAllocator",
        default: true,
        kproxy: "service CIDRs come from --service-cluster-ip-range",
    },
    Gate {
        name: "TopologyAwareHints",
        default: true,
        kproxy: "zone hints are always honoured",
    },
    Gate {
        name: "ServiceTrafficDistribution",
        default: true,
        kproxy: "trafficDistribution is always honoured",
    },
    Gate {
        name: "PreferSameTrafficDistribution",
        default: true,
        kproxy: "node hints are always honoured",
    },
    Gate {
        name: "LoadBalancerIPMode",
        default: true,
        kproxy: "ingress IPs with ipMode Proxy are never programmed",
    },
    Gate {
        name: "KubeProxyDrainingTerminatingNodes",
        default: true,
        kproxy: "/healthz fails while the node is being deleted",
    },
    Gate {
        name: "ProxyTerminatingEndpoints",
        default: true,
        kproxy: "serving terminating endpoints are used when no endpoint is ready",
    },
    Gate {
        name: "IPv6DualStack",
        default: true,
        kproxy: "both families are always programmed",
    },
    Gate {
        name: "EndpointSliceProxying",
        default: true,
        kproxy: "EndpointSlices are always the source of endpoints",
    },
    Gate {
        name: "ServiceInternalTrafficPolicy",
        default: true,
        kproxy: "internalTrafficPolicy is always honoured",
    },
    Gate {
        name: "MinimizeIPTablesRestore",
        default: true,
        kproxy: "every sync writes only what changed",
    },
];

/// Gates that tune logging and component plumbing, not proxying: accepted quietly.
const QUIET_GATES: &[&str] = &[
    "AllAlpha",
    "AllBeta",
    "ContextualLogging",
    "LoggingAlphaOptions",
    "LoggingBetaOptions",
    "ComponentFlagz",
    "ComponentStatusz",
    "StrictIPCIDRValidation",
];

/// Collects the notices for an effective configuration.
pub fn collect(
    cfg: &KubeProxyConfiguration,
    report: &FlagReport,
    unknown_fields: &[String],
    explicit_localhost_nodeports: Option<bool>,
) -> Vec<Notice> {
    let mut out = Vec::new();
    let mut note = |path: &str, message: String| {
        out.push(Notice {
            field: report.origin(path),
            message,
        });
    };
    for field in unknown_fields {
        note(
            field,
            "not a field of kubeproxy.config.k8s.io/v1alpha1 that kproxy knows (an older or \
             newer kube-proxy's?); ignored, as upstream's lenient decoding ignores it"
                .into(),
        );
    }
    if cfg.enable_profiling {
        note(
            "enableProfiling",
            "kproxy has no Go runtime to profile, so /debug/pprof is not served; profile it \
             with perf, and see the process_* metrics"
                .into(),
        );
    }
    if !cfg.show_hidden_metrics_for_version.is_empty() {
        note(
            "showHiddenMetricsForVersion",
            "kproxy hides no metrics, so there is nothing to show again".into(),
        );
    }
    let content_type = cfg.client_connection.content_type.as_str();
    if content_type != PROTOBUF && content_type != "application/json" {
        note(
            "clientConnection.contentType",
            format!(
                "kproxy always speaks application/json to the API server, not {content_type:?}"
            ),
        );
    }
    if !cfg.client_connection.accept_content_types.is_empty() {
        note(
            "clientConnection.acceptContentTypes",
            "kproxy always accepts application/json from the API server".into(),
        );
    }
    if cfg.config_sync_period != GoDuration::secs(15 * 60) {
        note(
            "configSyncPeriod",
            "kproxy's watches keep no informer that would need a resync; the full resync every \
             sync period re-applies every rule from its cache"
                .into(),
        );
    }
    if !cfg.port_range.trim().is_empty() {
        note(
            "portRange",
            "unused since upstream removed its userspace proxy; ignored, as upstream ignores it"
                .into(),
        );
    }
    if explicit_localhost_nodeports == Some(true) && cfg.mode == "iptables" {
        note(
            "iptables.localhostNodePorts",
            "NodePorts are not served on 127.0.0.1: that needs net.ipv4.conf.all.route_localnet=1, \
             which exposes every service bound to localhost on the node to its neighbours \
             (CVE-2020-8558); reach a NodePort through a node address instead"
                .into(),
        );
    }
    let logging = &cfg.logging;
    if !logging.vmodule.is_empty() {
        note(
            "logging.vmodule",
            "per-file verbosity names Go source files; set RUST_LOG (e.g. \
             RUST_LOG=info,kproxy::sync=debug) for per-module levels"
                .into(),
        );
    }
    for (stream, o) in [
        ("text", &logging.options.text),
        ("json", &logging.options.json),
    ] {
        if o.split_stream {
            note(
                &format!("logging.options.{stream}.splitStream"),
                "kproxy writes every log line to standard error".into(),
            );
        }
        if o.info_buffer_size.trim() != "0" {
            note(
                &format!("logging.options.{stream}.infoBufferSize"),
                "kproxy writes every log line at once, unbuffered".into(),
            );
        }
    }
    let w = &cfg.winkernel;
    if w.enable_dsr
        || w.forward_health_check_vip
        || !w.network_name.is_empty()
        || !w.root_hns_endpoint_name.is_empty()
        || !w.source_vip.is_empty()
        || cfg.windows_run_as_service
    {
        note(
            "winkernel",
            "Windows settings; kproxy runs on Linux only".into(),
        );
    }
    for (name, on) in &cfg.feature_gates {
        if QUIET_GATES.contains(&name.as_str()) {
            continue;
        }
        match GATES.iter().find(|g| g.name == name) {
            Some(g) if g.default == *on => {}
            Some(g) => note(
                "featureGates",
                format!(
                    "{name}={on}: upstream has locked this gate to {}; kproxy behaves as with \
                     the gate on ({})",
                    g.default, g.kproxy
                ),
            ),
            None => note(
                "featureGates",
                format!("{name}={on}: not a gate kproxy knows; ignored"),
            ),
        }
    }
    for (flag, why) in &report.without_effect {
        out.push(Notice {
            field: flag.clone(),
            message: format!("no effect: {why}"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaulted() -> KubeProxyConfiguration {
        let mut c = crate::config::defaults::v1alpha1(crate::config::file::Document::default())
            .expect("defaults");
        crate::config::defaults::platform(&mut c);
        c
    }

    #[test]
    fn a_defaulted_configuration_has_nothing_to_report() {
        assert_eq!(
            collect(&defaulted(), &FlagReport::default(), &[], None),
            Vec::new()
        );
    }

    #[test]
    fn every_setting_without_effect_is_named() {
        let mut c = defaulted();
        c.enable_profiling = true;
        c.config_sync_period = GoDuration::secs(60);
        c.port_range = "30000-32767".into();
        c.feature_gates.insert("TopologyAwareHints".into(), false);
        c.feature_gates.insert("NoSuchGate".into(), true);
        c.feature_gates.insert("NFTablesProxyMode".into(), true);
        c.feature_gates.insert("AllAlpha".into(), false);
        c.client_connection.content_type = "application/yaml".into();
        let mut report = FlagReport::default();
        report
            .origins
            .insert("enableProfiling".into(), "--profiling".into());
        let notices = collect(&c, &report, &["conntrack.max".into()], Some(true));
        let fields: Vec<&str> = notices.iter().map(|n| n.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "conntrack.max",
                "--profiling",
                "clientConnection.contentType",
                "configSyncPeriod",
                "portRange",
                "iptables.localhostNodePorts",
                "featureGates",
                "featureGates",
            ]
        );
        assert!(notices[6].message.contains("NoSuchGate"), "{notices:?}");
        assert!(notices[7].message.contains("TopologyAwareHints=false"));
    }
}
