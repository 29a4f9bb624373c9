//! kproxy dropped into a real node's life: a fresh node started from the shipped manifests (no
//! Service VIP exists yet), a `--config` file that changes, listeners whose ports are still
//! held by the previous pod, an API server that cannot be reached, `--init-only` and
//! `--oom-score-adj`. Each in network namespaces the test creates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::fake_apiserver::FakeApiServer;
use crate::support::http;
use crate::support::kproxy::{KproxyProcess, wait_until};
use crate::support::manifests::Port;
use crate::support::netns::{Netns, veth};
use crate::support::objects::{Ep, Svc, endpoint_slice, node};
use crate::support::require_root;

/// The node's address on its uplink.
const NODE: &str = "10.0.1.1";

/// A node namespace with an uplink (so it has a non-loopback address) and its peer.
fn node_with_uplink() -> (Netns, Netns) {
    let node_ns = Netns::new("node");
    let peer = Netns::new("peer");
    let link = veth(&node_ns, &[&format!("{NODE}/24")], &peer, &["10.0.1.2/24"]);
    link.wait_up();
    // A node routes everything somewhere; without a route a service address is unreachable
    // before any rule sees the packet.
    node_ns.route("default", "10.0.1.2");
    (node_ns, peer)
}

fn manifest(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests")
        .join(file);
    serde_saphyr::from_multiple::<Value>(&std::fs::read_to_string(path).expect("manifest"))
        .expect("YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// A self-signed CA certificate (PEM), as a service account's `ca.crt` holds.
fn ca_certificate(dir: &Path) -> PathBuf {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kproxy-test-ca",
            "-keyout",
        ])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.crt"))
        .output()
        .expect("openssl (installed with ca-certificates) must be present");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("ca.crt")
}

/// The shipped DaemonSet and ConfigMap, run as the kubelet would run them on a node whose rules
/// are gone (a reboot, a new node): the `kubernetes` Service's ClusterIP is not programmed, so
/// only a kubeconfig naming the control plane's own address lets kproxy start, and once it has
/// synced the ClusterIP reaches the API server.
#[test]
fn a_fresh_node_starts_from_the_shipped_manifests_without_a_service_vip() {
    if !require_root("a_fresh_node_starts_from_the_shipped_manifests_without_a_service_vip") {
        return;
    }
    let (node_ns, _peer) = node_with_uplink();
    let listener = node_ns
        .in_ns(|| std::net::TcpListener::bind((NODE, 0)))
        .expect("bind the API server on the node's own address");
    let api = FakeApiServer::start_on(listener);
    let api_port = api.addr().port();
    api.apply(node("node-a", &[NODE], None));
    let https = Port::tcp("https", 443, api_port);
    api.apply(Svc::new("kubernetes", &["10.96.0.1"], &[https]).json());
    api.apply(endpoint_slice(
        "kubernetes",
        "kubernetes",
        &[Ep::ready(NODE)],
        &[https],
    ));

    // The pod's filesystem: the ConfigMap at its mount path, the service account's files.
    let root = tempfile::Builder::new()
        .prefix("kpx-pod-")
        .tempdir()
        .expect("root");
    let mapped = |p: &str| format!("{}{p}", root.path().display());
    let sa = root
        .path()
        .join("var/run/secrets/kubernetes.io/serviceaccount");
    std::fs::create_dir_all(&sa).expect("sa dir");
    std::fs::write(sa.join("token"), "service-account-token").expect("token");
    ca_certificate(&sa);
    let cm = &manifest("configmap.yaml")[0];
    let config_dir = root.path().join("var/lib/kproxy");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    for (key, value) in cm["data"].as_object().expect("data") {
        let mut text = value.as_str().expect("text").to_string();
        for path in [
            "/var/lib/kproxy/",
            "/var/run/secrets/kubernetes.io/serviceaccount/",
        ] {
            text = text.replace(path, &mapped(path));
        }
        // The one value an operator fills in: the control plane's address.
        text = text.replace("https://CONTROL-PLANE-ENDPOINT:6443", &api.url());
        std::fs::write(config_dir.join(key), text).expect("config file");
    }
    let ds = &manifest("daemonset.yaml")[0];
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["command"]
        .as_array()
        .expect("command")
        .iter()
        .skip(1)
        .map(|a| {
            a.as_str()
                .expect("arg")
                .replace("/var/lib/kproxy/", &mapped("/var/lib/kproxy/"))
                .replace("$(NODE_NAME)", "node-a")
        })
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut kproxy = KproxyProcess::start(&node_ns, &refs);

    // The Service VIP answers: it leads to the API server, through kproxy's rules.
    let vip: SocketAddr = "10.96.0.1:443".parse().expect("addr");
    let through_vip = wait_until(Duration::from_secs(20), || {
        http::get(&node_ns, vip, "/api/v1/services").is_some_and(|(code, _)| code == 200)
    });
    assert!(
        through_vip,
        "the kubernetes Service VIP never reached the API server\n{}",
        kproxy.stderr()
    );
    let healthz: SocketAddr = format!("{NODE}:10256").parse().expect("addr");
    assert_eq!(
        http::get(&node_ns, healthz, "/healthz").map(|(c, _)| c),
        Some(200)
    );
    assert!(kproxy.try_wait().is_none(), "{}", kproxy.stderr());
    assert!(
        !kproxy.stderr().contains("cannot reach"),
        "{}",
        kproxy.stderr()
    );
}

/// Upstream exits when its configuration file changes, so the pod restarts with the new
/// settings. A ConfigMap update swaps a symlinked directory under the file; a rewrite with the
/// same content is no change.
#[test]
fn a_changed_config_file_makes_kproxy_exit_and_keep_its_rules() {
    if !require_root("a_changed_config_file_makes_kproxy_exit_and_keep_its_rules") {
        return;
    }
    let (node_ns, _peer) = node_with_uplink();
    let dir = tempfile::tempdir().expect("dir");
    let manifests = crate::support::manifests::Manifests::new();
    manifests.node("node-a", &[NODE]);
    manifests.service("web", &["10.96.0.10"], &[Port::tcp("http", 80, 8080)]);
    // The kubelet's layout: config.conf -> ..data/config.conf, ..data -> ..2026_1.
    let write_version = |name: &str, mode: &str| {
        let version = dir.path().join(name);
        std::fs::create_dir_all(&version).expect("dir");
        std::fs::write(
            version.join("config.conf"),
            format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: {mode}\n"),
        )
        .expect("write");
        let tmp = dir.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).expect("link");
        std::fs::rename(&tmp, dir.path().join("..data")).expect("swap");
    };
    write_version("..2026_1", "iptables");
    std::os::unix::fs::symlink("..data/config.conf", dir.path().join("config.conf")).expect("link");
    let config = format!("--config={}", dir.path().join("config.conf").display());
    let mut kproxy = KproxyProcess::start(
        &node_ns,
        &[
            &config,
            "--manifests",
            &manifests.arg(),
            "--hostname-override=node-a",
            "--iptables-backend=nft",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
        ],
    );
    let synced = wait_until(Duration::from_secs(15), || {
        node_ns
            .run("iptables-nft-save", &[])
            .contains("10.96.0.10/32")
    });
    assert!(synced, "{}", kproxy.stderr());
    // The same bytes again: no change.
    write_version("..2026_2", "iptables");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        kproxy.try_wait().is_none(),
        "exited on a rewrite of the same content"
    );
    // New content: kproxy exits with status 1 within a couple of seconds, naming the file.
    write_version("..2026_3", "nftables");
    let status = kproxy.wait(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", kproxy.stderr());
    assert!(
        kproxy.stderr().contains("--config file") && kproxy.stderr().contains("changed"),
        "{}",
        kproxy.stderr()
    );
    // The rules stay for the next kproxy to take over.
    assert!(
        node_ns
            .run("iptables-nft-save", &[])
            .contains("10.96.0.10/32")
    );
}

/// A listener whose port is taken (the old pod still holds it during a rolling update) is
/// retried until the port is free; with `--bind-address-hard-fail` kproxy exits instead.
#[test]
fn busy_health_and_metrics_ports_are_retried_until_free_or_fail_hard() {
    if !require_root("busy_health_and_metrics_ports_are_retried_until_free_or_fail_hard") {
        return;
    }
    let (node_ns, _peer) = node_with_uplink();
    let manifests = crate::support::manifests::Manifests::new();
    manifests.node("node-a", &[NODE]);
    let holder = node_ns
        .in_ns(|| std::net::TcpListener::bind(("127.0.0.1", 10256)))
        .expect("hold the health port");
    let base = [
        "--manifests",
        &manifests.arg(),
        "--hostname-override=node-a",
        "--iptables-backend=nft",
        "--healthz-bind-address=127.0.0.1:10256",
        "--metrics-bind-address=127.0.0.1:10249",
    ];
    let kproxy = KproxyProcess::start(&node_ns, &base);
    let healthz: SocketAddr = "127.0.0.1:10256".parse().expect("addr");
    let metrics: SocketAddr = "127.0.0.1:10249".parse().expect("addr");
    assert!(wait_until(Duration::from_secs(10), || {
        http::get(&node_ns, metrics, "/metrics").is_some()
    }));
    assert!(
        wait_until(Duration::from_secs(5), || kproxy
            .stderr()
            .contains("cannot serve; retrying every 5s")),
        "{}",
        kproxy.stderr()
    );
    drop(holder);
    let served = wait_until(Duration::from_secs(8), || {
        http::get(&node_ns, healthz, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    assert!(served, "/healthz never bound\n{}", kproxy.stderr());
    drop(kproxy);

    let _holder = node_ns
        .in_ns(|| std::net::TcpListener::bind(("127.0.0.1", 10256)))
        .expect("hold the health port");
    let mut args = base.to_vec();
    args.push("--bind-address-hard-fail");
    let (p, status) = KproxyProcess::run(&node_ns, &args, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", p.stderr());
    assert!(
        p.stderr()
            .contains("cannot serve /healthz on 127.0.0.1:10256"),
        "{}",
        p.stderr()
    );
}

/// An API server that cannot be reached is reported within seconds, with the address tried.
#[test]
fn an_unreachable_api_server_is_reported_within_seconds() {
    if !require_root("an_unreachable_api_server_is_reported_within_seconds") {
        return;
    }
    let (node_ns, _peer) = node_with_uplink();
    // The `kubernetes` Service's ClusterIP on a node where nothing has programmed it.
    let mut kproxy = KproxyProcess::start(
        &node_ns,
        &[
            "--master=https://10.96.0.1:443",
            "--hostname-override=node-a",
            "--iptables-backend=nft",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
        ],
    );
    let started = std::time::Instant::now();
    let reported = wait_until(Duration::from_secs(10), || {
        kproxy
            .stderr()
            .contains("cannot reach the Kubernetes API server")
    });
    let took = started.elapsed();
    let log = kproxy.stderr();
    assert!(reported, "{log}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(log.contains("https://10.96.0.1"), "{log}");
    assert!(log.contains("advice="), "{log}");
    assert!(kproxy.try_wait().is_none(), "kproxy keeps trying: {log}");
}

/// `--init-only` sets the node up (the conntrack sysctls) and exits without contacting the API
/// or programming rules; `--oom-score-adj` is written to the process's own score.
#[test]
fn init_only_sets_up_and_exits_and_the_oom_score_is_applied() {
    if !require_root("init_only_sets_up_and_exits_and_the_oom_score_is_applied") {
        return;
    }
    let (node_ns, _peer) = node_with_uplink();
    let (p, status) = KproxyProcess::run(
        &node_ns,
        &[
            "--init-only",
            "--master=https://10.96.0.1:443",
            "--hostname-override=node-a",
            "--conntrack-tcp-timeout-established=2h",
        ],
        Duration::from_secs(10),
    );
    assert!(status.success(), "{}", p.stderr());
    assert_eq!(
        node_ns
            .sysctl_get("net.netfilter.nf_conntrack_tcp_timeout_established")
            .trim(),
        "7200"
    );
    assert!(
        !node_ns.run("iptables-nft-save", &[]).contains("KPROXY-"),
        "rules programmed by --init-only"
    );

    // Raising the score is allowed everywhere; lowering it needs CAP_SYS_RESOURCE (see the
    // installer corpus for the default, -999).
    let manifests = crate::support::manifests::Manifests::new();
    manifests.node("node-a", &[NODE]);
    let kproxy = KproxyProcess::start(
        &node_ns,
        &[
            "--manifests",
            &manifests.arg(),
            "--hostname-override=node-a",
            "--iptables-backend=nft",
            "--oom-score-adj=500",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
        ],
    );
    let file = format!("/proc/{}/oom_score_adj", kproxy.pid());
    let applied = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&file).is_ok_and(|v| v.trim() == "500")
    });
    assert!(applied, "{}", kproxy.stderr());
}
