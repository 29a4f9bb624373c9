//! Against the fake kernel: the checks every mode passes (`kproxy_testkit::conformance`), and
//! this mode's own: the layout, its scaling properties, the script's order.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use kproxy_contract::*;
use kproxy_testkit::conformance::OnFakeKernel;
use kproxy_testkit::{ep, many, service, state, sync};

use crate::fake::FakeNft;
use crate::{NftablesMode, plan, steps};

fn mode() -> NftablesMode<FakeNft> {
    NftablesMode::new(FakeNft::new(), vec![IpFamily::V4, IpFamily::V6])
}

/// Elements one family's plan adds and deletes.
fn element_changes(fp: &crate::plan::FamilyPlan) -> usize {
    fp.add_elements
        .values()
        .chain(fp.delete_elements.values())
        .map(crate::plan::ElementList::len)
        .sum()
}

#[test]
fn sets_and_chains_do_not_grow_with_services() {
    let m = mode();
    let small = m.render_once(&state(many(10, 3)));
    let large = m.render_once(&state(many(2_000, 3)));
    let t_small = &small.families[&IpFamily::V4];
    let t_large = &large.families[&IpFamily::V4];
    assert_eq!(t_small.sets.len(), t_large.sets.len());
    assert_eq!(t_small.chains.len(), t_large.chains.len());
    assert_eq!(t_large.sets["endpoints-tcp"].elements.len(), 6_000);
}

#[test]
fn one_endpoint_change_is_a_handful_of_element_updates() {
    let mut m = mode();
    let mut services = many(1_000, 3);
    sync(&mut m, &state(services.clone()));
    std::sync::Arc::make_mut(&mut services[500].endpoints.cluster)[1] = ep("10.250.0.1", false);
    let p = sync(&mut m, &state(services.clone()));
    let fp = &p.families[&IpFamily::V4];
    assert!(fp.write_chains.is_empty() && fp.add_chains.is_empty() && fp.add_sets.is_empty());
    let changed = element_changes(fp);
    // The endpoint element, replaced (remote endpoints need no hairpin element).
    assert_eq!(changed, 2, "{}", p);
    // A fourth endpoint moves the service to pick-4.
    kproxy_testkit::edit_list(&mut services[500].endpoints.cluster, |l| {
        l.push(ep("10.250.0.2", false))
    });
    let p = sync(&mut m, &state(services));
    let text = p.to_string();
    assert!(text.contains("goto pick-4"), "{text}");
}

#[test]
fn no_endpoints_reject_and_local_policy_drop() {
    let mut local_only = service("l", "10.96.0.12", vec![ep("10.244.1.9", false)]);
    local_only.internal_policy = TrafficPolicy::Local;
    let r = mode().render_once(&state(vec![service("b", "10.96.0.11", vec![]), local_only]));
    let t = &r.families[&IpFamily::V4];
    let no = &t.sets["no-endpoint-services"].elements;
    assert_eq!(
        no.get("10.96.0.11 . tcp . 80"),
        Some(&Some("goto reject-chain".into()))
    );
    assert_eq!(no.get("10.96.0.12 . tcp . 80"), Some(&Some("drop".into())));
    assert!(t.sets["service-ips"].elements.is_empty());
}

#[test]
fn etp_local_short_circuits_pods_and_node_to_cluster_endpoints() {
    let mut s = service(
        "e",
        "10.96.0.13",
        vec![ep("10.244.1.1", true), ep("10.244.2.1", false)],
    );
    s.node_port = Some(30080);
    s.external_policy = TrafficPolicy::Local;
    let r = mode().render_once(&state(vec![s]));
    let t = &r.families[&IpFamily::V4];
    assert_eq!(
        t.sets["service-nodeports"].elements.get("tcp . 30080"),
        Some(&Some("goto nodeport-pick-1".into()))
    );
    assert_eq!(
        t.sets["nodeports-short-circuit"]
            .elements
            .get("tcp . 30080"),
        Some(&Some("goto nodeport-pick-sc-2".into()))
    );
    assert!(
        t.sets["nodeport-masq-local-source"]
            .elements
            .contains_key("tcp . 30080")
    );
    assert!(!t.sets["nodeport-masq"].elements.contains_key("tcp . 30080"));
    assert_eq!(t.sets["nodeport-endpoints-tcp"].elements.len(), 3);
}

/// A dual-stack ETP=Local NodePort service on a node with `local_traffic`.
fn dual_stack_with(local_traffic: LocalTraffic) -> ProxyState {
    let mut sps = Vec::new();
    for (cip, ep_ip) in [
        ("10.96.0.13", "10.244.2.1"),
        ("fd00:96::13", "fd00:244::21"),
    ] {
        let mut sp = service("e", cip, vec![ep(ep_ip, false)]);
        sp.node_port = Some(30080);
        sp.external_policy = TrafficPolicy::Local;
        sps.push(sp);
    }
    let mut s = state(sps);
    std::sync::Arc::make_mut(&mut s.node).local_traffic = local_traffic;
    s
}

/// The rules of `chain` in `family` that mention `needle`.
fn rules_with(
    r: &crate::model::NftRuleset,
    family: IpFamily,
    chain: &str,
    needle: &str,
) -> Vec<String> {
    r.families[&family].chains[chain]
        .rules
        .iter()
        .map(|r| r.text.clone())
        .filter(|t| t.contains(needle))
        .collect()
}

/// Each local-traffic detector in upstream's nft spelling: "not from a pod" on the ClusterIP
/// masquerade rule, "from a pod" on the ETP=Local short-circuits (service IPs and NodePorts),
/// in both families; none of them without a usable detector.
#[test]
fn local_traffic_detectors_render_upstreams_matches() {
    let cidrs = LocalTraffic::SourceCidrs(vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00:244::/56".parse().unwrap(),
    ]);
    let cases = [
        (
            cidrs,
            ["ip saddr != 10.244.0.0/16", "ip saddr 10.244.0.0/16"],
            ["ip6 saddr != fd00:244::/56", "ip6 saddr fd00:244::/56"],
        ),
        (
            LocalTraffic::Interface("cbr0".into()),
            ["iifname != \"cbr0\"", "iifname \"cbr0\""],
            ["iifname != \"cbr0\"", "iifname \"cbr0\""],
        ),
        (
            LocalTraffic::InterfacePrefix("veth".into()),
            ["iifname != \"veth*\"", "iifname \"veth*\""],
            ["iifname != \"veth*\"", "iifname \"veth*\""],
        ),
    ];
    for (detector, v4, v6) in cases {
        let r = mode().render_once(&dual_stack_with(detector.clone()));
        for (family, [outside, pod]) in [(IpFamily::V4, v4), (IpFamily::V6, v6)] {
            let a = if family == IpFamily::V4 { "ip" } else { "ip6" };
            let fe = format!("{a} daddr . meta l4proto . th dport");
            assert_eq!(
                rules_with(&r, family, "services", "@masq-internal"),
                vec![format!(
                    "{outside} {fe} @masq-internal jump mark-for-masquerade"
                )],
                "{detector:?} {family}"
            );
            assert_eq!(
                rules_with(&r, family, "services", "@service-ips-short-circuit"),
                vec![
                    format!("{pod} {fe} vmap @service-ips-short-circuit"),
                    format!("fib saddr type local {fe} vmap @service-ips-short-circuit"),
                ],
                "{detector:?} {family}"
            );
            assert_eq!(
                rules_with(&r, family, "nodeports", "@nodeports-short-circuit")[0],
                format!("{pod} meta l4proto . th dport vmap @nodeports-short-circuit"),
                "{detector:?} {family}"
            );
        }
    }
    // No detector, an IPv4-only CIDR in the IPv6 table, an unusable name: no rule asks.
    for (detector, family) in [
        (LocalTraffic::None, IpFamily::V4),
        (
            LocalTraffic::SourceCidrs(vec!["10.244.0.0/16".parse().unwrap()]),
            IpFamily::V6,
        ),
        (
            LocalTraffic::Interface("cbr0\" accept".into()),
            IpFamily::V4,
        ),
    ] {
        let r = mode().render_once(&dual_stack_with(detector.clone()));
        assert!(
            rules_with(&r, family, "services", "@masq-internal").is_empty(),
            "{detector:?}"
        );
        for (chain, map) in [
            ("services", "@service-ips-short-circuit"),
            ("nodeports", "@nodeports-short-circuit"),
        ] {
            let sc = rules_with(&r, family, chain, map);
            assert_eq!(sc.len(), 1, "{detector:?}: {sc:?}");
            assert!(
                sc[0].starts_with("fib saddr type local"),
                "{detector:?}: {sc:?}"
            );
        }
    }
}

#[test]
fn affinity_uses_per_endpoint_timeout_sets() {
    let mut s = service(
        "a",
        "10.96.0.14",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    );
    s.affinity = Some(SessionAffinity {
        timeout: Duration::from_secs(600),
    });
    let mut m = mode();
    let st = state(vec![s]);
    sync(&mut m, &st);
    let t = m.kernel().table(IpFamily::V4).unwrap();
    let aff: Vec<_> = t
        .sets
        .keys()
        .filter(|k| k.starts_with("affinity-"))
        .collect();
    assert_eq!(aff.len(), 2);
    assert!(t.sets[aff[0].as_str()].signature.contains("timeout 600"));
    // Removing the service removes its chains and sets too.
    sync(&mut m, &state(vec![]));
    let t = m.kernel().table(IpFamily::V4).unwrap();
    assert!(!t.sets.keys().any(|k| k.starts_with("affinity-")));
    assert!(
        !t.chains
            .keys()
            .any(|k| k.starts_with("affinity-") || k.starts_with("endpoint-"))
    );
}

#[test]
fn firewall_elements_for_source_ranges() {
    let mut s = service("lb", "10.96.0.15", vec![ep("10.244.1.1", false)]);
    s.load_balancer_ips = vec!["198.51.100.7".parse().unwrap()];
    s.source_ranges = vec![
        "203.0.113.0/24".parse().unwrap(),
        "192.168.0.0/24".parse().unwrap(),
    ];
    let r = mode().render_once(&state(vec![s]));
    let t = &r.families[&IpFamily::V4];
    let allow = &t.sets["firewall-allow"].elements;
    assert!(allow.contains_key("198.51.100.7 . tcp . 80 . 203.0.113.0/24"));
    // The node (192.168.0.2) is inside a range: the LB IP itself is an allowed source.
    assert!(allow.contains_key("198.51.100.7 . tcp . 80 . 198.51.100.7"));
    assert!(
        t.sets["firewall-ips"]
            .elements
            .contains_key("198.51.100.7 . tcp . 80")
    );
}

impl OnFakeKernel for NftablesMode<FakeNft> {
    const TRANSACTIONAL: bool = true;

    fn refuse_next_write(&mut self) {
        self.kernel.fail_next = Some("busy".into());
    }

    fn holds_nothing_of_ours(&mut self) -> bool {
        IpFamily::ALL
            .into_iter()
            .all(|family| self.kernel().table(family).is_none())
    }
}

/// The checks every mode passes: convergence, a refused transaction, cleanup.
#[test]
fn conformance() {
    kproxy_testkit::conformance::check(mode);
}

#[test]
fn script_is_one_transaction_in_dependency_order() {
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    let m = mode();
    let p = plan::plan(&crate::NftRuleset::default(), &m.render_once(&s));
    let text = p.script();
    let pos = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle} missing:\n{text}"))
    };
    assert!(pos("add table ip kproxy") < pos("add map ip kproxy service-ips"));
    assert!(pos("add chain ip kproxy pick-1") < pos("add element ip kproxy service-ips"));
    assert!(pos("add map ip kproxy endpoints-tcp") < pos("add rule ip kproxy pick-1"));
    assert!(text.contains("# ns/a:p"), "{text}");
}

/// A new endpoint count after the first sync adds a `pick-N` chain whose rules use the endpoints
/// maps that already exist in the kernel. With one `typeof ... th dport` map for every protocol
/// nft 1.0.6 rejected that transaction ("conflicting protocols specified: tcp vs. th"), so every
/// later sync failed; per-protocol maps typed with `tcp dport`, `udp dport`, `sctp dport` work.
#[test]
fn new_pick_chain_after_the_first_sync_applies() {
    let mut m = mode();
    let one = service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]);
    let mut udp = service("u", "10.96.0.11", vec![ep("10.244.1.3", false)]);
    udp.name.protocol = Protocol::Udp;
    sync(&mut m, &state(vec![one.clone(), udp.clone()]));

    let mut two = one;
    two.endpoints.cluster = two
        .endpoints
        .cluster
        .iter()
        .copied()
        .chain([ep("10.244.1.2", false)])
        .collect();
    udp.endpoints.cluster = udp
        .endpoints
        .cluster
        .iter()
        .copied()
        .chain([ep("10.244.1.4", false)])
        .collect();
    let p = sync(&mut m, &state(vec![two, udp]));
    assert!(p.to_string().contains("add rule ip kproxy pick-2"), "{p}");
    let t = m.kernel().table(IpFamily::V4).unwrap();
    assert_eq!(t.sets["endpoints-tcp"].elements.len(), 2);
    assert_eq!(t.sets["endpoints-udp"].elements.len(), 2);
    for (rule, proto) in t.chains["pick-2"].rules.iter().zip(["tcp", "udp", "sctp"]) {
        assert!(
            rule.text.starts_with(&format!("meta l4proto {proto} "))
                && rule.text.ends_with(&format!("map @endpoints-{proto}")),
            "{}",
            rule.text
        );
    }
}

#[test]
fn rebuild_plan_recreates_the_table_in_one_transaction() {
    let mut m = mode();
    let s = state(many(20, 2));
    sync(&mut m, &s);
    let live = m.read_live().unwrap();
    let p = m.plan_rebuild(&live, &m.render_once(&s));
    let text = p.script();
    assert!(
        text.contains("delete table ip kproxy\nadd table ip kproxy"),
        "{text}"
    );
    m.apply(&p).unwrap();
    assert_eq!(m.read_live().unwrap(), m.render_once(&s));
}

#[test]
fn a_deleted_table_is_drift() {
    let mut m = mode();
    sync(&mut m, &state(many(2, 1)));
    assert!(!m.drifted());
    m.kernel.remove_table(IpFamily::V4);
    assert!(m.drifted());
}

/// The render cache is an optimisation only: after endpoint changes, new and removed services,
/// affinity and a node-settings change, the cached render equals a render from scratch.
#[test]
fn cached_render_equals_fresh_render_through_changes() {
    let m = mode();
    let mut services = many(30, 3);
    let mut steps = vec![state(services.clone())];
    std::sync::Arc::make_mut(&mut services[4].endpoints.cluster)[2] = ep("10.250.0.4", true);
    services[9].affinity = Some(SessionAffinity {
        timeout: Duration::from_secs(60),
    });
    steps.push(state(services.clone()));
    services.remove(2);
    services.push(service("late", "10.96.9.9", vec![ep("10.244.9.9", false)]));
    // Two ports of one ClusterIP share element groups: both must survive either changing.
    let mut second = services[0].clone();
    second.name.port = "dns".into();
    second.name.protocol = Protocol::Udp;
    steps.push(state([services.clone(), vec![second.clone()]].concat()));
    kproxy_testkit::edit_list(&mut second.endpoints.cluster, |l| {
        l.pop();
    });
    steps.push(state([services.clone(), vec![second]].concat()));
    let mut s = state(services.clone());
    std::sync::Arc::make_mut(&mut s.node).masquerade_all = true;
    steps.push(s);
    let mut memo = crate::render::RenderCache::default();
    for (i, s) in steps.iter().enumerate() {
        let cached = m.render(s, &(), &mut memo);
        let fresh = crate::render::render(s);
        assert_eq!(cached, fresh, "step {i}");
        assert_eq!(cached.owners, fresh.owners, "step {i}");
    }
}

/// A one-endpoint change at 2,000 services is a few element updates, and the plan finds them
/// without walking the unchanged services' elements (their groups are shared).
#[test]
fn one_endpoint_change_shares_every_other_group() {
    let m = mode();
    let mut services = many(2_000, 4);
    let mut memo = crate::render::RenderCache::default();
    let before = m.render(&state(services.clone()), &(), &mut memo);
    std::sync::Arc::make_mut(&mut services[700].endpoints.cluster)[1] = ep("10.250.0.1", false);
    let after = m.render(&state(services.clone()), &(), &mut memo);
    let (old, new) = (
        &before.families[&IpFamily::V4],
        &after.families[&IpFamily::V4],
    );
    let (o, n) = (
        &old.sets["endpoints-tcp"].elements,
        &new.sets["endpoints-tcp"].elements,
    );
    let differing = n
        .groups()
        .zip(o.groups())
        .filter(|((_, a), (_, b))| !std::sync::Arc::ptr_eq(a, b))
        .count();
    assert_eq!(differing, 1);
    let p = plan::plan(&before, &after);
    let fp = &p.families[&IpFamily::V4];
    let changed = element_changes(fp);
    assert_eq!(changed, 2, "{p}");
}

mod elements {
    use proptest::prelude::*;

    use crate::model::Elements;

    fn keys() -> impl Strategy<Value = std::collections::BTreeMap<String, Option<String>>> {
        prop::collection::btree_map(
            (0u8..6, 0u8..6).prop_map(|(a, b)| format!("10.0.0.{a} . tcp . {b}")),
            prop::option::of((0u8..3).prop_map(|v| format!("v{v}"))),
            0..20,
        )
    }

    proptest! {
        /// The grouped diff equals the naive element-by-element diff, with and without
        /// shared groups.
        #[test]
        fn grouped_diff_equals_naive_diff(a in keys(), b in keys(), share in any::<bool>()) {
            let old: Elements = a.clone().into_iter().collect();
            let mut new = if share { old.clone() } else { Elements::default() };
            if share {
                for k in a.keys() {
                    if !b.contains_key(k) {
                        new.remove(k);
                    }
                }
            }
            for (k, v) in &b {
                if new.get(k).map(|v| v.as_deref()) != Some(v.as_deref()) {
                    new.insert(k.clone(), v.clone());
                }
            }
            prop_assert_eq!(new.len(), b.len());
            let (add, del) = new.diff(&old);
            let owned = |(k, v): (&crate::model::Text, &Option<crate::model::Text>)| {
                (k.to_string(), v.as_deref().map(String::from))
            };
            let mut add: Vec<_> = add.into_iter().map(owned).collect();
            let mut del: Vec<_> = del.into_iter().map(owned).collect();
            add.sort();
            del.sort();
            let naive_add: Vec<_> = b.iter().filter(|(k, v)| a.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
            let naive_del: Vec<_> = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(add, naive_add);
            prop_assert_eq!(del, naive_del);
            prop_assert_eq!(new == old, a == b);
        }
    }
}

/// The incremental render and the delta plan are optimisations only: through random changes
/// (service ports added, changed, removed, and conflicting frontends), the cached render equals
/// a render from scratch, and the plan from its delta equals the plan comparing whole tables.
mod incremental {
    use kproxy_contract::IpFamily;
    use kproxy_testkit::strategies::{mix, two_states};
    use proptest::prelude::*;

    use crate::plan;
    use crate::render::{RenderCache, render, render_cached};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn incremental_render_and_delta_plan_equal_from_scratch((a, b, pick) in two_states()) {
            let c = mix(&a, &b, &pick);
            let mut cache = RenderCache::default();
            let mut prev: Option<crate::model::NftRuleset> = None;
            for (i, s) in [&a, &c, &b, &a, &c, &a].into_iter().enumerate() {
                let cached = render_cached(s, &IpFamily::ALL, &mut cache);
                let fresh = render(s);
                prop_assert_eq!(&cached, &fresh, "step {}", i);
                prop_assert_eq!(&cached.owners, &fresh.owners, "step {}", i);
                if let Some(prev) = prev {
                    let delta = cached.delta.as_ref().expect("incremental after the first");
                    prop_assert!(delta.base.same_render(&prev.generation));
                    let quick = plan::plan(&prev, &cached);
                    let full = plan::plan_full(&prev, &cached);
                    prop_assert_eq!(quick.script(), full.script(), "step {}", i);
                }
                prev = Some(cached);
            }
        }
    }
}

/// A delta plan is only ever taken against the very render the delta was derived from. Two
/// memos that made the same number of renders are two lineages: a ruleset of one is never
/// taken as the base of the other's delta (with a counter per memo they would collide, and the
/// plan would look only at the other lineage's last change).
#[test]
fn renders_of_two_memos_are_never_the_same_render() {
    let m = mode();
    let s0 = many(50, 2);
    let (mut s1, mut s2) = (s0.clone(), s0.clone());
    std::sync::Arc::make_mut(&mut s1[7].endpoints.cluster)[0] = ep("10.250.0.7", false);
    std::sync::Arc::make_mut(&mut s2[3].endpoints.cluster)[0] = ep("10.250.0.3", false);
    let (s0, s1, s2) = (state(s0), state(s1), state(s2));
    let (mut a, mut b) = (
        crate::render::RenderCache::default(),
        crate::render::RenderCache::default(),
    );
    let a1 = m.render(&s0, &(), &mut a);
    let a2 = m.render(&s1, &(), &mut a);
    let b1 = m.render(&s0, &(), &mut b);
    let b2 = m.render(&s2, &(), &mut b);
    let base = &b2.delta.as_ref().expect("incremental").base;
    assert!(base.same_render(&b1.generation));
    assert!(!base.same_render(&a1.generation) && !a2.generation.same_render(&b1.generation));
    // From a2 to b2 both services change: b2's delta (service 3 only) must not be trusted.
    let planned = plan::plan(&a2, &b2).script();
    assert_eq!(planned, plan::plan_full(&a2, &b2).script());
    assert!(
        planned.contains("# ns/s7:p") && planned.contains("10.250.0.3"),
        "{planned}"
    );
    // A ruleset read back from the kernel is no render at all.
    let read_back = crate::model::Generation::default();
    assert!(!read_back.same_render(&read_back.clone()));
}

/// A first render at 2,500 service ports renders its fragments on several threads; the result
/// equals the same state reached incrementally (one thread) from an empty one.
#[test]
fn parallel_first_render_equals_incremental_render() {
    let s = state(many(2_500, 3));
    let parallel = crate::render::render(&s);
    let mut cache = crate::render::RenderCache::default();
    let empty = kproxy_contract::ProxyState {
        services: Default::default(),
        ..s.clone()
    };
    crate::render::render_cached(&empty, &IpFamily::ALL, &mut cache);
    let incremental = crate::render::render_cached(&s, &IpFamily::ALL, &mut cache);
    assert!(incremental.delta.is_some());
    assert_eq!(parallel, incremental);
    assert_eq!(parallel.owners, incremental.owners);
}

/// The plan's printed schedule (what `--dry-run` shows) is exactly what the fake received, one
/// transaction at a time: a first sync creates chains and sets with `nft -f`, fills the maps in
/// one netlink batch and switches the base chains on last; an endpoint change is one batch.
#[test]
fn the_printed_schedule_is_what_the_kernel_receives() {
    let mut m = mode();
    let first = state(vec![
        service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
        service("b", "fd00:96::1", vec![ep("fd00:244::1", false)]),
    ]);
    let change = state(vec![
        service("a", "10.96.0.10", vec![ep("10.244.1.2", false)]),
        service("b", "fd00:96::1", vec![ep("fd00:244::1", false)]),
    ]);
    let mut shapes = Vec::new();
    for s in [&first, &change] {
        let live = m.read_live().unwrap();
        let plan = m.plan(&live, &m.render_once(s));
        let schedule = steps::Schedule::of(&plan, steps::Via::Netlink);
        let before = m.kernel().transactions.len();
        m.apply(&plan).unwrap();
        let received = &m.kernel().transactions[before..];
        let printed: Vec<String> = schedule.steps.iter().map(|s| schedule.text(s)).collect();
        assert_eq!(received, printed.as_slice());
        let text = plan.to_string();
        for step in &printed {
            assert!(
                text.contains(step.as_str()),
                "--dry-run leaves out:\n{step}"
            );
        }
        shapes.push(
            schedule
                .steps
                .iter()
                .map(|s| match s {
                    steps::Step::Nft(_) => "nft",
                    steps::Step::Elements => "netlink",
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(shapes, [vec!["nft", "netlink", "nft"], vec!["netlink"]]);
    assert_eq!(m.kernel().netlink_batches, 2);
}

/// The fake refuses what the kernel refuses, so a schedule in the wrong order cannot pass:
/// map elements that lead to a service's new chain, sent before the chain exists.
#[test]
fn a_schedule_out_of_order_fails_on_the_fake() {
    let mut m = mode();
    sync(&mut m, &state(Vec::new()));
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", false)],
    )]);
    let live = m.read_live().unwrap();
    let plan = m.plan(&live, &m.render_once(&s));
    let schedule = steps::Schedule::of(&plan, steps::Via::Netlink);
    let [steps::Step::Nft(prepare), steps::Step::Elements] = &schedule.steps[..] else {
        panic!("a new service is two transactions:\n{schedule}")
    };
    let mut fake = m.kernel().clone();
    use steps::StepKernel as _;
    let err = fake.elements(&plan).unwrap_err().to_string();
    assert!(err.contains("missing chain"), "{err}");
    // In order, the same steps pass.
    fake.nft(prepare).unwrap();
    fake.elements(&plan).unwrap();
}

/// A fragment names its sets by `render::SHARED_SETS` (a copy only for a name not listed): the
/// list is exactly the sets a family's table declares.
#[test]
fn shared_set_names_are_the_declared_sets() {
    let rules = crate::render::render(&ProxyState::default());
    let listed: std::collections::BTreeSet<&str> =
        crate::render::SHARED_SETS.iter().copied().collect();
    assert_eq!(rules.families.len(), 2);
    for table in rules.families.values() {
        let declared: std::collections::BTreeSet<&str> =
            table.sets.keys().map(String::as_str).collect();
        assert_eq!(declared, listed);
    }
}
