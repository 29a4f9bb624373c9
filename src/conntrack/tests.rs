//! Table tests of the stale-flow rules, and of [`reconcile`] against a fake table.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use kproxy_contract::{
    Endpoint, Endpoints, IpFamily, LocalTraffic, NodeSettings, Protocol, ProxyState, ServicePort,
    ServicePortKey, ServicePortName, TrafficPolicy,
};

use super::*;

fn ep(s: &str, local: bool) -> Endpoint {
    let a: SocketAddr = s.parse().unwrap();
    Endpoint {
        ip: a.ip(),
        port: a.port(),
        is_local: local,
    }
}

/// A service port builder with sensible defaults: UDP, Cluster policies, no endpoints.
struct Sp(ServicePort);

impl Sp {
    fn new(name: &str, protocol: Protocol, cluster_ip: &str, port: u16) -> Sp {
        let ip: std::net::IpAddr = cluster_ip.parse().unwrap();
        Sp(ServicePort {
            name: ServicePortName {
                namespace: "default".into(),
                name: name.into(),
                port: "".into(),
                protocol,
            },
            family: IpFamily::of(&ip),
            cluster_ip: Some(ip),
            port,
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            source_ranges: vec![],
            affinity: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            endpoints: Endpoints::default(),
        })
    }

    /// Ready endpoints (`ip:port`, `!` suffix = local): used and serving.
    fn ready(mut self, eps: &[&str]) -> Sp {
        let eps: Vec<Endpoint> = eps
            .iter()
            .map(|e| match e.strip_suffix('!') {
                Some(e) => ep(e, true),
                None => ep(e, false),
            })
            .collect();
        self.0.endpoints.local = eps.iter().copied().filter(|e| e.is_local).collect();
        self.0.endpoints.any = !eps.is_empty();
        self.0.endpoints.serving = eps.clone().into();
        self.0.endpoints.cluster = eps.into();
        self
    }

    /// Terminating but still serving: not used for new flows while ready ones exist.
    fn serving_terminating(mut self, eps: &[&str]) -> Sp {
        let mut serving = self.0.endpoints.serving.to_vec();
        serving.extend(eps.iter().map(|e| ep(e, false)));
        serving.sort();
        self.0.endpoints.serving = serving.into();
        self
    }

    fn node_port(mut self, np: u16) -> Sp {
        self.0.node_port = Some(np);
        self
    }

    fn external_ips(mut self, ips: &[&str]) -> Sp {
        self.0.external_ips = ips.iter().map(|i| i.parse().unwrap()).collect();
        self
    }

    fn lb_ips(mut self, ips: &[&str]) -> Sp {
        self.0.load_balancer_ips = ips.iter().map(|i| i.parse().unwrap()).collect();
        self
    }

    fn etp_local(mut self) -> Sp {
        self.0.external_policy = TrafficPolicy::Local;
        self
    }

    fn itp_local(mut self) -> Sp {
        self.0.internal_policy = TrafficPolicy::Local;
        self
    }
}

fn state(sps: Vec<Sp>) -> ProxyState {
    let node = NodeSettings {
        node_name: "node-a".into(),
        node_ips: vec!["10.0.1.1".parse().unwrap()],
        local_traffic: LocalTraffic::SourceCidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        service_cidrs: vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00:96::/112".parse().unwrap(),
        ],
        masquerade_bit: 14,
        ..NodeSettings::default()
    };
    let services: BTreeMap<ServicePortKey, Arc<ServicePort>> = sps
        .into_iter()
        .map(|Sp(sp)| {
            (
                ServicePortKey {
                    family: sp.family,
                    name: sp.name.clone(),
                },
                Arc::new(sp),
            )
        })
        .collect();
    ProxyState {
        node: Arc::new(node),
        services,
    }
}

/// `proto client -> orig_dst [=> reply_src]`: with `=>` the flow was DNATed to `reply_src`;
/// without, it was not NATed (the reply comes from the original destination).
fn flow(protocol: Protocol, client: &str, dst: &str, endpoint: Option<&str>) -> Flow {
    let client: SocketAddr = client.parse().unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    let reply_src = endpoint.map_or(dst, |e| e.parse().unwrap());
    Flow {
        protocol,
        original: Tuple { src: client, dst },
        reply: Tuple {
            src: reply_src,
            dst: client,
        },
        dnat: endpoint.is_some(),
        snat: false,
        zone: None,
        id: None,
    }
}

fn udp(dst: &str, endpoint: Option<&str>) -> Flow {
    flow(Protocol::Udp, "10.0.1.2:40000", dst, endpoint)
}

const CLIENT: &str = "10.0.1.2:40000";
const POD_CLIENT: &str = "10.244.2.7:40000";

/// The cluster used by most cases.
fn cluster() -> ProxyState {
    state(vec![
        // DNS: two ready endpoints, one terminating-but-serving.
        Sp::new("dns", Protocol::Udp, "10.96.0.10", 53)
            .ready(&["10.244.1.10:5353", "10.244.1.11:5353"])
            .serving_terminating(&["10.244.1.12:5353"]),
        // Scaled to zero.
        Sp::new("zero", Protocol::Udp, "10.96.0.20", 53),
        // NodePort + externalIP + LB IP.
        Sp::new("np", Protocol::Udp, "10.96.0.30", 53)
            .ready(&["10.244.1.13:5353"])
            .node_port(30053)
            .external_ips(&["192.0.2.10"])
            .lb_ips(&["198.51.100.10"]),
        // ETP=Local with only a remote endpoint; ITP=Local likewise.
        Sp::new("etp", Protocol::Udp, "10.96.0.40", 53)
            .ready(&["10.244.1.14:5353"])
            .external_ips(&["192.0.2.40"])
            .etp_local(),
        Sp::new("itp", Protocol::Udp, "10.96.0.50", 53)
            .ready(&["10.244.1.15:5353"])
            .itp_local(),
        // TCP on the DNS address and port.
        Sp::new("dns", Protocol::Tcp, "10.96.0.10", 53).ready(&["10.244.1.10:5353"]),
        // A TCP-only service.
        Sp::new("web", Protocol::Tcp, "10.96.0.60", 80).ready(&["10.244.1.10:8080"]),
        // SCTP.
        Sp::new("sctp", Protocol::Sctp, "10.96.0.70", 9000).ready(&["10.244.1.10:9000"]),
        // IPv6.
        Sp::new("dns6", Protocol::Udp, "fd00:96::10", 53)
            .ready(&["[fd00:244::10]:5353"])
            .node_port(30054),
    ])
}

#[test]
fn stale_flow_table() {
    use StaleReason::*;
    let tcp = |dst: &str, e: Option<&str>| flow(Protocol::Tcp, CLIENT, dst, e);
    let sctp = |dst: &str, e: Option<&str>| flow(Protocol::Sctp, CLIENT, dst, e);
    let snat = |mut f: Flow| {
        f.snat = true;
        f
    };
    let cases: Vec<(&str, Flow, Option<StaleReason>)> = vec![
        // Case 1 of `plan` (docs/semantics.md, rule 20c): DNATed to a frontend.
        (
            "ready endpoint",
            udp("10.96.0.10:53", Some("10.244.1.10:5353")),
            None,
        ),
        (
            "removed endpoint",
            udp("10.96.0.10:53", Some("10.244.1.99:5353")),
            Some(EndpointNotServing),
        ),
        (
            "endpoint ip kept, port changed",
            udp("10.96.0.10:53", Some("10.244.1.10:5354")),
            Some(EndpointNotServing),
        ),
        (
            "terminating but serving",
            udp("10.96.0.10:53", Some("10.244.1.12:5353")),
            None,
        ),
        (
            "scaled to zero (rule 20c)",
            udp("10.96.0.20:53", Some("10.244.1.10:5353")),
            Some(EndpointNotServing),
        ),
        (
            "externalIP, valid",
            udp("192.0.2.10:53", Some("10.244.1.13:5353")),
            None,
        ),
        (
            "externalIP, stale",
            udp("192.0.2.10:53", Some("10.244.1.10:5353")),
            Some(EndpointNotServing),
        ),
        (
            "LB IP, stale",
            udp("198.51.100.10:53", Some("10.244.1.10:5353")),
            Some(EndpointNotServing),
        ),
        (
            "NodePort on a node IP, valid",
            udp("10.0.1.1:30053", Some("10.244.1.13:5353")),
            None,
        ),
        (
            "NodePort on any address, stale",
            udp("172.16.0.1:30053", Some("10.244.1.10:5353")),
            Some(EndpointNotServing),
        ),
        (
            "masqueraded NodePort flow, stale",
            snat(udp("10.0.1.1:30053", Some("10.244.1.10:5353"))),
            Some(EndpointNotServing),
        ),
        (
            "ETP=Local, remote endpoint still serving",
            udp("192.0.2.40:53", Some("10.244.1.14:5353")),
            None,
        ),
        (
            "IPv6 ClusterIP, valid",
            udp("[fd00:96::10]:53", Some("[fd00:244::10]:5353")),
            None,
        ),
        (
            "IPv6 NodePort, stale",
            flow(
                Protocol::Udp,
                "[fd00:1::2]:40000",
                "[fd00:1::1]:30054",
                Some("[fd00:244::11]:5353"),
            ),
            Some(EndpointNotServing),
        ),
        (
            "IPv4 NodePort number on IPv6",
            flow(
                Protocol::Udp,
                "[fd00:1::2]:40000",
                "[fd00:1::1]:30053",
                Some("[fd00:244::11]:5353"),
            ),
            None,
        ),
        (
            "SCTP, stale",
            sctp("10.96.0.70:9000", Some("10.244.1.11:9000")),
            Some(EndpointNotServing),
        ),
        (
            "SCTP, valid",
            sctp("10.96.0.70:9000", Some("10.244.1.10:9000")),
            None,
        ),
        // TCP is never touched.
        (
            "TCP to a removed endpoint",
            tcp("10.96.0.10:53", Some("10.244.1.99:5353")),
            None,
        ),
        (
            "TCP to a deleted service",
            tcp("10.96.0.99:80", Some("10.244.1.99:8080")),
            None,
        ),
        (
            "TCP, not NATed, to a frontend",
            tcp("10.96.0.10:53", None),
            None,
        ),
        // Case 2 of `plan` (rule 20b): DNATed, no frontend now.
        (
            "deleted service in the service CIDR",
            udp("10.96.0.99:53", Some("10.244.1.10:5353")),
            Some(FrontendRemoved),
        ),
        (
            "port removed from a ClusterIP",
            udp("10.96.0.10:54", Some("10.244.1.10:5353")),
            Some(FrontendRemoved),
        ),
        (
            "UDP to a TCP-only frontend",
            udp("10.96.0.60:80", Some("10.244.1.10:8080")),
            Some(FrontendRemoved),
        ),
        (
            "someone else's DNAT",
            udp("192.168.7.7:53", Some("172.17.0.2:53")),
            None,
        ),
        (
            "externalIP not in the previous state",
            udp("192.0.2.99:53", Some("10.244.1.10:5353")),
            None,
        ),
        // Case 3 of `plan` (rule 20a): not NATed, to a frontend that now forwards.
        (
            "ClusterIP now has endpoints",
            udp("10.96.0.10:53", None),
            Some(NowHasEndpoints),
        ),
        (
            "ClusterIP still without endpoints",
            udp("10.96.0.20:53", None),
            None,
        ),
        (
            "NodePort now has endpoints",
            udp("10.0.1.1:30053", None),
            Some(NowHasEndpoints),
        ),
        (
            "externalIP now has endpoints",
            udp("192.0.2.10:53", None),
            Some(NowHasEndpoints),
        ),
        (
            "SNAT-only flow is not ours",
            snat(udp("10.96.0.10:53", None)),
            None,
        ),
        (
            "ETP=Local, external client: dropped",
            udp("192.0.2.40:53", None),
            None,
        ),
        (
            "ETP=Local, pod client: short-circuit",
            flow(Protocol::Udp, POD_CLIENT, "192.0.2.40:53", None),
            Some(NowHasEndpoints),
        ),
        (
            "ITP=Local without local endpoints",
            udp("10.96.0.50:53", None),
            None,
        ),
        (
            "UDP, not NATed, to a TCP frontend",
            udp("10.96.0.60:80", None),
            None,
        ),
        ("unrelated destination", udp("8.8.8.8:53", None), None),
    ];
    let current = cluster();
    let flows: Vec<Flow> = cases.iter().map(|(_, f, _)| f.clone()).collect();
    let stale: std::collections::HashMap<&Flow, StaleReason> =
        stale_flows(&current, None, &flows).into_iter().collect();
    let mut failures = Vec::new();
    for (name, f, want) in &cases {
        let got = stale.get(f).copied();
        if got != *want {
            failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Under an interface detector a conntrack entry cannot say whether its flow came from a pod
/// (it holds no interface), so the ETP=Local short-circuit is not assumed: a non-NATed flow to
/// a frontend without local endpoints is left alone whatever its source.
#[test]
fn interface_detectors_never_assume_a_pod_source() {
    let short_circuited = flow(Protocol::Udp, POD_CLIENT, "192.0.2.40:53", None);
    let now_served = udp("192.0.2.10:53", None);
    for detector in [
        LocalTraffic::Interface("cbr0".into()),
        LocalTraffic::InterfacePrefix("veth".into()),
        LocalTraffic::None,
    ] {
        let mut current = cluster();
        Arc::make_mut(&mut current.node).local_traffic = detector.clone();
        let flows = vec![short_circuited.clone(), now_served.clone()];
        let stale: Vec<(&Flow, StaleReason)> = stale_flows(&current, None, &flows);
        assert_eq!(
            stale,
            vec![(&now_served, StaleReason::NowHasEndpoints)],
            "{detector:?}"
        );
    }
}

#[test]
fn frontends_of_the_previous_state_count_as_removed() {
    let previous = state(vec![
        Sp::new("gone", Protocol::Udp, "10.96.0.99", 53)
            .ready(&["10.244.1.10:5353"])
            .external_ips(&["192.0.2.99"])
            .node_port(30099),
    ]);
    let current = cluster();
    let flows = vec![
        udp("192.0.2.99:53", Some("10.244.1.10:5353")),
        udp("10.0.1.1:30099", Some("10.244.1.10:5353")),
        // Not NATed: nothing to repair, the frontend is gone.
        udp("192.0.2.99:53", None),
    ];
    let reasons: Vec<StaleReason> = stale_flows(&current, Some(&previous), &flows)
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        reasons,
        vec![StaleReason::FrontendRemoved, StaleReason::FrontendRemoved]
    );
    // Without the previous state only the service CIDR identifies removed frontends.
    assert!(stale_flows(&current, None, &flows).is_empty());
}

/// The endpoint is replaced, then the service is scaled to zero and back: each step's state
/// makes exactly the flows that would bypass the new rules stale.
#[test]
fn replace_then_scale_to_zero_and_back() {
    let svc = |eps: &[&str]| {
        state(vec![
            Sp::new("dns", Protocol::Udp, "10.96.0.10", 53).ready(eps),
        ])
    };
    let to_old = udp("10.96.0.10:53", Some("10.244.1.10:5353"));
    let to_new = udp("10.96.0.10:53", Some("10.244.1.11:5353"));
    let unnated = udp("10.96.0.10:53", None);
    let flows = [to_old.clone(), to_new.clone(), unnated.clone()];
    let stale = |s: &ProxyState| -> Vec<Flow> {
        stale_flows(s, None, &flows)
            .into_iter()
            .map(|(f, _)| f.clone())
            .collect()
    };
    assert_eq!(
        stale(&svc(&["10.244.1.10:5353"])),
        vec![to_new.clone(), unnated.clone()]
    );
    assert_eq!(
        stale(&svc(&["10.244.1.11:5353"])),
        vec![to_old.clone(), unnated.clone()]
    );
    assert_eq!(stale(&svc(&[])), vec![to_old, to_new]);
    assert_eq!(
        stale(&svc(&["10.244.1.10:5353", "10.244.1.11:5353"])),
        vec![unnated]
    );
}

/// A fake table: a list of entries; deletion removes by tuple (and id when given).
#[derive(Default)]
struct FakeTable {
    entries: Vec<Flow>,
    dumps: Vec<IpFamily>,
    deleted: Vec<Flow>,
    fail_dump: bool,
    refuse: Option<Tuple>,
}

impl ConntrackTable for FakeTable {
    fn dump(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
        self.dumps.push(family);
        if self.fail_dump {
            return Err(ConntrackError::Io {
                what: "dump",
                source: std::io::Error::from_raw_os_error(1),
            });
        }
        Ok(self
            .entries
            .iter()
            .filter(|f| f.family() == family)
            .cloned()
            .collect())
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<DeleteOutcome, ConntrackError> {
        let mut out = DeleteOutcome::default();
        for f in flows {
            if self.refuse == Some(f.original) {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| "refused".into());
                continue;
            }
            match self
                .entries
                .iter()
                .position(|e| e.original == f.original && e.protocol == f.protocol)
            {
                Some(i) => {
                    self.deleted.push(self.entries.remove(i));
                    out.deleted += 1;
                }
                None => out.missing += 1,
            }
        }
        Ok(out)
    }
}

#[test]
fn reconcile_deletes_only_stale_flows_of_each_family() {
    let stale_v4 = udp("10.96.0.10:53", Some("10.244.1.99:5353"));
    let stale_v6 = flow(Protocol::Udp, "[fd00:1::2]:40000", "[fd00:96::10]:53", None);
    let valid = udp("10.96.0.10:53", Some("10.244.1.10:5353"));
    let tcp = flow(
        Protocol::Tcp,
        CLIENT,
        "10.96.0.10:53",
        Some("10.244.1.99:5353"),
    );
    let mut table = FakeTable {
        entries: vec![
            stale_v4.clone(),
            valid.clone(),
            tcp.clone(),
            stale_v6.clone(),
        ],
        ..FakeTable::default()
    };
    let report = reconcile(&mut table, &IpFamily::ALL, &cluster(), None).unwrap();
    assert_eq!(table.dumps, IpFamily::ALL.to_vec());
    assert_eq!(table.deleted, vec![stale_v4, stale_v6]);
    assert_eq!(table.entries, vec![valid, tcp]);
    assert_eq!(
        (report.examined, report.stale, report.deleted, report.failed),
        (4, 2, 2, 0)
    );
    // Nothing left to do: idempotent.
    let again = reconcile(&mut table, &IpFamily::ALL, &cluster(), None).unwrap();
    assert_eq!((again.stale, again.deleted), (0, 0));
}

#[test]
fn reconcile_counts_refusals_and_propagates_dump_errors() {
    let refused = udp("10.96.0.10:53", Some("10.244.1.98:5353"));
    let other = flow(
        Protocol::Udp,
        "10.0.1.3:40000",
        "10.96.0.10:53",
        Some("10.244.1.99:5353"),
    );
    let mut table = FakeTable {
        entries: vec![refused.clone(), other.clone()],
        refuse: Some(refused.original),
        ..FakeTable::default()
    };
    let report = reconcile(&mut table, &[IpFamily::V4], &cluster(), None).unwrap();
    assert_eq!((report.stale, report.deleted, report.failed), (2, 1, 1));
    assert_eq!(table.deleted, vec![other]);

    let mut broken = FakeTable {
        fail_dump: true,
        ..FakeTable::default()
    };
    assert!(reconcile(&mut broken, &IpFamily::ALL, &cluster(), None).is_err());
    assert!(broken.deleted.is_empty());
}
