//! Conformance against the fake kernel: layout, incremental plans, graceful termination,
//! ownership and cleanup.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use kproxy_contract::*;
use kproxy_testkit::conformance::OnFakeKernel;
use kproxy_testkit::{ep, many, service, state, sync};

use crate::fake::FakeKernel;
use crate::model::{RsKey, VipHolder, VsKey};
use crate::plan::IpvsOp;
use crate::{IpvsMode, IpvsOptions};

fn mode() -> IpvsMode<FakeKernel> {
    IpvsMode::new(FakeKernel::new(), IpvsOptions::default())
}

fn vs(addr: &str, port: u16) -> VsKey {
    VsKey {
        addr: addr.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
    }
}

fn rs(addr: &str) -> RsKey {
    RsKey {
        addr: addr.parse().unwrap(),
        port: 8080,
    }
}

/// A plan computed from what the mode believes (the last desired), as the sync loop does
/// between full syncs.
fn sync_from(m: &mut IpvsMode<FakeKernel>, believed: &IpvsRules, s: &ProxyState) -> IpvsRules {
    let desired = m.render_once(s);
    let plan = m.plan(believed, &desired);
    m.apply(&plan).unwrap();
    desired
}

use crate::IpvsRules;

#[test]
fn clusterip_nodeport_external_and_lb_frontends_become_virtual_servers() {
    let mut m = mode();
    let mut sp = service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", true)],
    );
    sp.node_port = Some(30080);
    sp.external_ips = vec!["192.0.2.7".parse().unwrap()];
    sp.load_balancer_ips = vec!["198.51.100.9".parse().unwrap()];
    sp.affinity = Some(SessionAffinity {
        timeout: Duration::from_secs(600),
    });
    let s = state(vec![sp]);
    sync(&mut m, &s);
    let k = m.kernel();
    let keys: Vec<String> = k.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        keys,
        [
            "-t 10.0.1.1:30080",
            "-t 10.96.0.10:80",
            "-t 192.0.2.7:80",
            "-t 198.51.100.9:80"
        ],
        "NodePort on the node address (not loopback), one per service address"
    );
    for v in k.services.values() {
        assert_eq!(v.config.scheduler, "rr");
        assert_eq!(v.config.persistence, Some(600));
        assert_eq!(v.dests.len(), 2);
        assert!(v.dests.values().all(|w| *w == 1));
    }
    let vips: Vec<String> = k.vips.iter().map(ToString::to_string).collect();
    assert_eq!(vips, ["10.96.0.10", "192.0.2.7", "198.51.100.9"]);
    assert_eq!(k.holder, Some(VipHolder::Dummy));
    assert_eq!(k.prepared, 1);
    // The nft table: hairpin for the local endpoint only, masquerade sets.
    let script = k.nft_scripts.join("");
    assert!(
        script.contains(
            "add element ip kproxy-ipvs hairpin { 10.244.1.2 . tcp . 8080 . 10.244.1.2 }"
        ),
        "{script}"
    );
    assert!(
        script.contains("masq-cluster { 10.96.0.10 . tcp . 80 }"),
        "{script}"
    );
    assert!(script.contains("10.0.1.1 . tcp . 30080"), "{script}");
    assert!(
        script.contains("ip saddr != 10.244.0.0/16 meta mark set meta mark | 0x00004000"),
        "{script}"
    );
}

impl OnFakeKernel for IpvsMode<FakeKernel> {
    /// One netlink call per virtual or real server: a refused call leaves the earlier ones.
    const TRANSACTIONAL: bool = false;

    fn refuse_next_write(&mut self) {
        self.kernel_mut().fail_next = Some(16);
    }

    /// The kproxy-ipvs nft table is not read back (a full sync rewrites it), nor which service
    /// owns each virtual server (the dry run's grouping).
    fn complete_read_back(live: &mut IpvsRules, rendered: &IpvsRules) {
        live.nft = rendered.nft.clone();
        live.owners = rendered.owners.clone();
    }

    fn holds_nothing_of_ours(&mut self) -> bool {
        let k = self.kernel();
        k.services.is_empty() && k.vips.is_empty() && k.tables.is_empty()
    }
}

/// The checks every mode passes: convergence, a refused apply and its retry, cleanup.
#[test]
fn conformance() {
    kproxy_testkit::conformance::check(mode);
}

#[test]
fn read_back_replans_only_the_netfilter_table() {
    let mut m = mode();
    let s = state(vec![
        service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
        service("b", "10.96.0.11", vec![]),
        service("c", "fd00:96::1", vec![ep("fd00:244::1", false)]),
    ]);
    sync(&mut m, &s);
    let live = m.read_live().unwrap();
    let desired = m.render_once(&s);
    assert_eq!(live.services(), desired.services());
    assert_eq!(live.vips, desired.vips);
    let again = m.plan(&live, &desired);
    assert!(again.ops.is_empty() && again.vips_add.is_empty() && again.vips_del.is_empty());
    // The nft table is not parsed back: a full sync rewrites it.
    assert_eq!(again.nft.len(), 2);
    // Between full syncs (believed == desired) nothing at all.
    assert!(Plan::is_empty(&m.plan(&desired, &desired)));
}

#[test]
fn one_endpoint_change_touches_one_real_server() {
    let mut m = mode();
    let s1 = state(many(100, 3));
    let believed = sync_from(&mut m, &IpvsRules::default(), &s1);
    let mut services = many(100, 3);
    kproxy_testkit::edit_list(&mut services[42].endpoints.cluster, |l| {
        l.push(ep("10.250.0.1", false))
    });
    let s2 = state(services);
    let before = m.kernel().executed.len();
    sync_from(&mut m, &believed, &s2);
    let ops = &m.kernel().executed[before..];
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert!(matches!(ops[0], IpvsOp::AddDest(_, r, 1) if r == rs("10.250.0.1")));
    // No nft change: the endpoint is remote (no hairpin element).
    assert_eq!(m.kernel().nft_scripts.len(), 1);
}

#[test]
fn a_removed_tcp_endpoint_drains_then_goes_when_idle() {
    let mut m = mode();
    let s1 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    )]);
    let b1 = sync_from(&mut m, &IpvsRules::default(), &s1);
    let key = vs("10.96.0.10", 80);
    m.kernel_mut().conns.insert((key, rs("10.244.1.2")), (1, 0));
    let s2 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    let b2 = sync_from(&mut m, &b1, &s2);
    assert_eq!(
        m.kernel().services[&key].dests[&rs("10.244.1.2")],
        0,
        "weight 0 while connections remain"
    );
    assert_eq!(m.draining(), vec![(key, rs("10.244.1.2"))]);
    // A periodic sync with nothing changed still checks the draining server.
    let p = m.plan(&b2, &m.render_once(&s2));
    assert!(
        !Plan::is_empty(&p),
        "a draining server keeps the plan non-empty"
    );
    m.apply(&p).unwrap();
    assert!(
        m.kernel().services[&key]
            .dests
            .contains_key(&rs("10.244.1.2"))
    );
    // Its connection ends: the next sync removes it.
    m.kernel_mut().conns.clear();
    let p = m.plan(&b2, &m.render_once(&s2));
    m.apply(&p).unwrap();
    assert!(
        !m.kernel().services[&key]
            .dests
            .contains_key(&rs("10.244.1.2"))
    );
    assert!(m.draining().is_empty());
    assert!(Plan::is_empty(&m.plan(&b2, &m.render_once(&s2))));
}

#[test]
fn a_draining_endpoint_that_returns_is_reweighted_not_readded() {
    let mut m = mode();
    let s1 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    )]);
    let b1 = sync_from(&mut m, &IpvsRules::default(), &s1);
    let key = vs("10.96.0.10", 80);
    m.kernel_mut().conns.insert((key, rs("10.244.1.2")), (0, 3));
    let s2 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    let b2 = sync_from(&mut m, &b1, &s2);
    sync_from(&mut m, &b2, &s1);
    assert_eq!(m.kernel().services[&key].dests[&rs("10.244.1.2")], 1);
    assert!(m.draining().is_empty());
}

/// A draining real server whose connections never end goes when the bound has passed since it
/// started draining, and not before (the clock is a manual one: fifteen minutes in no time).
#[test]
fn draining_is_bounded() {
    let clock = kproxy_contract::clock::ManualClock::new();
    let mut m = IpvsMode::new(
        FakeKernel::new(),
        IpvsOptions {
            drain_bound: Duration::from_secs(15 * 60),
            ..IpvsOptions::default()
        },
    )
    .with_clock(std::sync::Arc::new(clock.clone()));
    let s1 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    )]);
    let b1 = sync_from(&mut m, &IpvsRules::default(), &s1);
    let key = vs("10.96.0.10", 80);
    m.kernel_mut().conns.insert((key, rs("10.244.1.2")), (5, 5));
    let s2 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    let b2 = sync_from(&mut m, &b1, &s2);
    clock.advance(Duration::from_secs(15 * 60 - 1));
    let b3 = sync_from(&mut m, &b2, &s2);
    assert_eq!(
        m.kernel().services[&key].dests.get(&rs("10.244.1.2")),
        Some(&0),
        "a second before the bound it still drains"
    );
    assert_eq!(m.draining(), vec![(key, rs("10.244.1.2"))]);
    clock.advance(Duration::from_secs(1));
    sync_from(&mut m, &b3, &s2);
    assert!(
        !m.kernel().services[&key]
            .dests
            .contains_key(&rs("10.244.1.2"))
    );
    assert!(m.draining().is_empty());
}

#[test]
fn udp_endpoints_leave_at_once() {
    let mut m = mode();
    let mut a = service(
        "a",
        "10.96.0.53",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    );
    a.name.protocol = Protocol::Udp;
    let b1 = sync_from(&mut m, &IpvsRules::default(), &state(vec![a.clone()]));
    kproxy_testkit::edit_list(&mut a.endpoints.cluster, |l| {
        l.pop();
    });
    sync_from(&mut m, &b1, &state(vec![a]));
    let key = VsKey {
        protocol: Protocol::Udp,
        ..vs("10.96.0.53", 80)
    };
    assert_eq!(m.kernel().services[&key].dests.len(), 1);
    assert!(m.draining().is_empty());
}

#[test]
fn a_removed_service_goes_with_its_address() {
    let mut m = mode();
    let s1 = state(vec![
        service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
        service("b", "10.96.0.11", vec![ep("10.244.1.1", false)]),
    ]);
    let b1 = sync_from(&mut m, &IpvsRules::default(), &s1);
    let s2 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    sync_from(&mut m, &b1, &s2);
    assert!(!m.kernel().services.contains_key(&vs("10.96.0.11", 80)));
    assert!(!m.kernel().vips.contains(&"10.96.0.11".parse().unwrap()));
    let last = m.kernel().nft_scripts.last().unwrap();
    assert!(
        last.contains("delete element ip kproxy-ipvs vips { 10.96.0.11 }"),
        "{last}"
    );
}

#[test]
fn local_policy_without_local_endpoints_is_dropped_and_no_endpoints_left_to_ipvs() {
    let m = mode();
    let mut local = service("l", "10.96.0.20", vec![ep("10.244.1.1", false)]);
    local.internal_policy = TrafficPolicy::Local;
    let none = service("n", "10.96.0.21", vec![]);
    let r = m.render_once(&state(vec![local, none]));
    let t = &r.nft.as_ref().unwrap()[&IpFamily::V4];
    assert!(t.sets["no-local-endpoints"].contains("10.96.0.20 . tcp . 80"));
    // No endpoints at all: the virtual server exists without real servers, and IPVS answers
    // ICMP port unreachable itself.
    assert!(!t.sets["no-local-endpoints"].contains("10.96.0.21 . tcp . 80"));
    assert!(r.services()[&vs("10.96.0.21", 80)].dests.is_empty());
    assert!(r.services()[&vs("10.96.0.20", 80)].dests.is_empty());
}

#[test]
fn external_policy_local_uses_local_endpoints_without_masquerade() {
    let m = mode();
    let mut sp = service(
        "e",
        "10.96.0.30",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", true)],
    );
    sp.node_port = Some(30001);
    sp.external_policy = TrafficPolicy::Local;
    let r = m.render_once(&state(vec![sp]));
    let np = &r.services()[&vs("10.0.1.1", 30001)];
    assert_eq!(
        np.dests.keys().copied().collect::<Vec<_>>(),
        [rs("10.244.1.2")]
    );
    assert_eq!(r.services()[&vs("10.96.0.30", 80)].dests.len(), 2);
    let t = &r.nft.as_ref().unwrap()[&IpFamily::V4];
    assert!(t.sets["masq-external"].is_empty());
}

#[test]
fn source_ranges_allow_listed_sources_per_lb_frontend() {
    let m = mode();
    let mut sp = service("lb", "10.96.0.40", vec![ep("10.244.1.1", false)]);
    sp.load_balancer_ips = vec!["198.51.100.1".parse().unwrap()];
    sp.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let r = m.render_once(&state(vec![sp]));
    let t = &r.nft.as_ref().unwrap()[&IpFamily::V4];
    assert_eq!(
        t.sets["firewall"].iter().collect::<Vec<_>>(),
        ["198.51.100.1 . tcp . 80"]
    );
    assert_eq!(
        t.sets["firewall-allow"].iter().collect::<Vec<_>>(),
        ["198.51.100.1 . tcp . 80 . 203.0.113.0/24"]
    );
}

#[test]
fn foreign_virtual_servers_are_never_touched() {
    let mut m = mode();
    let foreign = vs("203.0.113.5", 443);
    m.kernel_mut().services.insert(
        foreign,
        crate::model::VirtualServer {
            config: crate::model::VsConfig {
                scheduler: "wlc".into(),
                persistence: None,
            },
            dests: Default::default(),
        },
    );
    sync(&mut m, &state(vec![service("a", "10.96.0.10", vec![])]));
    m.cleanup().unwrap();
    assert_eq!(
        m.kernel().services.keys().copied().collect::<Vec<_>>(),
        [foreign]
    );
    assert!(m.kernel().tables.is_empty());
    assert_eq!(m.kernel().holder, None);
}

#[test]
fn scheduler_change_updates_services_in_place() {
    let mut m = mode();
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    sync(&mut m, &s);
    let mut m2 = IpvsMode::new(
        m.kernel().clone(),
        IpvsOptions {
            scheduler: "sh".into(),
            ..IpvsOptions::default()
        },
    );
    let p = sync(&mut m2, &s);
    assert_eq!(p.ops.len(), 1);
    assert!(matches!(&p.ops[0], IpvsOp::UpdateService(_, c) if c.scheduler == "sh"));
    assert!(
        p.to_string().contains("ipvsadm -E -t 10.96.0.10:80 -s sh"),
        "{p}"
    );
}

#[test]
fn dry_run_prints_ipvsadm_lines_grouped_by_service() {
    let m = mode();
    let mut sp = service("web", "10.96.0.10", vec![ep("10.244.1.1", false)]);
    sp.affinity = Some(SessionAffinity {
        timeout: Duration::from_secs(10800),
    });
    let desired = m.render_once(&state(vec![sp]));
    let text = m.plan(&IpvsRules::default(), &desired).to_string();
    assert!(
        text.contains("# ns/web:p\nipvsadm -A -t 10.96.0.10:80 -s rr -p 10800\n"),
        "{text}"
    );
    assert!(
        text.contains("ipvsadm -a -t 10.96.0.10:80 -r 10.244.1.1:8080 -m -w 1\n"),
        "{text}"
    );
    assert!(
        text.contains("ip address add 10.96.0.10/32 (kproxy-ipvs0)"),
        "{text}"
    );
    assert!(
        text.contains("# nft: rewrite table ip kproxy-ipvs"),
        "{text}"
    );
}

#[test]
fn no_ipvs_is_an_actionable_error() {
    let mut m = IpvsMode::new(
        FakeKernel {
            no_ipvs: true,
            ..FakeKernel::new()
        },
        IpvsOptions::default(),
    );
    let err = m.read_live().unwrap_err();
    assert!(err.to_string().contains("IPVS (CONFIG_IP_VS)"), "{err}");
    assert!(
        err.to_string()
            .contains("--proxy-mode nftables or iptables"),
        "{err}"
    );
    // Cleanup still removes the rest.
    m.cleanup().unwrap();
}

#[test]
fn without_dummy_interfaces_addresses_become_lo_routes() {
    let mut m = IpvsMode::new(
        FakeKernel {
            no_dummy: true,
            ..FakeKernel::new()
        },
        IpvsOptions::default(),
    );
    sync(&mut m, &state(vec![service("a", "10.96.0.10", vec![])]));
    assert_eq!(m.kernel().holder, Some(VipHolder::LoRoutes));
    assert!(m.kernel().vips.contains(&"10.96.0.10".parse().unwrap()));
}

#[test]
fn ten_thousand_services_plan_in_batches_without_growth_of_tables() {
    let m = mode();
    let r = m.render_once(&state(many(10_000, 2)));
    assert_eq!(r.services().len(), 10_000);
    let t = &r.nft.as_ref().unwrap()[&IpFamily::V4];
    assert_eq!(t.sets["frontends"].len(), 10_000);
    let small = m.render_once(&state(many(10, 2)));
    assert_eq!(
        small.nft.as_ref().unwrap()[&IpFamily::V4].head,
        t.head,
        "chains do not depend on the services"
    );
}

/// The `mark-for-masquerade` rule of the ClusterIP set in `family`'s table, for a node with
/// `local_traffic`, if there is one.
fn masq_cluster_rule(local_traffic: LocalTraffic, family: IpFamily) -> Option<String> {
    let mut s = state(vec![
        service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
        service("a", "fd00:96::10", vec![ep("fd00:244::11", false)]),
    ]);
    std::sync::Arc::make_mut(&mut s.node).local_traffic = local_traffic;
    let rules = mode().render_once(&s);
    let head = &rules.nft.unwrap()[&family].head;
    head.lines()
        .map(str::trim)
        .find(|l| l.contains("@masq-cluster"))
        .map(str::to_string)
}

/// The IPVS mode's only use of the local-traffic detector: ClusterIP traffic that is not from a
/// local pod is marked for masquerade, in the shared nft spelling.
#[test]
fn local_traffic_detectors_render_upstreams_matches() {
    let cidrs = LocalTraffic::SourceCidrs(vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00:244::/56".parse().unwrap(),
    ]);
    let mark = "meta mark set meta mark | 0x00004000";
    for (detector, v4, v6) in [
        (
            cidrs,
            "ip saddr != 10.244.0.0/16",
            "ip6 saddr != fd00:244::/56",
        ),
        (
            LocalTraffic::Interface("cbr0".into()),
            "iifname != \"cbr0\"",
            "iifname != \"cbr0\"",
        ),
        (
            LocalTraffic::InterfacePrefix("veth".into()),
            "iifname != \"veth*\"",
            "iifname != \"veth*\"",
        ),
    ] {
        for (family, outside, a) in [(IpFamily::V4, v4, "ip"), (IpFamily::V6, v6, "ip6")] {
            assert_eq!(
                masq_cluster_rule(detector.clone(), family),
                Some(format!(
                    "{a} daddr . meta l4proto . th dport @masq-cluster {outside} {mark}"
                )),
                "{detector:?} {family}"
            );
        }
    }
    for (detector, family) in [
        (LocalTraffic::None, IpFamily::V4),
        (
            LocalTraffic::SourceCidrs(vec!["10.244.0.0/16".parse().unwrap()]),
            IpFamily::V6,
        ),
        (LocalTraffic::InterfacePrefix("veth\"".into()), IpFamily::V4),
    ] {
        assert_eq!(
            masq_cluster_rule(detector.clone(), family),
            None,
            "{detector:?}"
        );
    }
}

fn foreign_vs() -> crate::model::VirtualServer {
    crate::model::VirtualServer {
        config: crate::model::VsConfig {
            scheduler: "wlc".into(),
            persistence: None,
        },
        dests: [(rs("192.168.50.7"), 1)].into_iter().collect(),
    }
}

fn excluding(cidrs: &[&str]) -> IpvsMode<FakeKernel> {
    IpvsMode::new(
        FakeKernel::new(),
        IpvsOptions {
            exclude_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            ..IpvsOptions::default()
        },
    )
}

/// kproxy reads back (and so may delete) only virtual servers on its service addresses and on
/// the node's own addresses. On a node address a foreign one is deleted like a stale NodePort
/// unless `--ipvs-exclude-cidrs` covers it; one elsewhere is never seen at all.
#[test]
fn exclude_cidrs_protect_foreign_virtual_servers_on_node_addresses() {
    let mut m = excluding(&["10.0.1.0/28", "fd00:1::/64"]);
    m.kernel_mut()
        .local
        .push(("eth1".into(), "10.0.2.1".parse().unwrap()));
    let inside = vs("10.0.1.1", 8443);
    let outside = vs("10.0.2.1", 8443);
    let elsewhere = vs("203.0.113.5", 443);
    for k in [inside, outside, elsewhere] {
        m.kernel_mut().services.insert(k, foreign_vs());
    }
    let mut sp = service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]);
    sp.node_port = Some(30080);
    let s = state(vec![sp]);

    // The dry run says what it keeps, and plans no deletion of it.
    let live = m.read_live().unwrap();
    assert!(live.services().contains_key(&inside) && live.services().contains_key(&outside));
    assert!(!live.services().contains_key(&elsewhere), "never kproxy's");
    let p = m.plan(&live, &m.render_once(&s));
    assert_eq!(p.kept, [inside]);
    assert!(p.ops.contains(&IpvsOp::DelService(outside)));
    assert!(!p.ops.contains(&IpvsOp::DelService(inside)));
    let text = p.to_string();
    assert!(
        text.contains("# kept: inside --ipvs-exclude-cidrs")
            && text.contains("# (not run) ipvsadm -D -t 10.0.1.1:8443\n"),
        "{text}"
    );

    // Full syncs (read-back each time): the protected one survives with its real servers,
    // the unprotected one on a node address goes as before, the far one is untouched.
    sync(&mut m, &s);
    sync(&mut m, &s);
    let k = m.kernel();
    assert_eq!(k.services.get(&inside), Some(&foreign_vs()));
    assert!(!k.services.contains_key(&outside));
    assert_eq!(k.services.get(&elsewhere), Some(&foreign_vs()));
    // kproxy's own virtual servers are there, the NodePort on the excluded address included
    // (the exclusion only stops deletions).
    assert!(k.services.contains_key(&vs("10.96.0.10", 80)));
    assert!(k.services.contains_key(&vs("10.0.1.1", 30080)));
    assert!(!k.executed.contains(&IpvsOp::DelService(inside)));

    // --cleanup keeps its own scope and does not consult the exclusions (upstream's cleanup
    // ignores them too): the foreign one on the node address goes, the far one stays.
    m.cleanup().unwrap();
    assert_eq!(
        m.kernel().services.keys().copied().collect::<Vec<_>>(),
        [elsewhere]
    );
}

/// As upstream: an excluded address is protected whoever made the virtual server, so one of
/// kproxy's own there stays when its service goes (its address is still unbound).
#[test]
fn exclude_cidrs_also_keep_kproxys_own_former_virtual_servers() {
    let mut m = excluding(&["10.96.0.11/32"]);
    let s1 = state(vec![
        service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
        service("b", "10.96.0.11", vec![ep("10.244.1.1", false)]),
    ]);
    let b1 = sync_from(&mut m, &IpvsRules::default(), &s1);
    let s2 = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    let desired = m.render_once(&s2);
    let p = m.plan(&b1, &desired);
    assert_eq!(p.kept, [vs("10.96.0.11", 80)]);
    assert_eq!(
        p.vips_del,
        ["10.96.0.11".parse::<std::net::IpAddr>().unwrap()]
    );
    m.apply(&p).unwrap();
    assert!(m.kernel().services.contains_key(&vs("10.96.0.11", 80)));
    // Kept is not a change: a plan with nothing else to do is empty and removes nothing.
    let mut q = crate::IpvsPlan::default();
    q.kept.push(vs("10.96.0.11", 80));
    assert!(Plan::is_empty(&q));
    assert_eq!(q.stats().removed, 0);
}

fn knobs(strict_arp: bool, timeouts: crate::IpvsTimeouts) -> IpvsMode<FakeKernel> {
    IpvsMode::new(
        FakeKernel::new(),
        IpvsOptions {
            strict_arp,
            timeouts,
            ..IpvsOptions::default()
        },
    )
}

const ARP_IGNORE: &str = "net/ipv4/conf/all/arp_ignore";
const ARP_ANNOUNCE: &str = "net/ipv4/conf/all/arp_announce";

#[test]
fn strict_arp_sets_arp_ignore_and_announce_once_at_start() {
    let mut m = knobs(true, crate::IpvsTimeouts::default());
    // arp_announce already right: written only where different.
    m.kernel_mut().sysctls.insert(ARP_ANNOUNCE.into(), 2);
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    sync(&mut m, &s);
    assert_eq!(m.kernel().sysctls[ARP_IGNORE], 1);
    assert_eq!(m.kernel().sysctls[ARP_ANNOUNCE], 2);
    assert_eq!(m.kernel().sysctl_writes, [(ARP_IGNORE.to_string(), 1)]);
    // Start-up only: later syncs do not look again.
    m.kernel_mut().sysctls.insert(ARP_IGNORE.into(), 0);
    sync(&mut m, &state(vec![]));
    assert_eq!(m.kernel().sysctl_writes.len(), 1);
    // No timeout flag: no SET_CONFIG at all.
    assert!(m.kernel().set_configs.is_empty());
}

#[test]
fn without_strict_arp_the_arp_sysctls_are_not_touched() {
    let mut m = knobs(false, crate::IpvsTimeouts::default());
    m.kernel_mut().sysctls.insert(ARP_ANNOUNCE.into(), 1);
    sync(&mut m, &state(vec![service("a", "10.96.0.10", vec![])]));
    assert!(m.kernel().sysctl_writes.is_empty());
    assert_eq!(m.kernel().sysctls[ARP_ANNOUNCE], 1);
}

#[test]
fn a_failed_strict_arp_write_is_a_warning_and_the_sync_goes_on() {
    let mut m = knobs(true, crate::IpvsTimeouts::default());
    m.kernel_mut().sysctls_read_only = true;
    sync(&mut m, &state(vec![service("a", "10.96.0.10", vec![])]));
    assert!(m.kernel().services.contains_key(&vs("10.96.0.10", 80)));
    assert_eq!(m.kernel().sysctls[ARP_IGNORE], 0);
}

#[test]
fn timeouts_are_set_once_at_start_and_zero_leaves_the_kernels() {
    let wanted = crate::IpvsTimeouts::from_durations(
        Duration::from_secs(901),
        Duration::ZERO,
        Duration::from_millis(31_900),
    );
    assert_eq!((wanted.tcp, wanted.tcp_fin, wanted.udp), (901, 0, 31));
    let mut m = knobs(false, wanted);
    let s = state(vec![service("a", "10.96.0.10", vec![])]);
    sync(&mut m, &s);
    sync(&mut m, &s);
    let k = m.kernel();
    assert_eq!(k.set_configs, [wanted], "once, with all three");
    assert_eq!(
        k.timeouts,
        crate::IpvsTimeouts {
            tcp: 901,
            tcp_fin: 120,
            udp: 31
        }
    );
    assert!(k.sysctl_writes.is_empty(), "strict ARP is off");
}

#[test]
fn a_refused_timeout_change_is_a_warning_and_the_sync_goes_on() {
    let mut m = knobs(
        false,
        crate::IpvsTimeouts {
            tcp: u32::MAX,
            tcp_fin: 0,
            udp: 0,
        },
    );
    m.kernel_mut().refuse_set_config = Some(22);
    sync(&mut m, &state(vec![service("a", "10.96.0.10", vec![])]));
    assert_eq!(m.kernel().set_configs.len(), 1);
    assert_eq!(m.kernel().timeouts.tcp, 900);
    assert!(m.kernel().services.contains_key(&vs("10.96.0.10", 80)));
}

/// A dry run reads and plans but never applies, so none of the start-up settings happen.
#[test]
fn a_dry_run_sets_no_sysctl_and_no_timeout() {
    let m = &mut knobs(
        true,
        crate::IpvsTimeouts {
            tcp: 901,
            tcp_fin: 0,
            udp: 31,
        },
    );
    let live = m.read_live().unwrap();
    let desired = m.render_once(&state(vec![service("a", "10.96.0.10", vec![])]));
    let _ = m.plan(&live, &desired).to_string();
    m.cleanup().unwrap();
    assert!(m.kernel().sysctl_writes.is_empty());
    assert!(m.kernel().set_configs.is_empty());
    assert_eq!(m.kernel().prepared, 0);
}

/// The cached render and the diff over shared maps are optimisations only: through random
/// changes (service ports added, changed, removed, frontends claimed by two service ports,
/// NodePort addresses coming and going), the cached render equals a render from scratch, its
/// counts equal a walk over its servers, and the plan from the last render equals the plan
/// between two renders from scratch, which share nothing.
mod incremental {
    use std::collections::{BTreeSet, HashSet};
    use std::net::IpAddr;

    use kproxy_contract::{IpFamily, Plan as _, ProxyState};
    use kproxy_testkit::strategies::{mix, two_states};
    use proptest::prelude::*;

    use crate::model::IpvsRules;
    use crate::plan;
    use crate::render::{RenderCache, RenderInput, render, render_cached};

    /// The node's addresses, then (from the third step) one more.
    fn locals(s: &ProxyState, step: usize) -> Vec<IpAddr> {
        let mut out = s.node.node_ips.clone();
        if step >= 2 {
            out.push(if out.first().is_some_and(IpAddr::is_ipv6) {
                "fd00:1::99".parse().unwrap()
            } else {
                "10.1.0.99".parse().unwrap()
            });
        }
        out
    }

    fn walk(r: &IpvsRules, family: IpFamily) -> (usize, usize) {
        let servers: Vec<_> = r
            .services()
            .iter()
            .filter(|(k, _)| k.family() == family)
            .collect();
        (
            servers.len(),
            servers.iter().map(|(_, v)| v.dests.len()).sum(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn cached_render_and_shared_diff_equal_from_scratch((a, b, pick) in two_states()) {
            let c = mix(&a, &b, &pick);
            let families = IpFamily::ALL;
            let mut cache = RenderCache::default();
            let mut prev: Option<(IpvsRules, IpvsRules)> = None;
            for (i, s) in [&a, &c, &b, &a, &c, &a].into_iter().enumerate() {
                let local = locals(s, i);
                let input = RenderInput { scheduler: "rr", local_addresses: &local, families: &families };
                let cached = render_cached(s, &input, &mut cache);
                let fresh = render(s, &input);
                prop_assert_eq!(&cached, &fresh, "step {}", i);
                for family in families {
                    let count = cached.count(family);
                    prop_assert_eq!((count.virtual_servers, count.real_servers), walk(&cached, family));
                }
                if let Some((prev_cached, prev_fresh)) = prev {
                    let none = BTreeSet::new();
                    let quick = plan::plan(&prev_cached, &cached, &none, false, &[]);
                    let slow = plan::plan(&prev_fresh, &fresh, &none, false, &[]);
                    prop_assert_eq!(quick.to_string(), slow.to_string(), "step {}", i);
                    prop_assert_eq!(quick.is_empty(), slow.is_empty());
                }
                prev = Some((cached, fresh));
            }
        }
    }

    /// Nothing of one render is lost by the next: a frontend two service ports claim moves to
    /// the other when its holder goes, with the holder's elements gone and the other's in.
    #[test]
    fn a_frontend_moves_to_the_next_claimant() {
        let mut a = kproxy_testkit::service(
            "a",
            "10.96.0.10",
            vec![kproxy_testkit::ep("10.244.1.1", false)],
        );
        a.external_ips = vec!["192.0.2.7".parse().unwrap()];
        let mut b = kproxy_testkit::service(
            "b",
            "10.96.0.11",
            vec![kproxy_testkit::ep("10.244.1.2", true)],
        );
        b.external_ips = vec!["192.0.2.7".parse().unwrap()];
        b.external_policy = kproxy_contract::TrafficPolicy::Local;
        let both = kproxy_testkit::state(vec![a, b.clone()]);
        let only_b = kproxy_testkit::state(vec![b]);
        let families = [IpFamily::V4];
        let input = RenderInput {
            scheduler: "rr",
            local_addresses: &[],
            families: &families,
        };
        let mut cache = RenderCache::default();
        let first = render_cached(&both, &input, &mut cache);
        let second = render_cached(&only_b, &input, &mut cache);
        assert_eq!(second, render(&only_b, &input));
        let key = crate::model::VsKey {
            addr: "192.0.2.7".parse().unwrap(),
            protocol: kproxy_contract::Protocol::Tcp,
            port: 80,
        };
        assert_eq!(&*first.owners[&key], "ns/a:p");
        assert_eq!(&*second.owners[&key], "ns/b:p");
        let none = BTreeSet::new();
        let text = plan::plan(&first, &second, &none, false, &[]).to_string();
        // b's (local) endpoint replaces a's at the shared frontend; b's Local policy drops
        // its masquerade mark.
        assert!(
            text.contains("-a -t 192.0.2.7:80 -r 10.244.1.2:8080"),
            "{text}"
        );
        assert!(
            text.contains("-e -t 192.0.2.7:80 -r 10.244.1.1:8080 -m -w 0"),
            "{text}"
        );
        assert!(
            text.contains("delete element ip kproxy-ipvs masq-external { 192.0.2.7 . tcp . 80 }"),
            "{text}"
        );
        let vips: HashSet<_> = second.vips.iter().map(ToString::to_string).collect();
        assert!(
            vips.contains("192.0.2.7") && !vips.contains("10.96.0.10"),
            "{vips:?}"
        );
    }
}

/// After one endpoint change the next render shares all but the changed virtual server with
/// the one before (so copying and diffing them is O(changes)), and the plan is that change.
#[test]
fn one_endpoint_change_shares_everything_else() {
    let m = mode();
    let services = many(2_000, 2);
    let before = state(services.clone());
    let mut changed = services[1_000].clone();
    std::sync::Arc::make_mut(&mut changed.endpoints.cluster)[0] = ep("10.250.0.1", false);
    let mut after = before.clone();
    after.services.insert(
        ServicePortKey {
            family: changed.family,
            name: changed.name.clone(),
        },
        std::sync::Arc::new(changed),
    );
    let facts = m.observe();
    let mut memo = Default::default();
    let a = m.render(&before, &facts, &mut memo);
    let b = m.render(&after, &facts, &mut memo);
    let differing = a.services().diff(b.services()).count();
    assert_eq!(differing, 1);
    let plan = m.plan(&a, &b);
    let text = plan.to_string();
    assert_eq!(plan.ops.len(), 2, "{text}");
    assert!(
        text.contains("-a -t 10.96.3.233:80 -r 10.250.0.1:8080"),
        "{text}"
    );
    assert_eq!(m.count_objects(&b), m.count_objects(&a));
}
