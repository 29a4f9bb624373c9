//! /healthz, /livez and /metrics of a running kproxy, scraped inside its network namespace.

use std::time::Duration;

use crate::support::http;
use crate::support::kproxy::{KproxyProcess, wait_until};
use crate::support::manifests::{Manifests, Port};
use crate::support::netns::Netns;
use crate::support::require_root;
use crate::support::topology::NODE_IP;

const HTTP: Port = Port::tcp("http", 80, 8080);

/// `GET path` on 127.0.0.1:port inside `ns`: (status, headers and body).
fn get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    http::get(ns, std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// kproxy on `manifests` as node-a, iptables mode through iptables-nft, plus `extra`; health and
/// metrics are off unless `extra` binds them.
fn start_on(node: &Netns, manifests: &Manifests, extra: &[&str]) -> KproxyProcess {
    let dir = manifests.arg();
    let mut args = vec![
        "--manifests",
        &dir,
        "--hostname-override",
        "node-a",
        "--iptables-backend",
        "nft",
    ];
    for flag in ["--healthz-bind-address", "--metrics-bind-address"] {
        if !extra.iter().any(|a| a.starts_with(flag)) {
            args.push(if flag.starts_with("--healthz") {
                "--healthz-bind-address="
            } else {
                "--metrics-bind-address="
            });
        }
    }
    args.extend_from_slice(extra);
    KproxyProcess::start(node, &args)
}

/// The value of the sample whose name and labels are exactly `series`.
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[test]
fn health_and_metrics_endpoints() {
    if !require_root("health_and_metrics_endpoints") {
        return;
    }
    let node = Netns::new("node");
    let started = std::time::Instant::now();
    let manifests = Manifests::new();
    manifests.node("node-a", &[NODE_IP]);
    manifests.service("web", &["10.96.0.10"], &[HTTP]);
    manifests.endpoint_slice("web", "web-v4", &["10.244.1.10"], &[HTTP]);
    let mut kproxy = start_on(
        &node,
        &manifests,
        &[
            "--cluster-cidr",
            "10.244.0.0/16",
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=127.0.0.1:10249",
        ],
    );
    let synced = wait_until(Duration::from_secs(10), || {
        get(&node, 10249, "/metrics").is_some_and(|(_, body)| {
            body.lines().any(|l| {
                l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds ")
                    && !l.ends_with(" 0.0")
            })
        })
    });
    if !synced {
        kproxy.assert_running();
        panic!("no successful sync reported on /metrics");
    }

    let (code, text) = get(&node, 10256, "/healthz").expect("healthz answers");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("application/json"), "{text}");
    for field in [
        "\"lastUpdated\"",
        "\"currentTime\"",
        "\"nodeEligible\":true",
    ] {
        assert!(text.contains(field), "healthz body lacks {field}: {text}");
    }
    let (code, text) = get(&node, 10256, "/livez").expect("livez answers");
    assert_eq!(code, 200, "{text}");
    assert!(!text.contains("nodeEligible"), "{text}");

    let (code, text) = get(&node, 10249, "/metrics").expect("metrics answer");
    assert_eq!(code, 200);
    for want in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{le=\"0.001\"}",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 0",
        "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
        "kubeproxy_proxy_livez_total{code=\"200\"} 1",
        "kproxy_service_ports 1",
        "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"}",
        "kproxy_kernel_objects{ip_family=\"IPv4\",table=\"nat\",kind=\"chains\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"} 0",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
        "process_resident_memory_bytes",
        "kubeproxy_network_programming_duration_seconds_count 0",
    ] {
        assert!(text.contains(want), "/metrics lacks {want:?}:\n{text}");
    }
    // The nat table holds kproxy's rules: a real count read from the applied state, not zero.
    let nat_rules = metric_value(
        &text,
        "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"}",
    );
    assert!(nat_rules >= 5.0, "nat rules: {nat_rules}\n{text}");

    // An EndpointSlice change stamped by the controller 1.5 s ago: the latency from that stamp
    // to the rules being applied lands in upstream's histogram (bucket 1 s excluded, 5 s
    // included, since the sync itself takes well under 3 s here).
    // Changes older than kproxy's start are not measured (the initial list carries those).
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    let stamp = std::time::SystemTime::now() - Duration::from_millis(1500);
    let mut slice = crate::support::manifests::endpoint_slice(
        "web",
        "web-v4",
        &["10.244.1.10", "10.244.1.11"],
        &[HTTP],
    );
    slice = slice.replacen(
        "metadata:\n",
        &format!(
            "metadata:\n  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{}\"\n",
            humantime::format_rfc3339_millis(stamp)
        ),
        1,
    );
    manifests.write("eps-web-v4", &slice);
    let measured = wait_until(Duration::from_secs(10), || {
        get(&node, 10249, "/metrics").is_some_and(|(_, body)| {
            body.contains("kubeproxy_network_programming_duration_seconds_count 1")
        })
    });
    let (_, text) = get(&node, 10249, "/metrics").expect("metrics answer");
    assert!(measured, "no network programming latency observed:\n{text}");
    assert_eq!(
        metric_value(
            &text,
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"}"
        ),
        0.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"5.0\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
        2.0
    );

    // `kproxy services` asks the running daemon over its admin socket: the answer is the state
    // it applied, including the endpoint added a moment ago.
    let ask = |output: &str| {
        let out = std::process::Command::new(crate::support::kproxy::KPROXY)
            .arg("services")
            .arg(format!(
                "--admin-socket={}",
                kproxy.admin_socket().display()
            ))
            .args(["--output", output])
            .output()
            .expect("run kproxy services");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let json: serde_json::Value = serde_json::from_str(&ask("json")).expect("json answer");
    let text = json.to_string();
    assert!(
        text.contains("default/web") && text.contains("10.244.1.11"),
        "{json:#}"
    );
    let table = ask("table");
    assert!(table.contains("10.96.0.10"), "{table}");

    // The Node is being drained: /healthz says 503 so load balancers move away; /livez stays 200.
    manifests.write(
        "node-node-a",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nspec:\n  taints:\n  - key: ToBeDeletedByClusterAutoscaler\n    effect: NoSchedule\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 10.0.1.1\n",
    );
    let drained = wait_until(Duration::from_secs(10), || {
        get(&node, 10256, "/healthz").is_some_and(|(code, _)| code == 503)
    });
    assert!(drained, "healthz did not report the draining node");
    let (code, _) = get(&node, 10256, "/livez").expect("livez answers");
    assert_eq!(code, 200);
    kproxy.assert_running();
}

/// `--conntrack-*` flags set the per-namespace conntrack sysctls of the namespace kproxy runs
/// in, and leave the host-wide ones (`nf_conntrack_max`, `hashsize`) alone from there.
#[test]
fn conntrack_sysctl_flags_are_applied() {
    if !require_root("conntrack_sysctl_flags_are_applied") {
        return;
    }
    let node = Netns::new("node");
    let read = |name: &str| -> String {
        let path = format!("/proc/sys/net/netfilter/{name}");
        node.in_ns(move || std::fs::read_to_string(path).expect("sysctl readable"))
            .trim()
            .to_string()
    };
    let host_max = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .expect("host nf_conntrack_max");
    let host_hashsize =
        std::fs::read_to_string("/sys/module/nf_conntrack/parameters/hashsize").expect("hashsize");
    assert_ne!(read("nf_conntrack_tcp_timeout_established"), "7200");
    let manifests = Manifests::new();
    manifests.node("node-a", &[NODE_IP]);
    let mut kproxy = start_on(
        &node,
        &manifests,
        &[
            "--conntrack-tcp-timeout-established=2h",
            "--conntrack-tcp-timeout-close-wait=90s",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout=45s",
            "--conntrack-udp-timeout-stream=150s",
            // Far above any current value: kproxy would raise it on the host.
            "--conntrack-max-per-core=1000000",
        ],
    );
    let applied = wait_until(Duration::from_secs(10), || {
        read("nf_conntrack_udp_timeout_stream") == "150"
    });
    kproxy.assert_running();
    assert!(applied, "sysctls not applied");
    assert_eq!(read("nf_conntrack_tcp_timeout_established"), "7200");
    assert_eq!(read("nf_conntrack_tcp_timeout_close_wait"), "90");
    assert_eq!(read("nf_conntrack_tcp_be_liberal"), "1");
    assert_eq!(read("nf_conntrack_udp_timeout"), "45");
    // Host-wide: untouched, and the log says why.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").expect("max"),
        host_max
    );
    assert_eq!(
        std::fs::read_to_string("/sys/module/nf_conntrack/parameters/hashsize").expect("hashsize"),
        host_hashsize
    );
    let logged = wait_until(Duration::from_secs(5), || {
        (kproxy.stdout() + &kproxy.stderr())
            .contains("leaving this host-wide conntrack setting alone")
    });
    assert!(
        logged,
        "no log line about nf_conntrack_max:\n{}",
        kproxy.stderr()
    );
}

/// SIGTERM finishes the current sync and exits 0, leaving the rules in place (traffic keeps
/// flowing through a rolling update); `--log-format json` writes one JSON object per line, and
/// a skipped object's line names it as namespace/name with the field at fault.
#[test]
fn sigterm_keeps_the_rules_and_json_logs_name_objects() {
    if !require_root("sigterm_keeps_the_rules_and_json_logs_name_objects") {
        return;
    }
    let node = Netns::new("node");
    let manifests = Manifests::new();
    manifests.node("node-a", &[NODE_IP]);
    manifests.service("web", &["10.96.0.10"], &[HTTP]);
    manifests.endpoint_slice("web", "web-v4", &["10.244.1.10"], &[HTTP]);
    manifests.write(
        "svc-bad",
        &crate::support::manifests::service("bad", &["10.96.0.10"], &[HTTP])
            .replace("\"10.96.0.10\"", "\"10.96.0.300\""),
    );
    let mut kproxy = start_on(&node, &manifests, &["--log-format", "json"]);
    let rules = || node.run("iptables-nft-save", &["-t", "nat"]);
    let programmed = wait_until(Duration::from_secs(10), || {
        rules().contains("-d 10.96.0.10/32")
    });
    kproxy.assert_running();
    assert!(programmed, "no rule for the service:\n{}", rules());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(kproxy.pid()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = kproxy
        .wait(Duration::from_secs(10))
        .expect("kproxy exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        rules().contains("-d 10.96.0.10/32"),
        "rules removed on SIGTERM:\n{}",
        rules()
    );

    let log = kproxy.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    let bad = lines
        .iter()
        .map(|v| v.to_string())
        .find(|l| l.contains("default/bad"))
        .unwrap_or_else(|| panic!("no log line names default/bad:\n{log}"));
    assert!(
        bad.contains("clusterIP") && bad.contains("10.96.0.300"),
        "{bad}"
    );
    assert!(
        lines
            .iter()
            .any(|v| v.to_string().contains("shutdown requested")),
        "{log}"
    );
}
