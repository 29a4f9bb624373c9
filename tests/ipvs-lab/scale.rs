//! Not part of CI: the sync time at 10,000 services, measured once in the lab guest with
//! `KPROXY_LAB_FILTER=scale:: cargo test --test ipvs_lab guest_runs`.

use std::time::Duration;

use crate::support::manifests::Manifests;
use crate::support::netns::Netns;

#[test]
#[ignore = "measurement: run inside the lab guest on request"]
fn sync_10k_services() {
    let ns = Netns::new("scale");
    ns.ip(&["link", "add", "eth0", "type", "dummy"]);
    ns.ip(&["addr", "add", "10.0.1.1/24", "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    let m = Manifests::new();
    m.node("node-a", &["10.0.1.1"]);
    let mut yaml = String::new();
    for i in 0..10_000u32 {
        let ip = format!("10.96.{}.{}", 1 + i / 250, 1 + i % 250);
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.244.{a}.{b}], nodeName: node-b}}, {{addresses: [10.245.{a}.{b}], nodeName: node-b}}]\nports: [{{name: http, port: 8080, protocol: TCP}}]\n",
            a = i / 250,
            b = 1 + i % 250
        ));
    }
    m.write("scale", &yaml);
    let (p, status) = crate::support::kproxy::KproxyProcess::run(
        &ns,
        &[
            "--proxy-mode",
            "ipvs",
            "--manifests",
            &m.arg(),
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/15",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            "--once",
        ],
        Duration::from_secs(900),
    );
    let log = p.stderr();
    assert!(status.success(), "{log}");
    let line = log.lines().find(|l| l.contains("sync complete")).unwrap_or_default();
    eprintln!("IPVS-SCALE 10000 services x 2 endpoints: {line}");
    let vs = ns.run("ipvsadm", &["-Ln"]).lines().filter(|l| l.starts_with("TCP")).count();
    eprintln!("IPVS-SCALE virtual servers in the kernel: {vs}");
    assert_eq!(vs, 10_000);
}

