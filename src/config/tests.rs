//! Table tests of flag and config-file handling.

use clap::Parser;

use super::*;

fn args(list: &[&str]) -> Args {
    let mut v = vec!["kproxy"];
    v.extend_from_slice(list);
    Args::try_parse_from(v).expect("flags parse")
}

#[test]
fn defaults_match_upstream() {
    let c = from_args(&args(&["--hostname-override", "n1"])).expect("valid");
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
    let c = from_args(&args(&[
        "--hostname-override",
        "n1",
        "--cluster-cidr",
        "10.244.0.0/16,fd00:10:244::/56",
        "--service-cluster-ip-range",
        "10.96.0.0/12,fd00:10:96::/112",
    ]))
    .expect("disjoint dual-stack");
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
fn bad_values_name_the_field() {
    for (flags, field) in [
        (
            vec!["--iptables-sync-period", "soon"],
            "--iptables-sync-period",
        ),
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
            vec!["--healthz-bind-address", "nowhere"],
            "--healthz-bind-address",
        ),
        (
            vec!["--iptables-masquerade-bit", "40"],
            "--iptables-masquerade-bit",
        ),
    ] {
        let mut all = vec!["--hostname-override", "n1"];
        all.extend(flags);
        let err = from_args(&args(&all)).expect_err("invalid");
        assert_eq!(err.field, field, "{err}");
    }
}

#[test]
fn config_file_is_read_and_flags_override_it() {
    let dir = std::env::temp_dir().join(format!("kproxy-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: iptables\nclusterCIDR: 10.244.0.0/16\nhostnameOverride: from-file\n\
         iptables:\n  syncPeriod: 1m0s\n  minSyncPeriod: 2s\nmysteryField: 1\n",
    )
    .expect("write");
    let p = path.to_str().expect("utf8");
    let c = from_args(&args(&["--config", p])).expect("valid");
    assert_eq!(c.hostname, "from-file");
    assert_eq!(c.sync_period, Duration::from_secs(60));
    assert_eq!(c.min_sync_period, Duration::from_secs(2));
    assert_eq!(c.ignored_fields, vec!["mysteryField"]);
    let c = from_args(&args(&[
        "--config",
        p,
        "--hostname-override",
        "flag",
        "--iptables-sync-period",
        "10s",
    ]))
    .expect("valid");
    assert_eq!(c.hostname, "flag");
    assert_eq!(c.sync_period, Duration::from_secs(10));
    assert!(
        c.overridden_fields
            .contains(&"hostnameOverride".to_string())
    );

    std::fs::write(&path, "iptables:\n  syncPeriod: often\n").expect("write");
    let err = from_args(&args(&["--config", p])).expect_err("bad duration");
    assert_eq!(err.field, "iptables.syncPeriod");
    assert_eq!(err.value, "often");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn go_style_boolean_flags() {
    let c = from_args(&args(&["--hostname-override", "n", "--masquerade-all"])).expect("valid");
    assert!(c.masquerade_all);
    let c = from_args(&args(&[
        "--hostname-override",
        "n",
        "--masquerade-all=false",
    ]))
    .expect("valid");
    assert!(!c.masquerade_all);
}

#[test]
fn admin_socket_defaults_and_turns_off_when_empty() {
    let c = from_args(&args(&["--hostname-override", "n1"])).expect("valid");
    assert_eq!(
        c.admin_socket.as_deref(),
        Some(std::path::Path::new(crate::admin::DEFAULT_SOCKET))
    );
    let c = from_args(&args(&["--hostname-override", "n1", "--admin-socket="])).expect("valid");
    assert_eq!(c.admin_socket, None);
    let c = from_args(&args(&[
        "--hostname-override=n1",
        "--admin-socket",
        "/tmp/k.sock",
    ]))
    .expect("valid");
    assert_eq!(
        c.admin_socket.as_deref(),
        Some(std::path::Path::new("/tmp/k.sock"))
    );
}

#[test]
fn conntrack_flags_override_the_file_and_bad_values_name_the_flag() {
    let c = from_args(&args(&[
        "--hostname-override=n1",
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-be-liberal",
    ]))
    .expect("valid");
    assert_eq!(c.conntrack.max_per_core, 0);
    assert_eq!(
        c.conntrack.tcp_established_timeout,
        Duration::from_secs(7200)
    );
    assert!(c.conntrack.tcp_be_liberal && c.tcp_be_liberal);
    let err = from_args(&args(&[
        "--hostname-override=n1",
        "--conntrack-udp-timeout=soon",
    ]))
    .expect_err("bad duration");
    assert_eq!(err.field, "--conntrack-udp-timeout");
}
