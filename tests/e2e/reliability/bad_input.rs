//! Guarantee 4, bad input: a corpus of invalid and hostile objects sits next to a good Service
//! in kproxy's manifests directory. The good Service keeps working through several syncs, every
//! bad object is reported exactly once (its name and the offending field on one log line, which
//! a forged newline cannot split), memory stays bounded (peak RSS), and nothing panics.
//!
//! A 10,000-endpoint slice is not invalid to kproxy (the API server caps slices at 1,000
//! endpoints, kube-proxy does not check): it is programmed, and counts against the memory bound.
//! The random side of this guarantee is the `cargo fuzz` target (`fuzz/`, run by `fuzz.rs`).

use crate::support::manifests::Port;
use crate::support::objects::{Ep, endpoint_slice};
use crate::support::scenario::{Mode, Scenario, sock};
use crate::support::topology::POD_V4;

const HTTP: Port = Port::tcp("http", 80, 8080);
/// Peak resident memory allowed (VmHWM). Measured 76-84 MB (iptables, nftables) with the 10,000
/// endpoints; the bound leaves room for allocator noise, not for per-sync growth.
const MAX_RSS_KB: u64 = 200 * 1024;

const GOOD: &str = "\
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}
";

const BAD_SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: bad-ip, namespace: default}
spec: {clusterIP: 10.96.0.300, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: wrong-family, namespace: default}
spec: {clusterIP: 10.96.0.11, clusterIPs: [10.96.0.11, 10.96.0.12], ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: port-zero, namespace: default}
spec: {clusterIP: 10.96.0.13, ports: [{name: http, port: 0}]}
---
apiVersion: v1
kind: Service
metadata: {name: port-big, namespace: default}
spec: {clusterIP: 10.96.0.14, ports: [{name: http, port: 65536}]}
---
apiVersion: v1
kind: Service
metadata: {name: dup-ports, namespace: default}
spec: {clusterIP: 10.96.0.15, ports: [{name: a, port: 80, protocol: TCP}, {name: b, port: 80, protocol: TCP}]}
---
apiVersion: v1
kind: Service
metadata: {name: unknown-proto, namespace: default}
spec: {clusterIP: 10.96.0.16, ports: [{name: x, port: 80, protocol: ICMP}]}
---
apiVersion: v1
kind: Service
metadata: {name: a234567890123456789012345678901234567890123456789012345678901234, namespace: default}
spec: {clusterIP: 10.96.0.17, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: "odd name;$(reboot)\"'\nforged log line", namespace: default}
spec: {clusterIP: 10.96.0.18, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: odd-port-name, namespace: default}
spec: {clusterIP: 10.96.0.24, ports: [{name: "p\";x", port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: no-spec, namespace: default}
---
apiVersion: v1
kind: Service
metadata: {name: bad-np, namespace: default}
spec: {type: NodePort, clusterIP: 10.96.0.19, ports: [{name: http, port: 80, nodePort: 99999}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-ranges, namespace: default}
spec: {type: LoadBalancer, clusterIP: 10.96.0.20, loadBalancerSourceRanges: ["10.0.0.0/33", "banana"], externalIPs: ["1.2.3"], ports: [{name: http, port: 80}]}
"#;

const BAD_SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad-eps, namespace: default, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
endpoints: [{addresses: [fd00::5], conditions: {ready: true}}, {addresses: [999.1.1.1]}, {addresses: []}]
ports: [{name: http, port: 0, protocol: TCP}]
";

const WRONG_TYPES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: wrong-types, namespace: default}
spec: {clusterIP: 10.96.0.21, ports: eighty}
---
apiVersion: v1
kind: Service
metadata: {name: wrong-port-type, namespace: default}
spec: {clusterIP: 10.96.0.22, ports: [{name: http, port: [80]}]}
";

const TRUNCATED: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: trunc, namespace: default}\nspec: {clusterIP: 10.96.0.23, ports: [{name: ht";

/// Each bad object: (its name, the field reported).
const EXPECTED: &[(&str, &str)] = &[
    ("bad-ip", "spec.clusterIP"),
    ("wrong-family", "spec.clusterIPs[1]"),
    ("port-zero", "spec.ports[0].port"),
    ("port-big", "spec.ports[0].port"),
    ("dup-ports", "spec.ports[1].port"),
    ("unknown-proto", "spec.ports[0].protocol"),
    (
        "a234567890123456789012345678901234567890123456789012345678901234",
        "metadata.name",
    ),
    ("odd name;$(reboot)", "metadata.name"),
    ("odd-port-name", "spec.ports[0].name"),
    ("no-spec", ": spec:"),
    ("bad-np", "spec.ports[0].nodePort"),
    ("bad-ranges", "spec.loadBalancerSourceRanges[0]"),
    ("bad-ranges", "spec.loadBalancerSourceRanges[1]"),
    ("bad-ranges", "spec.externalIPs[0]"),
    ("bad-eps", "endpoints[0].addresses[0]"),
    ("bad-eps", "endpoints[1].addresses[0]"),
    ("bad-eps", "endpoints[2].addresses"),
    ("bad-eps", "ports[0].port"),
    ("wrong-types", "spec.ports"),
    ("wrong-port-type", "spec.ports[0].port"),
    ("truncated.yaml", "unclosed"),
];

fn good_slice(s: &Scenario, pod: usize) {
    s.apply(&endpoint_slice(
        "good",
        "good-v4",
        &[Ep::ready(POD_V4[pod])],
        &[HTTP],
    ));
}

fn bad_input(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    s.tcp_server(POD_V4[1], 8080, "ep2");
    let m = s.source.manifests();
    m.write("good", GOOD);
    m.write("bad-services", BAD_SERVICES);
    m.write("bad-slice", BAD_SLICE);
    m.write("mistyped", WRONG_TYPES);
    m.write("truncated", TRUNCATED);
    m.write(
        "huge",
        &crate::support::manifests::service("huge", &["10.96.0.99"], &[HTTP]),
    );
    let huge: Vec<Ep> = (0..10_000u32)
        .map(|i| Ep::ready(&format!("10.250.{}.{}", i / 250, i % 250 + 1)))
        .collect();
    s.apply(&endpoint_slice("huge", "huge-v4", &huge, &[HTTP]));
    good_slice(&s, 0);
    s.start_kproxy(&[]);
    let vip = sock("10.96.0.10", 80);
    s.wait_tcp("the good service", vip, "ep1");
    // More syncs: each must not report the bad objects again.
    for (round, (pod, id)) in [(1, "ep2"), (0, "ep1"), (1, "ep2")].into_iter().enumerate() {
        good_slice(&s, pod);
        s.wait_tcp(&format!("the good service, change {round}"), vip, id);
    }
    s.kproxy().assert_running();
    let log = s.kproxy().stderr();
    assert!(!log.contains("panicked"), "kproxy panicked:\n{log}");
    let syncs = log.lines().filter(|l| l.contains("sync complete")).count();
    assert!(syncs >= 3, "only {syncs} syncs:\n{log}");
    let mut missing = Vec::new();
    for (name, field) in EXPECTED {
        let n = log
            .lines()
            .filter(|l| l.contains(name) && l.contains(field))
            .count();
        if n != 1 {
            missing.push(format!("{name} {field}: reported {n} times"));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("forged log line")),
        "a name forged a log line:\n{log}"
    );
    let rules = s.save(false);
    assert!(
        rules.contains("10.96.0.99"),
        "the 10,000-endpoint service is not programmed"
    );
    for absent in [
        "10.96.0.13",
        "10.96.0.14",
        "10.96.0.16",
        "10.96.0.17",
        "10.96.0.18",
    ] {
        assert!(
            !rules.contains(absent),
            "{absent} programmed from a bad object"
        );
    }
    let mem = crate::support::kproxy::memory(s.kproxy().pid());
    let (peak, now) = (mem.peak_kb, mem.rss_kb);
    eprintln!(
        "bad input {mode:?}: {} reports (bad objects and fields), each exactly once over {syncs} syncs; \
         10,000-endpoint slice programmed; peak RSS {} MB, now {} MB",
        EXPECTED.len(),
        peak / 1024,
        now / 1024
    );
    assert!(peak > 0 && peak < MAX_RSS_KB, "peak RSS {peak} kB");
}

#[test]
fn bad_input_iptables() {
    if crate::support::require_root("bad_input_iptables") {
        bad_input(Mode::Iptables);
    }
}

#[test]
fn bad_input_nftables() {
    if crate::support::require_root("bad_input_nftables") {
        bad_input(Mode::Nftables);
    }
}
