//! Table tests of flag and config-file handling against upstream's semantics.

use super::*;
use crate::config::duration::GoDuration;

fn args(list: &[&str]) -> Args {
    let mut v = vec!["kproxy"];
    v.extend_from_slice(list);
    Args::try_parse_go_style(v).expect("flags parse")
}

fn config(list: &[&str]) -> Config {
    from_args(&args(list)).expect("valid")
}

/// A temporary `--config` file; removed on drop.
struct TempConfig(tempfile::NamedTempFile);

impl TempConfig {
    fn new(text: &str) -> Self {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        TempConfig(f)
    }
    fn arg(&self) -> String {
        format!("--config={}", self.0.path().display())
    }
}

#[test]
fn flag_defaults_match_upstream() {
    let c = config(&["--hostname-override", "n1"]);
    assert_eq!(c.mode, ModeName::Iptables);
    assert_eq!(c.sync_period, Duration::from_secs(30));
    assert_eq!(c.min_sync_period, Duration::from_secs(1));
    assert_eq!(c.masquerade_bit, 14);
    assert_eq!(c.healthz_bind, Some("0.0.0.0:10256".parse().expect("addr")));
    assert_eq!(
        c.metrics_bind,
        Some("127.0.0.1:10249".parse().expect("addr"))
    );
    assert_eq!(c.nodeport_addresses, NodePortSetting::AllLocal);
    assert_eq!(c.detect_local, LocalDetectMode::ClusterCidr);
    assert_eq!(c.oom_score_adj, Some(-999));
    assert_eq!(
        c.api_rate_limit,
        ApiRateLimit {
            qps: 5.0,
            burst: 10
        }
    );
    assert!(c.notices.is_empty(), "{:?}", c.notices);
    // Upstream's flag defaults come from the iptables section, so ipvs syncs at most every 1s.
    let c = config(&["--hostname-override", "n1", "--proxy-mode", "ipvs"]);
    assert_eq!(c.min_sync_period, Duration::from_secs(1));
    // An empty mode is the default mode.
    assert_eq!(
        config(&["--hostname-override=n1", "--proxy-mode="]).mode,
        ModeName::Iptables
    );
}

#[test]
fn kubeadms_all_zero_file_runs_with_upstreams_defaults() {
    let file = TempConfig::new(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         bindAddress: 0.0.0.0\nclientConnection:\n  acceptContentTypes: \"\"\n  burst: 0\n\
         \x20 contentType: \"\"\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n  qps: 0\n\
         clusterCIDR: 10.244.0.0/16\nconfigSyncPeriod: 0s\nconntrack:\n  maxPerCore: null\n\
         \x20 min: null\n  tcpCloseWaitTimeout: null\n  tcpEstablishedTimeout: null\n\
         detectLocalMode: \"\"\nhealthzBindAddress: \"\"\nhostnameOverride: \"\"\n\
         iptables:\n  localhostNodePorts: null\n  masqueradeBit: null\n  minSyncPeriod: 0s\n\
         \x20 syncPeriod: 0s\nipvs:\n  excludeCIDRs: null\n  minSyncPeriod: 0s\n\
         logging:\n  flushFrequency: 0\n  options:\n    json:\n      infoBufferSize: \"0\"\n\
         metricsBindAddress: \"\"\nmode: \"\"\nnodePortAddresses: null\noomScoreAdj: null\n\
         portRange: \"\"\nwinkernel:\n  enableDSR: false\n",
    );
    let c = config(&[&file.arg(), "--hostname-override=Node-A"]);
    assert_eq!(c.mode, ModeName::Iptables);
    assert_eq!(c.hostname, "node-a");
    assert_eq!(c.sync_period, Duration::from_secs(30));
    assert_eq!(c.min_sync_period, Duration::from_secs(1));
    assert_eq!(c.healthz_bind, Some("0.0.0.0:10256".parse().expect("addr")));
    assert_eq!(
        c.metrics_bind,
        Some("127.0.0.1:10249".parse().expect("addr"))
    );
    assert_eq!(c.masquerade_bit, 14);
    assert_eq!(c.conntrack.max_per_core, 32_768);
    assert_eq!(c.oom_score_adj, Some(-999));
    assert_eq!(
        c.source,
        SourceConfig::Api {
            kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
            master: None
        }
    );
    assert!(c.notices.is_empty(), "{:?}", c.notices);
    assert_eq!(c.effective.conntrack.min, Some(131_072));
    assert_eq!(c.effective.config_sync_period, GoDuration::secs(900));
}

#[test]
fn a_bare_ip_gets_the_default_port_and_port_flags_only_complete_bare_ips() {
    let c = config(&["--hostname-override=n", "--healthz-bind-address=127.0.0.1"]);
    assert_eq!(
        c.healthz_bind,
        Some("127.0.0.1:10256".parse().expect("addr"))
    );
    let c = config(&[
        "--hostname-override=n",
        "--metrics-bind-address=::",
        "--metrics-port=9100",
    ]);
    assert_eq!(c.metrics_bind, Some("[::]:9100".parse().expect("addr")));
    let c = config(&["--hostname-override=n", "--healthz-port=12345"]);
    assert_eq!(c.healthz_bind, Some("0.0.0.0:10256".parse().expect("addr")));
    assert_eq!(c.notices[0].field, "--healthz-port");
    let c = config(&["--hostname-override=n", "--healthz-port=0"]);
    assert_eq!(c.healthz_bind, None);
    let c = config(&["--hostname-override=n", "--metrics-bind-address="]);
    assert_eq!(c.metrics_bind, None);
    // In a file too: a bare IP is completed, an empty one is defaulted.
    let file = TempConfig::new("healthzBindAddress: 10.0.0.1\nmetricsBindAddress: \"\"\n");
    let c = config(&[&file.arg(), "--hostname-override=n"]);
    assert_eq!(
        c.healthz_bind,
        Some("10.0.0.1:10256".parse().expect("addr"))
    );
    assert_eq!(
        c.metrics_bind,
        Some("127.0.0.1:10249".parse().expect("addr"))
    );
}

#[test]
fn sync_period_flags_follow_the_mode_as_upstream() {
    // nftables reads --iptables-*: upstream has no --nftables-* flags.
    let c = config(&[
        "--hostname-override=n",
        "--proxy-mode=nftables",
        "--iptables-sync-period=1m",
        "--iptables-min-sync-period=10s",
        "--ipvs-sync-period=2m",
    ]);
    assert_eq!(c.sync_period, Duration::from_secs(60));
    assert_eq!(c.min_sync_period, Duration::from_secs(10));
    assert_eq!(c.effective.nftables.sync_period, GoDuration::secs(60));
    let c = config(&[
        "--hostname-override=n",
        "--proxy-mode=ipvs",
        "--iptables-sync-period=1m",
        "--ipvs-sync-period=2m",
        "--ipvs-min-sync-period=0s",
    ]);
    assert_eq!(c.sync_period, Duration::from_secs(120));
    assert_eq!(c.min_sync_period, Duration::ZERO);
    // A flag's zero is taken as given; a file's zero is "unset".
    let c = config(&["--hostname-override=n", "--iptables-min-sync-period=0"]);
    assert_eq!(c.min_sync_period, Duration::ZERO);
    let file = TempConfig::new("mode: ipvs\n");
    let c = config(&[&file.arg(), "--hostname-override=n"]);
    assert_eq!(c.min_sync_period, Duration::ZERO);
}

#[test]
fn flags_override_the_file_and_are_recorded() {
    let file = TempConfig::new(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: iptables\nclusterCIDR: 10.244.0.0/16\nhostnameOverride: from-file\n\
         iptables:\n  syncPeriod: 1m0s\n  minSyncPeriod: 2s\nmysteryField: 1\n",
    );
    let c = config(&[&file.arg()]);
    assert_eq!(c.hostname, "from-file");
    assert_eq!(c.sync_period, Duration::from_secs(60));
    assert_eq!(c.min_sync_period, Duration::from_secs(2));
    assert_eq!(c.notices[0].field, "mysteryField");
    let c = config(&[
        &file.arg(),
        "--hostname-override",
        "flag",
        "--iptables-sync-period",
        "10s",
    ]);
    assert_eq!(c.hostname, "flag");
    assert_eq!(c.sync_period, Duration::from_secs(10));
    assert!(
        c.overridden_fields
            .contains(&"hostnameOverride".to_string())
    );
    assert!(
        c.overridden_fields
            .contains(&"iptables.syncPeriod".to_string())
    );
}

#[test]
fn bad_values_name_the_field_or_flag() {
    for (flags, field) in [
        (vec!["--cluster-cidr", "10.0.0.0/33"], "--cluster-cidr"),
        (
            vec!["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"],
            "--cluster-cidr",
        ),
        (
            vec!["--nodeport-addresses", "everywhere"],
            "--nodeport-addresses",
        ),
        (
            vec!["--nodeport-addresses", "primary,10.0.0.0/8"],
            "--nodeport-addresses",
        ),
        (
            vec!["--iptables-masquerade-bit", "40"],
            "--iptables-masquerade-bit",
        ),
        (vec!["--oom-score-adj", "-1001"], "--oom-score-adj"),
        (vec!["--kube-api-burst=-1"], "--kube-api-burst"),
        (vec!["--conntrack-min=-5"], "--conntrack-min"),
        (vec!["--config-sync-period=0s"], "--config-sync-period"),
        (vec!["--detect-local-mode=Nearby"], "--detect-local-mode"),
        (
            vec!["--detect-local-mode=BridgeInterface"],
            "detectLocal.bridgeInterface",
        ),
        (
            vec![
                "--detect-local-mode=InterfaceNamePrefix",
                "--pod-interface-name-prefix=a\"b",
            ],
            "--pod-interface-name-prefix",
        ),
        (vec!["--feature-gates=Foo"], "--feature-gates"),
        (vec!["--feature-gates=Foo=maybe"], "--feature-gates"),
        (vec!["--vmodule=sync"], "--vmodule"),
        // min > sync is refused, naming the sync period, as upstream.
        (
            vec![
                "--iptables-sync-period=5s",
                "--iptables-min-sync-period=10s",
            ],
            "--iptables-sync-period",
        ),
        (vec!["--iptables-sync-period=0s"], "--iptables-sync-period"),
        (
            vec!["--proxy-mode=ipvs", "--ipvs-exclude-cidrs=10.0.0.0/40"],
            "--ipvs-exclude-cidrs",
        ),
        (
            vec!["--proxy-mode=ipvs", "--ipvs-scheduler=fastest"],
            "--ipvs-scheduler",
        ),
    ] {
        let mut all = vec!["--hostname-override", "n1"];
        all.extend(flags);
        let err = from_args(&args(&all)).expect_err(&format!("{all:?} is invalid"));
        assert_eq!(err.field, field, "{all:?}: {err}");
    }
    // Values of the wrong type are refused by the flag parser, naming the flag (exit 2).
    for bad in [
        "--iptables-sync-period=soon",
        "--iptables-sync-period=5000000000000000h",
        "--healthz-bind-address=nowhere",
        "--masquerade-all=maybe",
        "--bind-address=not-an-ip",
        "--proxy-mode=kernelspace",
    ] {
        let err = Args::try_parse_go_style(["kproxy", bad]).expect_err(bad);
        let flag = bad.split('=').next().expect("flag");
        assert!(err.to_string().contains(flag), "{bad}: {err}");
    }
}

#[test]
fn file_errors_name_the_field() {
    let file = TempConfig::new("iptables:\n  syncPeriod: often\n");
    let err = from_args(&args(&[&file.arg()])).expect_err("bad duration");
    assert!(err.field.ends_with("iptables.syncPeriod"), "{err}");
    let file = TempConfig::new("iptables:\n  syncPeriod: 5s\n  minSyncPeriod: 10s\n");
    let err = from_args(&args(&[&file.arg(), "--hostname-override=n"])).expect_err("min > sync");
    assert_eq!(err.field, "iptables.syncPeriod");
    let file = TempConfig::new("mode: kernelspace\n");
    let err = from_args(&args(&[&file.arg(), "--hostname-override=n"])).expect_err("mode");
    assert_eq!(err.field, "mode");
    let err = from_args(&args(&["--config=/dev/zero"])).expect_err("unbounded file");
    assert_eq!(err.field, "--config");
}

#[test]
fn go_style_flags() {
    assert!(config(&["--hostname-override", "n", "--masquerade-all"]).masquerade_all);
    assert!(!config(&["--hostname-override", "n", "--masquerade-all=false"]).masquerade_all);
    assert!(config(&["--hostname-override", "n", "--masquerade-all=T"]).masquerade_all);
    // pflag normalises `_` to `-` in flag names.
    let c = config(&["--hostname_override=n", "--iptables_sync_period=45s"]);
    assert_eq!(c.sync_period, Duration::from_secs(45));
    assert!(config(&["--hostname-override=n", "--cleanup=true"]).cleanup);
    assert!(!config(&["--hostname-override=n", "--cleanup=false"]).cleanup);
    assert!(config(&["--hostname-override=n", "--cleanup"]).cleanup);
    // Repeatable list flags.
    let c = config(&[
        "--hostname-override=n",
        "--nodeport-addresses=10.0.0.0/8",
        "--nodeport-addresses=192.168.0.0/16,fd00::/8",
    ]);
    assert!(matches!(c.nodeport_addresses, NodePortSetting::Cidrs(ref v) if v.len() == 3));
}

#[test]
fn detect_local_modes() {
    let c = config(&[
        "--hostname-override=n",
        "--detect-local-mode=BridgeInterface",
        "--pod-bridge-interface=cni0",
    ]);
    assert_eq!(
        c.detect_local,
        LocalDetectMode::BridgeInterface("cni0".into())
    );
    let c = config(&[
        "--hostname-override=n",
        "--detect-local-mode=InterfaceNamePrefix",
        "--pod-interface-name-prefix=veth",
    ]);
    assert_eq!(
        c.detect_local,
        LocalDetectMode::InterfaceNamePrefix("veth".into())
    );
    let file = TempConfig::new("detectLocalMode: NodeCIDR\n");
    assert_eq!(
        config(&[&file.arg(), "--hostname-override=n"]).detect_local,
        LocalDetectMode::NodeCidr
    );
}

#[test]
fn nftables_serves_nodeports_on_the_primary_ips_unless_told_otherwise() {
    let c = config(&["--hostname-override=n", "--proxy-mode=nftables"]);
    assert_eq!(c.nodeport_addresses, NodePortSetting::Primary);
    let c = config(&[
        "--hostname-override=n",
        "--proxy-mode=nftables",
        "--nodeport-addresses=10.0.0.0/8",
    ]);
    assert!(matches!(c.nodeport_addresses, NodePortSetting::Cidrs(_)));
    // The nftables mode's masquerade bit is its own section's, as upstream.
    let c = config(&[
        "--hostname-override=n",
        "--proxy-mode=nftables",
        "--iptables-masquerade-bit=3",
    ]);
    assert_eq!(c.masquerade_bit, 14);
    assert_eq!(c.notices[0].field, "--iptables-masquerade-bit");
}

#[test]
fn the_effective_configuration_reads_back_as_itself() {
    let c = config(&[
        "--hostname-override=n",
        "--proxy-mode=ipvs",
        "--cluster-cidr=10.244.0.0/16,fd00:244::/56",
        "--healthz-bind-address=127.0.0.1",
        "--ipvs-exclude-cidrs=10.10.0.0/16",
        "--ipvs-strict-arp",
        "--feature-gates=TopologyAwareHints=true",
        "--oom-score-adj=-500",
        "--v=3",
    ]);
    let yaml = c.effective.to_yaml();
    assert!(
        yaml.contains("apiVersion: kubeproxy.config.k8s.io/v1alpha1"),
        "{yaml}"
    );
    assert!(yaml.contains("minSyncPeriod: 1s"), "{yaml}");
    let file = TempConfig::new(&yaml);
    let again = config(&[&file.arg()]);
    assert_eq!(again.effective, c.effective, "{yaml}");
    assert_eq!(again.healthz_bind, c.healthz_bind);
    assert_eq!(again.sync_period, c.sync_period);
    assert_eq!(again.min_sync_period, c.min_sync_period);
}

#[test]
fn overlapping_cidrs_are_refused_naming_both() {
    let err = from_args(&args(&[
        "--hostname-override",
        "n1",
        "--cluster-cidr",
        "10.0.0.0/8",
        "--service-cluster-ip-range",
        "10.96.0.0/12",
    ]))
    .expect_err("overlap");
    let msg = err.to_string();
    assert!(
        msg.contains("10.0.0.0/8") && msg.contains("10.96.0.0/12") && msg.contains("overlap"),
        "{msg}"
    );
}

#[test]
fn overlap_is_per_family() {
    let c = config(&[
        "--hostname-override",
        "n1",
        "--cluster-cidr",
        "10.244.0.0/16,fd00:10:244::/56",
        "--service-cluster-ip-range",
        "10.96.0.0/12,fd00:10:96::/112",
    ]);
    assert_eq!(c.cluster_cidrs.len(), 2);
    let err = from_args(&args(&[
        "--hostname-override",
        "n1",
        "--cluster-cidr",
        "10.244.0.0/16,fd00::/8",
        "--service-cluster-ip-range",
        "10.96.0.0/12,fd00:10:96::/112",
    ]))
    .expect_err("v6 overlap");
    assert!(err.to_string().contains("fd00::/8"));
}

#[test]
fn admin_socket_defaults_and_turns_off_when_empty() {
    let c = config(&["--hostname-override", "n1"]);
    assert_eq!(
        c.admin_socket.as_deref(),
        Some(std::path::Path::new(super::defaults::ADMIN_SOCKET))
    );
    let c = config(&["--hostname-override", "n1", "--admin-socket="]);
    assert_eq!(c.admin_socket, None);
    let c = config(&["--hostname-override=n1", "--admin-socket", "/tmp/k.sock"]);
    assert_eq!(
        c.admin_socket.as_deref(),
        Some(std::path::Path::new("/tmp/k.sock"))
    );
}

#[test]
fn conntrack_flags_override_the_file() {
    let file = TempConfig::new("conntrack:\n  maxPerCore: 1000\n  udpTimeout: 5s\n");
    let c = config(&[
        &file.arg(),
        "--hostname-override=n1",
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-be-liberal",
    ]);
    assert_eq!(c.conntrack.max_per_core, 0);
    assert_eq!(c.conntrack.udp_timeout, Duration::from_secs(5));
    assert_eq!(
        c.conntrack.tcp_established_timeout,
        Duration::from_secs(7200)
    );
    assert!(c.conntrack.tcp_be_liberal && c.tcp_be_liberal);
}

#[test]
fn node_port_range_parses_as_the_api_servers_flag() {
    let c = config(&["--hostname-override", "n1"]);
    assert_eq!(c.node_port_range, PortRange::DEFAULT_NODE_PORTS);
    assert_eq!(c.node_port_range.to_string(), "30000-32767");
    for (text, want) in [
        ("30000-32767", (30000, 32767)),
        (" 80-32767 ", (80, 32767)),
        ("2222", (2222, 2222)),
        ("30000+100", (30000, 30100)),
        ("0-65535", (0, 65535)),
    ] {
        let c = config(&[
            "--hostname-override=n1",
            &format!("--service-node-port-range={text}"),
        ]);
        assert_eq!(
            (c.node_port_range.first, c.node_port_range.last),
            want,
            "{text:?}"
        );
    }
    assert!(c.node_port_range.contains(30000) && !c.node_port_range.contains(29999));
    for (text, reason) in [
        ("", "expected a port range"),
        ("30000-", "expected a port range"),
        ("a-b", "expected a port range"),
        ("-5-10", "expected a port range"),
        ("1-2+3", "expected a port range"),
        ("30000-70000", "greater than 65535"),
        ("65000+1000", "greater than 65535"),
        ("32767-30000", "end port cannot be less than start port"),
    ] {
        let err = from_args(&args(&[
            "--hostname-override=n1",
            &format!("--service-node-port-range={text}"),
        ]))
        .expect_err(text);
        assert_eq!(err.field, "--service-node-port-range", "{text:?}");
        assert!(err.to_string().contains(reason), "{text:?}: {err}");
    }
}

#[test]
fn external_ip_cidrs_are_an_optional_list_of_any_length() {
    assert_eq!(
        config(&["--hostname-override", "n1"]).external_ip_cidrs,
        None
    );
    assert_eq!(
        config(&["--hostname-override=n1", "--external-ip-cidrs="]).external_ip_cidrs,
        None
    );
    let c = config(&[
        "--hostname-override=n1",
        "--external-ip-cidrs",
        "203.0.113.0/24, 198.51.100.7/24",
        "--external-ip-cidrs=2001:db8::/64,203.0.113.0/24",
    ]);
    let want: Vec<IpNet> = ["203.0.113.0/24", "198.51.100.0/24", "2001:db8::/64"]
        .iter()
        .map(|n| n.parse().expect("cidr"))
        .collect();
    assert_eq!(c.external_ip_cidrs, Some(want));
    let err = from_args(&args(&[
        "--hostname-override=n1",
        "--external-ip-cidrs=10.0.0.1",
    ]))
    .expect_err("not a CIDR");
    assert_eq!(err.field, "--external-ip-cidrs");
    assert_eq!(err.value, "10.0.0.1");
}
