//! Against the fake kernel: the checks every mode passes (`kproxy_testkit::conformance`), and
//! this mode's own: a one-endpoint change touches only that service's chains; cleanup removes
//! our objects and nothing else; the layout's details.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use kproxy_contract::*;
use kproxy_testkit::conformance::OnFakeKernel;
use kproxy_testkit::{ep, service, spn, state, sync};

use crate::fake::FakeIptables;
use crate::{IptablesMode, RenderOptions, Table, names};

fn mode() -> IptablesMode<FakeIptables> {
    IptablesMode::new(
        FakeIptables::new(),
        vec![IpFamily::V4, IpFamily::V6],
        RenderOptions::default(),
    )
}

impl OnFakeKernel for IptablesMode<FakeIptables> {
    const TRANSACTIONAL: bool = true;

    fn refuse_next_write(&mut self) {
        self.kernel.fail_next = Some("xtables lock held".into());
    }

    fn holds_nothing_of_ours(&mut self) -> bool {
        IpFamily::ALL.into_iter().all(|family| {
            Table::ALL.into_iter().all(|table| {
                let chains = self.kernel.chains(family, table);
                !chains.keys().any(|c| names::is_owned(c))
                    && !chains
                        .values()
                        .flat_map(|r| r.iter())
                        .any(|r| r.contains("KPROXY-"))
            })
        })
    }
}

/// The checks every mode passes: convergence, a refused transaction, cleanup.
#[test]
fn conformance() {
    kproxy_testkit::conformance::check(mode);
}

#[test]
fn service_without_endpoints_rejects_and_has_no_nat_rules() {
    let m = mode();
    let r = m.render_once(&state(vec![service("b", "10.96.0.11", vec![])]));
    let filter = r.table(IpFamily::V4, Table::Filter).unwrap();
    let rejects: Vec<_> = filter
        .chains
        .values()
        .flat_map(|r| r.iter())
        .filter(|r| r.contains("10.96.0.11/32") && r.contains("REJECT"))
        .collect();
    assert_eq!(rejects.len(), 1, "{filter:#?}");
    let nat = r.table(IpFamily::V4, Table::Nat).unwrap();
    assert!(
        !nat.chains
            .values()
            .flat_map(|r| r.iter())
            .any(|r| r.contains("10.96.0.11"))
    );
}

#[test]
fn one_endpoint_change_touches_only_that_service() {
    let mut m = mode();
    let mut services: Vec<_> = (0..200)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                vec![ep(&format!("10.244.0.{}", i % 250 + 1), false)],
            )
        })
        .collect();
    sync(&mut m, &state(services.clone()));
    kproxy_testkit::edit_list(&mut services[17].endpoints.cluster, |l| {
        l.push(ep("10.244.9.9", false))
    });
    let plan = sync(&mut m, &state(services));
    let touched: Vec<&str> = plan
        .tables
        .values()
        .flat_map(|t| t.write.iter().map(|w| w.name.as_str()))
        .collect();
    // Only the service chain (remote endpoints are DNATed from it directly); the dispatch tree
    // is unchanged.
    assert_eq!(touched.len(), 1, "{touched:?}");
    assert!(touched.contains(&names::service_chain(&spn("s17")).as_str()));
}

#[test]
fn cleanup_removes_ours_and_keeps_foreign_chains() {
    let mut m = mode();
    m.kernel
        .add_foreign(IpFamily::V4, Table::Nat, "KUBE-SERVICES", &["-j RETURN"]);
    m.kernel.add_foreign(
        IpFamily::V4,
        Table::Nat,
        "DOCKER",
        &["-d 1.2.3.4/32 -j RETURN"],
    );
    sync(
        &mut m,
        &state(vec![service(
            "a",
            "10.96.0.10",
            vec![ep("10.244.1.1", false)],
        )]),
    );
    let before_foreign = m
        .kernel
        .chains(IpFamily::V4, Table::Nat)
        .get("DOCKER")
        .cloned();
    m.cleanup().unwrap();
    for family in IpFamily::ALL {
        for table in Table::ALL {
            let chains = m.kernel.chains(family, table);
            assert!(!chains.keys().any(|c| names::is_owned(c)), "{chains:?}");
            assert!(
                !chains
                    .values()
                    .flat_map(|r| r.iter())
                    .any(|r| r.contains("KPROXY-"))
            );
        }
    }
    assert_eq!(
        m.kernel
            .chains(IpFamily::V4, Table::Nat)
            .get("DOCKER")
            .cloned(),
        before_foreign
    );
    assert!(
        m.kernel
            .chains(IpFamily::V4, Table::Nat)
            .contains_key("KUBE-SERVICES")
    );
}

#[test]
fn affinity_and_probabilities() {
    let mut svc = service(
        "a",
        "10.96.0.10",
        vec![
            ep("10.244.1.1", false),
            ep("10.244.1.2", false),
            ep("10.244.1.3", false),
        ],
    );
    svc.affinity = Some(SessionAffinity {
        timeout: Duration::from_secs(600),
    });
    let r = mode().render_once(&state(vec![svc]));
    let nat = r.table(IpFamily::V4, Table::Nat).unwrap();
    let chain = &nat.chains[&names::service_chain(&spn("a"))];
    let checks = chain
        .iter()
        .filter(|r| r.contains("--rcheck --seconds 600"))
        .count();
    assert_eq!(checks, 3);
    assert!(
        chain
            .iter()
            .any(|r| r.contains("--probability 0.33333333349"))
    );
    assert!(
        chain
            .iter()
            .any(|r| r.contains("--probability 0.50000000000"))
    );
    // The masquerade rule for traffic from outside the pod network comes first.
    assert!(chain[0].starts_with("! -s 10.244.0.0/16 -d 10.96.0.10/32"));
}

#[test]
fn dry_run_text_groups_by_service() {
    let mut m = mode();
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    let live = m.read_live().unwrap();
    let text = m.plan(&live, &m.render_once(&s)).to_string();
    assert!(text.contains("# ns/a:p"), "{text}");
    assert!(
        text.contains("-j DNAT --to-destination 10.244.1.1:8080"),
        "{text}"
    );
    assert!(
        text.contains("+ -I PREROUTING -j KPROXY-SERVICES"),
        "{text}"
    );
}

/// Upstream writes the ClusterIP masquerade rule into the internal policy chain: with
/// internalTrafficPolicy Local that is the SVL chain, so off-cluster clients of a ClusterIP are
/// masqueraded whichever policy applies.
#[test]
fn clusterip_masquerade_heads_the_internal_policy_chain() {
    let mut svc = service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", true), ep("10.244.1.2", false)],
    );
    svc.internal_policy = TrafficPolicy::Local;
    let r = mode().render_once(&state(vec![svc]));
    let nat = r.table(IpFamily::V4, Table::Nat).unwrap();
    let svl = &nat.chains[&names::service_local_chain(&spn("a"))];
    assert!(
        svl[0].starts_with("! -s 10.244.0.0/16 -d 10.96.0.10/32") && svl[0].contains("MARK-MASQ"),
        "{svl:#?}"
    );
    assert!(
        !nat.chains.contains_key(&names::service_chain(&spn("a"))),
        "ClusterIP only, Local policy: no SVC chain"
    );
}

/// ETP=Local without local endpoints: the NodePort and externalIP still jump to the EXT chain
/// (which short-circuits pod and node traffic to the cluster endpoints), and what falls
/// through is dropped by the filter rules.
#[test]
fn etp_local_without_local_endpoints_keeps_the_ext_chain_reachable() {
    let mut svc = service("a", "10.96.0.10", vec![ep("10.244.1.2", false)]);
    svc.external_policy = TrafficPolicy::Local;
    svc.node_port = Some(30080);
    svc.external_ips = vec!["192.0.2.7".parse().unwrap()];
    let r = mode().render_once(&state(vec![svc]));
    let nat = r.table(IpFamily::V4, Table::Nat).unwrap();
    let ext = names::external_chain(&spn("a"));
    let jumps_to_ext: Vec<&String> = nat
        .chains
        .values()
        .flat_map(|r| r.iter())
        .filter(|r| r.ends_with(&format!("-j {ext}")))
        .collect();
    assert_eq!(
        jumps_to_ext.len(),
        2,
        "NodePort and externalIP: {jumps_to_ext:#?}"
    );
    let ext_rules = &nat.chains[&ext];
    assert!(
        ext_rules[0].starts_with("-s 10.244.0.0/16")
            && ext_rules[0].ends_with(&format!("-j {}", names::service_chain(&spn("a")))),
        "{ext_rules:#?}"
    );
    let filter = r.table(IpFamily::V4, Table::Filter).unwrap();
    let drops = filter
        .chains
        .values()
        .flat_map(|r| r.iter())
        .filter(|r| r.contains("has no local endpoints") && r.ends_with("-j DROP"))
        .count();
    assert_eq!(drops, 2, "{filter:#?}");
}

/// The ClusterIP masquerade rule (SVC chain) and the ETP=Local pod short-circuit (EXT chain)
/// of a dual-stack NodePort service on a node with `local_traffic`, per family.
fn detector_rules(local_traffic: LocalTraffic) -> Vec<(IpFamily, String, String)> {
    let mut sps = Vec::new();
    for (cip, ep_ip) in [
        ("10.96.0.10", "10.244.2.1"),
        ("fd00:96::10", "fd00:244::21"),
    ] {
        let mut sp = service("a", cip, vec![ep(ep_ip, false)]);
        sp.node_port = Some(30080);
        sp.external_policy = TrafficPolicy::Local;
        sps.push(sp);
    }
    let mut s = state(sps);
    Arc::make_mut(&mut s.node).local_traffic = local_traffic;
    let r = mode().render_once(&s);
    IpFamily::ALL
        .into_iter()
        .map(|family| {
            let nat = r.table(family, Table::Nat).unwrap();
            let svc = &nat.chains[&names::service_chain(&spn("a"))];
            let ext = &nat.chains[&names::external_chain(&spn("a"))];
            (family, svc[0].clone(), ext[0].clone())
        })
        .collect()
}

/// Each local-traffic detector in upstream's spelling, as iptables-save prints it back:
/// `! -s CIDR` / `! -i BRIDGE` / `! -i PREFIX+` after the destination on the ClusterIP
/// masquerade rule, and the positive match heading the ETP=Local external chain.
#[test]
fn local_traffic_detectors_render_upstreams_matches() {
    let svc = names::service_chain(&spn("a"));
    // `-s` precedes `-d`, `-i` follows it.
    let masq = |family: IpFamily, detector: &str| {
        let dst = match family {
            IpFamily::V4 => "-d 10.96.0.10/32",
            IpFamily::V6 => "-d fd00:96::10/128",
        };
        let head = if detector.contains("-s ") {
            format!("{detector} {dst}")
        } else {
            format!("{dst} {detector}")
        };
        format!(
            "{head} -p tcp -m comment --comment \"ns/a:p cluster IP\" -m tcp --dport 80 -j KPROXY-MARK-MASQ"
        )
    };
    let pod = |detector: &str| {
        format!(
            "{detector} -m comment --comment \"pod traffic for ns/a:p external destinations\" -j {svc}"
        )
    };
    let cidrs = LocalTraffic::SourceCidrs(vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00:244::/56".parse().unwrap(),
    ]);
    let cases: [(LocalTraffic, [[&str; 2]; 2]); 4] = [
        (
            cidrs,
            [
                ["! -s 10.244.0.0/16", "-s 10.244.0.0/16"],
                ["! -s fd00:244::/56", "-s fd00:244::/56"],
            ],
        ),
        (
            LocalTraffic::Interface("cbr0".into()),
            [["! -i cbr0", "-i cbr0"], ["! -i cbr0", "-i cbr0"]],
        ),
        (
            LocalTraffic::InterfacePrefix("veth".into()),
            [["! -i veth+", "-i veth+"], ["! -i veth+", "-i veth+"]],
        ),
        // As long as the longest name: an exact match (iptables refuses `+` after it).
        (
            LocalTraffic::InterfacePrefix("br-1a2b3c4d5e6f".into()),
            [
                ["! -i br-1a2b3c4d5e6f", "-i br-1a2b3c4d5e6f"],
                ["! -i br-1a2b3c4d5e6f", "-i br-1a2b3c4d5e6f"],
            ],
        ),
    ];
    for (detector, want) in cases {
        for ((family, svc_rule, ext_rule), [outside, inside]) in
            detector_rules(detector.clone()).into_iter().zip(want)
        {
            assert_eq!(svc_rule, masq(family, outside), "{detector:?} {family}");
            assert_eq!(ext_rule, pod(inside), "{detector:?} {family}");
        }
    }
    // No detector, no IPv6 CIDR, an unusable name: no rule asks "from a pod?".
    for (detector, family) in [
        (LocalTraffic::None, IpFamily::V4),
        (
            LocalTraffic::SourceCidrs(vec!["10.244.0.0/16".parse().unwrap()]),
            IpFamily::V6,
        ),
        (
            LocalTraffic::Interface("cbr0 -j ACCEPT".into()),
            IpFamily::V4,
        ),
        (LocalTraffic::InterfacePrefix("veth+".into()), IpFamily::V6),
    ] {
        let (_, svc_rule, ext_rule) = detector_rules(detector.clone())
            .into_iter()
            .find(|(f, _, _)| *f == family)
            .unwrap();
        assert!(!svc_rule.contains("MARK-MASQ"), "{detector:?}: {svc_rule}");
        assert!(
            ext_rule.contains("masquerade LOCAL traffic"),
            "{detector:?}: {ext_rule}"
        );
    }
}

#[test]
fn only_local_endpoints_and_affinity_get_endpoint_chains() {
    let r = mode().render_once(&state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false), ep("10.244.1.2", true)],
    )]));
    let nat = r.table(IpFamily::V4, Table::Nat).unwrap();
    let seps: Vec<_> = nat
        .chains
        .keys()
        .filter(|c| c.starts_with("KPROXY-SEP-"))
        .collect();
    assert_eq!(
        seps.len(),
        1,
        "only the local endpoint has a chain: {seps:?}"
    );
    let sep = &nat.chains[seps[0].as_str()];
    assert!(sep[0].starts_with("-s 10.244.1.2/32") && sep[0].ends_with("-j KPROXY-MARK-MASQ"));
    let svc = &nat.chains[&names::service_chain(&spn("a"))];
    assert!(
        svc.iter().any(|r| r.contains("--probability")
            && r.ends_with("-j DNAT --to-destination 10.244.1.1:8080")),
        "{svc:#?}"
    );
}

#[test]
fn rebuild_plan_rewrites_every_chain() {
    let mut m = mode();
    let s = state(vec![service(
        "a",
        "10.96.0.10",
        vec![ep("10.244.1.1", false)],
    )]);
    sync(&mut m, &s);
    let live = m.read_live().unwrap();
    let desired = m.render_once(&s);
    assert!(m.plan(&live, &desired).is_empty());
    let p = m.plan_rebuild(&live, &desired);
    let written: usize = p.tables.values().map(|t| t.write.len()).sum();
    let chains: usize = desired
        .families
        .values()
        .flat_map(|f| f.tables.values())
        .map(|t| t.chains.len())
        .sum();
    assert_eq!(written, chains);
    m.apply(&p).unwrap();
    assert_eq!(m.read_live().unwrap(), desired);
}

#[test]
fn a_flushed_table_is_seen_by_the_canary() {
    let mut m = mode();
    sync(
        &mut m,
        &state(vec![service(
            "a",
            "10.96.0.10",
            vec![ep("10.244.1.1", false)],
        )]),
    );
    assert!(!m.drifted());
    m.kernel.wipe(IpFamily::V6, Table::Nat);
    assert!(m.drifted());
}

#[test]
fn large_clusters_drop_rule_comments() {
    let small = mode().render_once(&state(kproxy_testkit::many(10, 2)));
    let large = mode().render_once(&state(kproxy_testkit::many(600, 2)));
    let comments = |r: &crate::Ruleset| {
        r.families
            .values()
            .flat_map(|f| f.tables.values())
            .flat_map(|t| t.chains.values().flat_map(|r| r.iter()))
            .filter(|r| r.contains("--comment"))
            .count()
    };
    assert!(comments(&small) > 0);
    assert_eq!(comments(&large), 0);
}

/// The render cache is an optimisation only: after any sequence of changes (endpoints, new and
/// removed services, node settings, crossing the large-cluster threshold) the cached render
/// equals a render from scratch, owners included.
#[test]
fn cached_render_equals_fresh_render_through_changes() {
    use crate::render::{LARGE_CLUSTER_ENDPOINTS, render};
    let m = mode();
    let opts = RenderOptions::default();
    let mut services = kproxy_testkit::many(40, 3);
    let mut steps: Vec<ProxyState> = vec![state(services.clone())];
    std::sync::Arc::make_mut(&mut services[7].endpoints.cluster)[1] = ep("10.250.0.9", true);
    steps.push(state(services.clone()));
    services.remove(3);
    services.push(service("late", "10.96.9.9", vec![ep("10.244.9.9", false)]));
    steps.push(state(services.clone()));
    let mut s = state(services.clone());
    Arc::make_mut(&mut s.node).masquerade_all = true;
    steps.push(s);
    // Past the large-cluster threshold: comments go, everywhere.
    let big = kproxy_testkit::many(LARGE_CLUSTER_ENDPOINTS / 2 + 1, 2);
    steps.push(state(big.clone()));
    steps.push(state(services.clone()));
    let mut memo = crate::RenderCache::default();
    for (i, s) in steps.iter().enumerate() {
        let cached = m.render(s, &(), &mut memo);
        let fresh = render(s, &opts);
        assert_eq!(cached, fresh, "step {i}");
        assert_eq!(cached.owners, fresh.owners, "step {i}");
    }
}

/// A one-endpoint change re-renders one service: every other service's chains are the very
/// same allocations as in the previous render, so the plan skips them without comparing rules.
#[test]
fn unchanged_services_reuse_their_chains() {
    let m = mode();
    let mut services = kproxy_testkit::many(20, 2);
    let mut memo = crate::RenderCache::default();
    let before = m.render(&state(services.clone()), &(), &mut memo);
    std::sync::Arc::make_mut(&mut services[5].endpoints.cluster)[0] = ep("10.250.0.1", false);
    let after = m.render(&state(services.clone()), &(), &mut memo);
    let changed = names::service_chain(&services[5].name);
    let (old, new) = (
        before.table(IpFamily::V4, Table::Nat).unwrap(),
        after.table(IpFamily::V4, Table::Nat).unwrap(),
    );
    let mut shared = 0;
    for (name, rules) in &new.chains {
        if !name.starts_with("KPROXY-SVC-") {
            continue;
        }
        if *name == changed {
            assert!(!Arc::ptr_eq(rules, &old.chains[name]));
        } else {
            assert!(Arc::ptr_eq(rules, &old.chains[name]), "{name} re-rendered");
            shared += 1;
        }
    }
    assert_eq!(shared, 19);
    let plan = m.plan(&before, &after);
    let written: Vec<&str> = plan
        .tables
        .values()
        .flat_map(|t| t.write.iter().map(|w| w.name.as_str()))
        .collect();
    assert_eq!(written, vec![changed.as_str()], "{plan}");
}

/// The apply streams `restore_inputs` to the tool; the trace log prints `restore_payloads`.
/// They are the same bytes, and each input's announced length is its text's.
#[test]
fn streamed_restore_input_is_the_printed_payload() {
    use kproxy_contract::command::Input as _;
    for n in [50, 700] {
        let mut m = mode();
        let plan = sync(&mut m, &state(kproxy_testkit::many(n, 1)));
        let mut families = 0;
        for family in plan.families() {
            let inputs = plan.restore_inputs(family);
            let payloads = plan.restore_payloads(family);
            assert_eq!(inputs.len(), payloads.len());
            assert!(!inputs.is_empty(), "a first sync writes");
            for (input, payload) in inputs.iter().zip(&payloads) {
                assert_eq!(&input.text(), payload);
                assert_eq!(input.len(), payload.len());
                assert!(payload.contains("COMMIT\n"), "{payload}");
            }
            families += 1;
        }
        assert!(families > 0);
    }
}

/// A first sync with at least `STAGE_MIN` new service chains creates them in a restore of
/// their own, each chain after the chains it jumps to and followed by its rules; the second
/// restore holds everything else and links them in. The kernel ends as after one restore, and
/// a small change is one restore again.
#[test]
fn many_new_chains_are_staged_in_a_restore_of_their_own() {
    let n = crate::plan::STAGE_MIN + 100;
    let mut m = mode();
    let s = state(kproxy_testkit::many(n, 2));
    let plan = sync(&mut m, &s);
    let payloads = plan.restore_payloads(IpFamily::V4);
    assert_eq!(payloads.len(), 2, "staged, then the rest");
    let (staged, main) = (&payloads[0], &payloads[1]);
    let mut declared = std::collections::BTreeSet::new();
    for line in staged.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap();
            assert!(!name.starts_with(names::SERVICES_TREE), "{name} staged");
            declared.insert(name.to_string());
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap();
            assert!(declared.contains(chain), "rule before its chain: {line}");
            if let Some(t) = rule
                .split(" -j ")
                .nth(1)
                .map(|t| t.split_whitespace().next().unwrap())
                && names::is_owned(t)
            {
                assert!(declared.contains(t), "jump before its target: {line}");
            }
        }
    }
    assert!(declared.len() > n, "{} staged", declared.len());
    assert!(!staged.contains("-I ") && !staged.contains("-X "));
    assert!(
        staged.starts_with("*nat\n") && staged.matches("COMMIT").count() == 1,
        "only the nat table has that many new chains"
    );
    let main_nat = main
        .split("*nat\n")
        .nth(1)
        .and_then(|t| t.split("COMMIT").next())
        .unwrap();
    for name in &declared {
        assert!(!main_nat.contains(&format!(":{name} ")), "{name} in both");
    }
    assert!(main_nat.contains(&format!(":{}", names::SERVICES_TREE)));
    // The kernel holds what was rendered, and nothing is left to do.
    let live = m.read_live().unwrap();
    assert!(kproxy_contract::Plan::is_empty(
        &m.plan(&live, &m.render_once(&s))
    ));
    // One endpoint change: one restore.
    let mut services = kproxy_testkit::many(n, 2);
    kproxy_testkit::edit_list(&mut services[3].endpoints.cluster, |l| {
        l.push(ep("10.250.0.3", false))
    });
    let plan = sync(&mut m, &state(services));
    assert_eq!(plan.restore_payloads(IpFamily::V4).len(), 1);
}

/// Reading the legacy backend's tables must not create them: a table counts as present only
/// when the kernel's list of instantiated tables names it.
#[test]
fn a_legacy_table_exists_only_when_the_kernel_lists_it() {
    use crate::kernel::lists_table;
    assert!(lists_table("filter\nnat\n", Table::Nat));
    assert!(lists_table("mangle\nfilter\n", Table::Filter));
    assert!(!lists_table("filter\n", Table::Nat));
    assert!(!lists_table("", Table::Filter));
    // A name that merely contains another is not it.
    assert!(!lists_table("natx\nfilterx\n", Table::Nat));
}
