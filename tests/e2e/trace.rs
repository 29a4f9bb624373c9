//! `kproxy trace --live` inside the node namespace, checked against real packets: a connect
//! that succeeds is a FORWARD (exit 0) naming the endpoint that answered; a refused or dropped
//! one is a REJECT or DROP (exit 3) with the rule of docs/semantics.md that decided it. Both
//! kernel modes. Then kproxy stops, the desired state changes, and the live trace reports the
//! disagreement.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;

use crate::support::kproxy::{KproxyProcess, wait_until};
use crate::support::manifests::Port;
use crate::support::objects::{Ep, Svc, endpoint_slice};
use crate::support::scenario::{
    DROPPED, Mode, NODE, NODE_ARGS, OTHER_NODE, PROBE, REQ, SYNC, Scenario, Source,
    assert_timed_out, sock,
};
use crate::support::topology::{POD_V4, client_v4};
use crate::support::traffic::{assert_tcp_refused, tcp_request, tcp_request_from};

const HTTP: Port = Port::tcp("http", 80, 8080);
const HTTP_NP: Port = HTTP.with_node_port(30081);

/// Runs `kproxy ... trace --live --output json` in the node namespace; returns the exit status
/// and the JSON report.
fn trace_live(s: &Scenario, src: IpAddr, dst: SocketAddr) -> (i32, Value) {
    let Source::Manifests(m) = &s.source else {
        panic!("a manifests scenario")
    };
    let mode = match s.mode {
        Mode::Iptables => "iptables",
        Mode::Nftables => "nftables",
    };
    let dir = m.arg();
    let (src, dst) = (src.to_string(), dst.to_string());
    let head = ["--manifests", dir.as_str()];
    let tail = [
        "--proxy-mode",
        mode,
        "--iptables-backend",
        "nft",
        "trace",
        "--src",
        &src,
        "--dst",
        &dst,
        "--live",
        "--output",
        "json",
    ];
    let args = [&head[..], NODE_ARGS, &tail[..]].concat();
    let (p, status) = KproxyProcess::run(&s.topo.node, &args, Duration::from_secs(20));
    let code = status.code().unwrap_or(-1);
    let json: Value = serde_json::from_str(&p.stdout()).unwrap_or_else(|e| {
        panic!(
            "trace output is not JSON ({e}): {}\n{}",
            p.stdout(),
            p.stderr()
        )
    });
    (code, json)
}

fn candidates(report: &Value) -> Vec<String> {
    report["verdict"]["candidates"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|x| x["endpoint"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn live_trace_matches_real_packets(mode: Mode) {
    let mut s = Scenario::with_manifests_in(mode);
    s.tcp_server(POD_V4[0], 8080, "ep1");
    let remote = |a: &str| vec![Ep::ready(a).on(OTHER_NODE)];
    s.apply(&Svc::new("web", &["10.96.1.3"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &remote(POD_V4[0]),
        &[HTTP],
    ));
    s.apply(&Svc::new("empty", &["10.96.1.4"], &[HTTP]).json());
    s.apply(
        &Svc::new("lb", &["10.96.1.5"], &[HTTP_NP])
            .load_balancer(&["10.0.8.8"], &["10.0.1.2/31"])
            .json(),
    );
    s.apply(&endpoint_slice(
        "lb",
        "lb-v4",
        &remote(POD_V4[0]),
        &[HTTP_NP],
    ));
    s.start_kproxy(&[]);
    let web = sock("10.96.1.3", 80);
    let ok = wait_until(SYNC, || {
        tcp_request(&s.topo.client, web, PROBE).is_ok_and(|id| id == "ep1")
    });
    assert!(ok, "{web} never answered: {}", s.kproxy().stderr());

    // Forwarded: the connect reaches ep1, the live trace says FORWARD to ep1's address.
    let client = client_v4(0);
    assert_eq!(
        tcp_request_from(&s.topo.client, Some(client), web, REQ).unwrap(),
        "ep1"
    );
    let (code, r) = trace_live(&s, client, web);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["state"], "live");
    assert_eq!(r["verdict"]["kind"], "FORWARD", "{r:#}");
    assert_eq!(candidates(&r), vec![format!("{}:8080", POD_V4[0])], "{r:#}");
    assert!(r["desiredDisagrees"].is_null(), "{r:#}");

    // No endpoints: refused (ICMP port unreachable), REJECT by docs/semantics.md rule 5, exit 3.
    let empty = sock("10.96.1.4", 80);
    assert_tcp_refused(&s.topo.client, Some(client_v4(2)), empty, REQ);
    let (code, r) = trace_live(&s, client_v4(2), empty);
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(r["verdict"]["kind"], "REJECT", "{r:#}");
    assert_eq!(r["verdict"]["rule"], 5, "{r:#}");

    // loadBalancerSourceRanges: inside answers (FORWARD), outside times out (DROP,
    // docs/semantics.md rule 13).
    let lb = sock("10.0.8.8", 80);
    assert_eq!(
        tcp_request_from(&s.topo.client, Some(client_v4(1)), lb, REQ).unwrap(),
        "ep1"
    );
    let (code, r) = trace_live(&s, client_v4(1), lb);
    assert_eq!(
        (code, r["verdict"]["kind"].as_str()),
        (0, Some("FORWARD")),
        "{r:#}"
    );
    let outside = client_v4(5);
    assert_timed_out(
        "lb from outside the ranges",
        &tcp_request_from(&s.topo.client, Some(outside), lb, DROPPED),
    );
    let (code, r) = trace_live(&s, outside, lb);
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(
        (r["verdict"]["kind"].as_str(), r["verdict"]["rule"].as_u64()),
        (Some("DROP"), Some(13)),
        "{r:#}"
    );

    // kproxy stops (its rules stay); the desired state gains an endpoint for `empty`. The live
    // rules still refuse, and the trace says the desired state disagrees.
    s.kproxy = None;
    s.apply(&endpoint_slice(
        "empty",
        "empty-v4",
        &remote(POD_V4[0]),
        &[HTTP],
    ));
    assert_tcp_refused(&s.topo.client, Some(client_v4(3)), empty, REQ);
    let (code, r) = trace_live(&s, client_v4(3), empty);
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(r["desiredDisagrees"]["verdict"]["kind"], "FORWARD", "{r:#}");
}

mod live_trace_matches_real_packets {
    use crate::support::scenario::Mode;

    #[test]
    fn iptables() {
        if crate::support::require_root("live_trace_matches_real_packets::iptables") {
            super::live_trace_matches_real_packets(Mode::Iptables);
        }
    }

    #[test]
    fn nftables() {
        if crate::support::require_root("live_trace_matches_real_packets::nftables") {
            super::live_trace_matches_real_packets(Mode::Nftables);
        }
    }
}

/// The desired state can come from the API too: `kproxy trace --master URL` lists Services,
/// EndpointSlices and the Node once (the daemon's watcher), then traces.
#[test]
fn trace_reads_the_desired_state_from_the_api() {
    if !crate::support::require_root("trace_reads_the_desired_state_from_the_api") {
        return;
    }
    let s = Scenario::with_api();
    let remote = |a: &str| vec![Ep::ready(a).on(OTHER_NODE)];
    s.apply(&Svc::new("web", &["10.96.1.3"], &[HTTP]).json());
    s.apply(&endpoint_slice(
        "web",
        "web-v4",
        &remote(POD_V4[0]),
        &[HTTP],
    ));
    s.apply(&Svc::new("empty", &["10.96.1.4"], &[HTTP]).json());
    let url = s.source.api().url();
    let run = |dst: &str| {
        let args = [
            "--master",
            &url,
            "--hostname-override",
            NODE,
            "--cluster-cidr",
            "10.244.0.0/16",
            "--proxy-mode",
            "nftables",
            "trace",
            "--src",
            "10.244.1.7",
            "--dst",
            dst,
            "--output",
            "json",
        ];
        let (p, status) = KproxyProcess::run(&s.topo.node, &args, Duration::from_secs(40));
        let json: Value = serde_json::from_str(&p.stdout())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", p.stdout(), p.stderr()));
        (status.code().unwrap_or(-1), json)
    };
    let (code, r) = run("10.96.1.3:80");
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["state"], "desired");
    assert_eq!(r["packet"]["from"], "pod");
    assert_eq!(candidates(&r), vec![format!("{}:8080", POD_V4[0])], "{r:#}");
    let (code, r) = run("10.96.1.4:80");
    assert_eq!(
        (code, r["verdict"]["kind"].as_str()),
        (3, Some("REJECT")),
        "{r:#}"
    );
}
