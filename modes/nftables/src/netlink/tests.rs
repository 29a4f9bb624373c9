//! The netlink path against the real kernel, inside a network namespace of its own (a thread
//! that `unshare`s `CLONE_NEWNET`: the namespace, and every table in it, disappears with the
//! thread, whatever the outcome). Needs root; without it each test fails and says so.
#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    clippy::disallowed_methods,
    reason = "tests drive real tools and time the real kernel"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kproxy_contract::{
    Cause, IpFamily, LocalTraffic, Mode, NodePortAddresses, Protocol, ProxyState, ServicePort,
    SessionAffinity, TrafficPolicy,
};
use kproxy_testkit::{ep, service, state};

use std::collections::BTreeSet;

use super::NetlinkError;
use super::batch::{Batch, Deletes, Op};
use super::socket::NftSocket;
use super::types::SetType;
use crate::kernel::{NftCli, NftKernel, apply_with_nft};
use crate::model::Text;
use crate::model::{NftRuleset, Table};
use crate::plan::{self, NftPlan};
use crate::{NftablesMode, steps};

/// Runs `f` in a fresh network namespace. Without root the test fails and says why: a test
/// that cannot run here must not pass as if it had.
fn in_netns<T: Send>(test: &str, f: impl FnOnce() -> T + Send) -> T {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root (network namespaces, nf_tables): run the suite as README says (tests/setup.sh, then as root)"
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// Every set and map kind the renderer fills, in one family: ClusterIPs with local and remote
/// endpoints (hairpin), TCP, UDP and SCTP, NodePorts, externalIPs, an ETP=Local LoadBalancer
/// (short-circuit maps), source ranges, a service without endpoints and one whose policy has
/// none (drop), node port addresses.
fn rich(v6: bool) -> Vec<ServicePort> {
    let a = |v4: &str, v6s: &str| if v6 { v6s.to_string() } else { v4.to_string() };
    let mut out = Vec::new();
    let mut web = service(
        &a("web", "web6"),
        &a("10.96.0.10", "fd00:96::10"),
        vec![
            ep(&a("10.244.1.1", "fd00:244::1"), true),
            ep(&a("10.244.2.1", "fd00:244::2"), false),
            ep(&a("10.244.2.2", "fd00:244::3"), false),
        ],
    );
    web.node_port = Some(if v6 { 30180 } else { 30080 });
    web.external_ips = vec![a("192.0.2.10", "2001:db8::10").parse().unwrap()];
    out.push(web);
    for (i, proto) in [Protocol::Udp, Protocol::Sctp].into_iter().enumerate() {
        let mut s = service(
            &a(&format!("p{i}"), &format!("p6{i}")),
            &a(&format!("10.96.0.2{i}"), &format!("fd00:96::2{i}")),
            vec![ep(
                &a(&format!("10.244.3.{i}"), &format!("fd00:244::3{i}")),
                false,
            )],
        );
        s.name.protocol = proto;
        s.node_port = Some(if v6 { 30190 } else { 30090 } + i as u16);
        out.push(s);
    }
    let mut lb = service(
        &a("lb", "lb6"),
        &a("10.96.0.30", "fd00:96::30"),
        vec![
            ep(&a("10.244.1.5", "fd00:244::5"), true),
            ep(&a("10.244.2.5", "fd00:244::6"), false),
        ],
    );
    lb.load_balancer_ips = vec![a("198.51.100.7", "2001:db8::7").parse().unwrap()];
    lb.source_ranges = vec![a("203.0.113.0/24", "2001:db8:1::/48").parse().unwrap()];
    lb.node_port = Some(if v6 { 30200 } else { 30100 });
    lb.external_policy = TrafficPolicy::Local;
    out.push(lb);
    let mut none = service(&a("none", "none6"), &a("10.96.0.40", "fd00:96::40"), vec![]);
    none.node_port = Some(if v6 { 30210 } else { 30110 });
    out.push(none);
    let mut local = service(
        &a("local", "local6"),
        &a("10.96.0.50", "fd00:96::50"),
        vec![ep(&a("10.244.2.9", "fd00:244::9"), false)],
    );
    local.internal_policy = TrafficPolicy::Local;
    out.push(local);
    out
}

fn rich_state() -> ProxyState {
    let mut services = rich(false);
    services.extend(rich(true));
    let mut s = state(services);
    let node = Arc::make_mut(&mut s.node);
    node.service_cidrs.push("fd00:96::/112".parse().unwrap());
    node.node_port_addresses = NodePortAddresses::Only(vec![
        "192.168.0.2".parse().unwrap(),
        "fd00:1::2".parse().unwrap(),
    ]);
    s
}

fn mode() -> NftablesMode<NftCli> {
    NftablesMode::new(NftCli, IpFamily::ALL.to_vec())
}

/// The plan's netlink batch, deleting with `NFT_MSG_DELSETELEM`.
fn encode(plan: &NftPlan) -> Result<Option<Batch<'_>>, NetlinkError> {
    super::encode(plan, Deletes::Delete, &BTreeSet::new())
}

/// Sends the non-interval element changes of `plan` as one netlink batch.
fn send(plan: &NftPlan) -> Result<(), NetlinkError> {
    let batch = encode(plan)?.expect("elements");
    NftSocket::open()?.apply(&batch)
}

fn read(m: &mut NftablesMode<NftCli>) -> NftRuleset {
    m.read_live().unwrap()
}

#[test]
fn every_set_kind_round_trips_through_netlink() {
    in_netns("every_set_kind_round_trips_through_netlink", || {
        let mut m = mode();
        let desired = m.render_once(&rich_state());
        let plan = plan::plan(&NftRuleset::default(), &desired);
        let split = steps::split(&plan).unwrap();
        // Tables, sets and chains by nft; no element of a non-interval set goes that way.
        for step in [&split.prepare, &split.finish] {
            for (family, fp) in &step.families {
                for set in fp.add_elements.keys() {
                    let sig = &plan.families[family].signatures[set];
                    assert!(!super::handles(sig), "{set} in an nft step");
                }
            }
        }
        apply_with_nft(&split.prepare).unwrap();
        send(&plan).unwrap();
        apply_with_nft(&split.finish).unwrap();

        let live = read(&mut m);
        for family in IpFamily::ALL {
            let (want, got): (&Table, &Table) =
                (&desired.families[&family], &live.families[&family]);
            for (name, set) in &want.sets {
                if name.starts_with("affinity-") {
                    continue;
                }
                // Every kind is exercised, in both families.
                assert!(!set.elements.is_empty(), "{family} {name} has no elements");
                let got: Vec<_> = got.sets[name].elements.iter().collect();
                let want: Vec<_> = set.elements.iter().collect();
                assert_eq!(got, want, "{family} set {name}");
            }
        }
        assert_eq!(live, desired);
        assert!(kproxy_contract::Plan::is_empty(&plan::plan(
            &live, &desired
        )));
    });
}

#[test]
fn refused_batches_name_the_element_and_change_nothing() {
    in_netns(
        "refused_batches_name_the_element_and_change_nothing",
        || {
            let mut m = mode();
            let s = state(vec![service(
                "a",
                "10.96.0.10",
                vec![ep("10.244.1.1", false)],
            )]);
            let desired = m.render_once(&s);
            apply_with_nft(&plan::plan(&NftRuleset::default(), &desired)).unwrap();
            let before = read(&mut m);

            // A good element and one whose chain does not exist, in one batch: refused as a
            // whole, and the error names the second.
            let ty = SetType::parse("ipv4_addr . inet_proto . inet_service : verdict").unwrap();
            let elements = [
                (
                    Text::from("10.96.0.11 . tcp . 80"),
                    Some(Text::from("goto pick-1")),
                ),
                (
                    Text::from("10.96.0.12 . tcp . 80"),
                    Some(Text::from("goto no-such-chain")),
                ),
            ];
            let mut b = Batch::new(100);
            b.push_set(
                IpFamily::V4,
                "kproxy",
                "service-ips",
                &ty,
                Op::Add,
                &elements,
            )
            .unwrap();
            let b = b.finish();
            let err = NftSocket::open().unwrap().apply(&b).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, NetlinkError::Rejected { errno: 2, .. }),
                "{text}"
            );
            assert!(
                text.contains("10.96.0.12 . tcp . 80 : goto no-such-chain")
                    && text.contains("ip set service-ips"),
                "{text}"
            );
            assert_eq!(read(&mut m), before, "a refused batch changed the table");

            // The same across chunks: 40,000 good elements, then the bad one, in a batch
            // gathered from several chunks. One datagram, one transaction: refused as a whole,
            // nothing of the first chunks applied.
            let mut many: Vec<(Text, Option<Text>)> = (0..40_000u32)
                .map(|i| {
                    (
                        Text::from(format!("10.97.{}.{} . tcp . 80", i / 250, i % 250)),
                        Some(Text::from("goto pick-1")),
                    )
                })
                .collect();
            many.push(elements[1].clone());
            let mut b = Batch::new(150);
            b.push_set(IpFamily::V4, "kproxy", "service-ips", &ty, Op::Add, &many)
                .unwrap();
            let b = b.finish();
            assert!(b.chunks().count() > 1, "{} bytes in one chunk", b.len());
            let err = NftSocket::open().unwrap().apply(&b).unwrap_err();
            assert!(err.to_string().contains("goto no-such-chain"), "{err}");
            assert_eq!(
                read(&mut m),
                before,
                "a refused multi-chunk batch changed the table"
            );

            // Deleting an element that is not there.
            let set_ty = SetType::parse("ipv4_addr").unwrap();
            let elements_2 = [(Text::from("10.96.9.9"), None)];
            let mut b = Batch::new(200);
            b.push_set(
                IpFamily::V4,
                "kproxy",
                "cluster-ips",
                &set_ty,
                Op::Delete,
                &elements_2,
            )
            .unwrap();
            let err = NftSocket::open().unwrap().apply(&b.finish()).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("delete element `10.96.9.9` from ip set cluster-ips"),
                "{text}"
            );
            // A set that does not exist.
            let elements_3 = [(Text::from("10.0.0.1"), None)];
            let mut b = Batch::new(300);
            b.push_set(
                IpFamily::V6,
                "kproxy",
                "no-such-set",
                &set_ty,
                Op::Add,
                &elements_3,
            )
            .unwrap();
            let err = NftSocket::open().unwrap().apply(&b.finish()).unwrap_err();
            assert!(
                matches!(err, NetlinkError::Rejected { .. })
                    && err.to_string().contains("no-such-set"),
                "{err}"
            );
            assert_eq!(read(&mut m), before);
        },
    );
}

/// A kernel that applies plans like [`NftCli`] and records every `nft -f` script it runs.
#[derive(Default)]
struct Recording {
    scripts: Arc<Mutex<Vec<String>>>,
}

impl NftKernel for Recording {
    fn list(&mut self, family: IpFamily) -> Result<Option<Table>, Cause> {
        NftCli.list(family)
    }
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, Cause> {
        NftCli.table_exists(family)
    }
}

impl steps::StepKernel for Recording {
    fn nft(&mut self, plan: &NftPlan) -> Result<(), Cause> {
        self.scripts.lock().unwrap().push(plan.script());
        apply_with_nft(plan)
    }
    fn elements(&mut self, plan: &NftPlan) -> Result<(), crate::netlink::NetlinkError> {
        NftCli.elements(plan)
    }
}

/// One sync: returns the plan and the `nft -f` scripts it took; then checks that the table
/// read back equals the rendered one.
fn step(m: &mut NftablesMode<Recording>, s: &ProxyState, what: &str) -> (NftPlan, Vec<String>) {
    m.kernel().scripts.lock().unwrap().clear();
    let live = m.read_live().unwrap();
    let desired = m.render_once(s);
    let plan = m.plan(&live, &desired);
    m.apply(&plan)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{plan}"));
    let scripts = m.kernel().scripts.lock().unwrap().clone();
    let live = m.read_live().unwrap();
    let again = m.plan(&live, &desired);
    assert!(
        kproxy_contract::Plan::is_empty(&again),
        "{what}: live differs from desired:\n{again}"
    );
    (plan, scripts)
}

/// Element statements for netlink sets in a script (there must be none on the split path).
fn netlink_set_elements(script: &str) -> Vec<&str> {
    script
        .lines()
        .filter(|l| l.contains(" element "))
        .filter(|l| !l.contains("service-cidrs") && !l.contains("firewall-allow"))
        .collect()
}

/// Whether `script` creates a chain or set: an `add` not followed by the `delete` of the same
/// object (a deletion is `add chain X` then `delete chain X`, so it cannot fail).
fn creates(script: &str) -> bool {
    let lines: Vec<&str> = script.lines().collect();
    lines.iter().enumerate().any(|(i, l)| {
        (l.starts_with("add chain") || l.starts_with("add set"))
            && lines
                .get(i + 1)
                .is_none_or(|next| next.strip_prefix("delete") != l.strip_prefix("add"))
    })
}

/// The split path's shape: at most two scripts around the netlink batch, none with elements
/// of netlink sets; chains and sets are created only in the first, deleted only in the last.
fn assert_split(scripts: &[String]) {
    assert!(scripts.len() <= 2, "{scripts:#?}");
    for (i, s) in scripts.iter().enumerate() {
        assert!(netlink_set_elements(s).is_empty(), "{s}");
        let deletes = s.contains("\ndelete chain") || s.contains("\ndelete set");
        let creates = creates(s);
        if deletes {
            assert_eq!(i, scripts.len() - 1, "{scripts:#?}");
        }
        if creates && !s.contains(" hook ") {
            assert_eq!(i, 0, "{scripts:#?}");
        }
    }
}

#[test]
fn a_sequence_of_syncs_through_the_split_path_matches_the_render() {
    in_netns(
        "a_sequence_of_syncs_through_the_split_path_matches_the_render",
        || {
            let mut m = NftablesMode::new(Recording::default(), IpFamily::ALL.to_vec());
            let mut st = rich_state();

            // Full sync from empty: nft for the skeleton (two steps), netlink for the elements.
            let (_, scripts) = step(&mut m, &st, "full sync");
            assert_eq!(scripts.len(), 2, "{scripts:#?}");
            assert!(scripts[0].contains("add map ip kproxy service-ips"));
            assert!(!scripts[0].contains("hook"), "base chains come last");
            assert!(scripts[1].contains("hook prerouting"));
            for s in &scripts {
                assert!(netlink_set_elements(s).is_empty(), "{s}");
            }

            let web = st
                .services
                .keys()
                .find(|k| &*k.name.name == "web")
                .unwrap()
                .clone();
            let edit = |st: &mut ProxyState, f: &dyn Fn(&mut ServicePort)| {
                let sp = Arc::make_mut(st.services.get_mut(&web).unwrap());
                f(sp);
            };

            // One endpoint changes: netlink only.
            edit(&mut st, &|sp| {
                std::sync::Arc::make_mut(&mut sp.endpoints.cluster)[2] = ep("10.244.2.3", false)
            });
            let (plan, scripts) = step(&mut m, &st, "endpoint change");
            assert!(scripts.is_empty(), "{scripts:#?}\n{plan}");

            // 3 → 2 endpoints: service-ips switches to pick-2 (a chain that exists) and the
            // NodePort to nodeport-pick-2 (created first); pick-3 goes after its last element.
            edit(&mut st, &|sp| {
                kproxy_testkit::edit_list(&mut sp.endpoints.cluster, |l| {
                    l.pop();
                });
                kproxy_testkit::edit_list(&mut sp.endpoints.serving, |l| {
                    l.pop();
                });
            });
            let (plan, scripts) = step(&mut m, &st, "3 -> 2 endpoints");
            assert!(plan.to_string().contains("goto pick-2"), "{plan}");
            assert_eq!(scripts.len(), 2, "{scripts:#?}");
            assert!(scripts[0].contains("add chain ip kproxy nodeport-pick-2"));
            assert!(scripts[1].contains("delete chain ip kproxy pick-3"));
            assert!(scripts.iter().all(|s| netlink_set_elements(s).is_empty()));

            // 2 → 5 endpoints: a new pick-5 chain first (nft), then the elements (netlink).
            edit(&mut st, &|sp| {
                kproxy_testkit::edit_list(&mut sp.endpoints.cluster, |l| {
                    for i in 0..3 {
                        l.push(ep(&format!("10.244.4.{i}"), false));
                    }
                });
            });
            let (_, scripts) = step(&mut m, &st, "2 -> 5 endpoints");
            assert_split(&scripts);
            assert!(
                scripts[0].contains("add chain ip kproxy pick-5"),
                "{}",
                scripts[0]
            );
            // ... and back: pick-5 is deleted after the elements that used it.
            edit(&mut st, &|sp| {
                kproxy_testkit::edit_list(&mut sp.endpoints.cluster, |l| l.truncate(2))
            });
            let (_, scripts) = step(&mut m, &st, "5 -> 2 endpoints");
            assert_split(&scripts);
            let last = scripts.last().unwrap();
            assert!(last.contains("delete chain ip kproxy pick-5"), "{last}");

            // An affinity service added (new sets and chains, then elements) and removed.
            let mut aff = service(
                "aff",
                "10.96.0.60",
                vec![ep("10.244.6.1", false), ep("10.244.6.2", false)],
            );
            aff.affinity = Some(SessionAffinity {
                timeout: Duration::from_secs(600),
            });
            let aff_key = kproxy_contract::ServicePortKey {
                family: IpFamily::V4,
                name: aff.name.clone(),
            };
            st.services.insert(aff_key.clone(), Arc::new(aff));
            let (_, scripts) = step(&mut m, &st, "affinity added");
            assert_split(&scripts);
            assert!(scripts[0].contains("add set ip kproxy affinity-"));
            st.services.remove(&aff_key);
            let (_, scripts) = step(&mut m, &st, "affinity removed");
            assert_split(&scripts);
            assert!(
                scripts
                    .last()
                    .unwrap()
                    .contains("delete set ip kproxy affinity-")
            );

            // Source ranges added to a LoadBalancer: additions to an interval set go by nft
            // (step 1), firewall-ips by netlink.
            let lb = st
                .services
                .keys()
                .find(|k| &*k.name.name == "lb")
                .unwrap()
                .clone();
            Arc::make_mut(st.services.get_mut(&lb).unwrap())
                .source_ranges
                .push("198.18.0.0/15".parse().unwrap());
            let (_, scripts) = step(&mut m, &st, "source range added");
            assert_split(&scripts);
            assert!(scripts[0].contains("add element ip kproxy firewall-allow"));
            // Removed: deleting from an interval set takes the whole plan through nft.
            Arc::make_mut(st.services.get_mut(&lb).unwrap())
                .source_ranges
                .clear();
            let (plan, scripts) = step(&mut m, &st, "source ranges removed");
            assert_eq!(scripts, vec![plan.script()]);
            assert!(scripts[0].contains("delete element ip kproxy firewall-allow"));
            // A whole plan that also needs a new chain (pick-7): the chain is created in a
            // transaction of its own before the one whose element leads to it.
            Arc::make_mut(st.services.get_mut(&lb).unwrap())
                .source_ranges
                .push("198.18.0.0/15".parse().unwrap());
            step(&mut m, &st, "source range added again");
            Arc::make_mut(st.services.get_mut(&lb).unwrap())
                .source_ranges
                .clear();
            edit(&mut st, &|sp| {
                kproxy_testkit::edit_list(&mut sp.endpoints.cluster, |l| {
                    for i in 0..5 {
                        l.push(ep(&format!("10.244.7.{i}"), false));
                    }
                });
            });
            let (plan, scripts) = step(&mut m, &st, "source ranges removed, 2 -> 7 endpoints");
            assert!(steps::whole_reason(&plan).is_some());
            assert_eq!(scripts.len(), 2, "{scripts:#?}");
            assert!(
                scripts[0].contains("add chain ip kproxy pick-7"),
                "{}",
                scripts[0]
            );
            assert!(!scripts[0].contains(" element "), "{}", scripts[0]);
            assert!(!scripts[1].contains("add chain ip kproxy pick-7"));
            assert!(scripts[1].contains("goto pick-7"), "{}", scripts[1]);
            assert!(scripts[1].contains("delete element ip kproxy firewall-allow"));
            edit(&mut st, &|sp| {
                kproxy_testkit::edit_list(&mut sp.endpoints.cluster, |l| l.truncate(2))
            });
            step(&mut m, &st, "7 -> 2 endpoints");

            // Everything removed: chains and sets stay, elements go (netlink only).
            st.services.clear();
            // The IPv6 LoadBalancer's source range goes too: one nft -f for the whole plan.
            let (plan, scripts) = step(&mut m, &st, "all services removed");
            assert_eq!(
                steps::whole_reason(&plan),
                Some("elements are deleted from an interval set")
            );
            assert_eq!(scripts, vec![plan.script()]);
            // Cleanup deletes the tables (whole plan through nft).
            m.cleanup().unwrap();
            assert!(!NftCli.table_exists(IpFamily::V4).unwrap());
        },
    );
}

#[test]
fn a_large_element_batch_is_one_transaction() {
    in_netns("a_large_element_batch_is_one_transaction", || {
        let mut m = mode();
        let s = state(kproxy_testkit::many(5_000, 4));
        let desired = m.render_once(&s);
        let plan = plan::plan(&NftRuleset::default(), &desired);
        let batch = encode(&plan).unwrap().unwrap();
        assert!(batch.elements > 25_000 && batch.messages.len() > 10);
        // Sent gathered from several chunks, as one datagram: one transaction all the same,
        // through netlink (no fallback to `nft -f`).
        assert!(
            batch.chunks().count() > 1,
            "{} bytes in one chunk",
            batch.len()
        );
        struct Counted(usize);
        impl steps::StepKernel for Counted {
            fn nft(&mut self, plan: &NftPlan) -> Result<(), Cause> {
                crate::kernel::apply_with_nft(plan)
            }
            fn elements(&mut self, plan: &NftPlan) -> Result<(), NetlinkError> {
                steps::NetlinkElements(crate::kernel::apply_with_nft).elements(plan)?;
                self.0 += 1;
                Ok(())
            }
        }
        let mut kernel = Counted(0);
        steps::execute(&mut kernel, &plan, steps::Via::Netlink).unwrap();
        assert_eq!(kernel.0, 1, "the batch went through netlink");
        assert_eq!(read(&mut m), desired);
    });
}

/// Apply times, netlink path versus one `nft -f`, for the same plans: a full sync, one
/// endpoint change, and a plan of elements only (the sets exist). Run in release:
/// `cargo test --release -p kproxy-nftables apply_times -- --ignored --nocapture`
/// (`KPROXY_BENCH_SERVICES`, `KPROXY_BENCH_ENDPOINTS`: default 10,000 x 10).
#[test]
#[ignore = "measurement"]
fn apply_times_netlink_versus_nft() {
    use std::time::Instant;
    let n = std::env::var("KPROXY_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let e = std::env::var("KPROXY_BENCH_ENDPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    in_netns("apply_times_netlink_versus_nft", || {
        let services = kproxy_testkit::many(n, e);
        let s0 = state(services.clone());
        // The daemon's desired state shares every unchanged service port's `Arc`.
        let mut changed = services[n / 2].clone();
        std::sync::Arc::make_mut(&mut changed.endpoints.cluster)[0] = ep("10.255.0.1", false);
        let mut s1 = s0.clone();
        let key = kproxy_contract::ServicePortKey {
            family: changed.family,
            name: changed.name.clone(),
        };
        s1.services.insert(key, Arc::new(changed));
        let m = NftablesMode::new(NftCli, vec![IpFamily::V4]);
        // One memo, as the sync loop keeps: the second render is incremental.
        let mut memo = crate::render::RenderCache::default();
        let t = Instant::now();
        let d0 = m.render(&s0, &(), &mut memo);
        let render_full = t.elapsed();
        let t = Instant::now();
        let full = plan::plan(&NftRuleset::default(), &d0);
        let plan_full = t.elapsed();
        let t = Instant::now();
        let d1 = m.render(&s1, &(), &mut memo);
        let render_change = t.elapsed();
        let t = Instant::now();
        let change = plan::plan(&d0, &d1);
        let plan_change = t.elapsed();
        let t = Instant::now();
        let batch = encode(&full).unwrap().unwrap();
        let encode_full = t.elapsed();
        eprintln!(
            "render + plan: full sync {render_full:.2?} + {plan_full:.2?}, one endpoint change {render_change:.2?} + {plan_change:.2?}; netlink encoding of the full sync {encode_full:.2?} ({} bytes)",
            batch.len()
        );
        drop(batch);
        let elements: usize = full.families[&IpFamily::V4]
            .add_elements
            .values()
            .map(crate::plan::ElementList::len)
            .sum();
        let time = |f: &dyn Fn() -> Result<(), Cause>| {
            let t = Instant::now();
            f().unwrap();
            t.elapsed()
        };
        for (path, apply) in [
            (
                "netlink",
                &(|p: &NftPlan| steps::apply(p, apply_with_nft))
                    as &dyn Fn(&NftPlan) -> Result<(), Cause>,
            ),
            ("nft -f", &apply_with_nft),
        ] {
            let full_t = time(&|| apply(&full));
            // The change and its reverse, ten times each: the median.
            let back = plan::plan(&d1, &d0);
            let mut changes: Vec<_> = (0..10)
                .flat_map(|_| [time(&|| apply(&change)), time(&|| apply(&back))])
                .collect();
            changes.sort();
            let change_t = changes[changes.len() / 2];
            eprintln!(
                "{n} services x {e} endpoints ({elements} elements), {path}: full sync {full_t:.2?}, one endpoint change {change_t:.2?} (median of 20, min {:.2?})",
                changes[0]
            );
            cleanup_table();
        }
        // Elements only: the table and its sets exist, every element is added.
        let split = steps::split(&full).unwrap();
        let mut only = full.clone();
        for fp in only.families.values_mut() {
            fp.add_sets.clear();
            fp.add_chains.clear();
            fp.write_chains.clear();
            fp.add_elements
                .retain(|set, _| super::handles(&fp.signatures[set]));
        }
        let count: usize = only.families[&IpFamily::V4]
            .add_elements
            .values()
            .map(crate::plan::ElementList::len)
            .sum();
        for path in ["netlink", "nft -f"] {
            apply_with_nft(&split.prepare).unwrap();
            let t = match path {
                "netlink" => time(&|| {
                    let batch = encode(&only).unwrap().unwrap();
                    NftSocket::open()
                        .and_then(|s| s.apply(&batch))
                        .map_err(Cause::from)
                }),
                _ => time(&|| apply_with_nft(&only)),
            };
            eprintln!("element batch of {count} elements, {path}: {t:.2?}");
            cleanup_table();
        }
    });
}

/// Every local-traffic detector's rules are accepted by the kernel and read back as rendered,
/// and a change of detector is one sync that leaves nothing to re-plan.
#[test]
fn every_local_traffic_detector_applies_and_reads_back() {
    in_netns(
        "every_local_traffic_detector_applies_and_reads_back",
        || {
            let mut m = mode();
            for detector in [
                LocalTraffic::SourceCidrs(vec![
                    "10.244.0.0/16".parse().unwrap(),
                    "fd00:244::/56".parse().unwrap(),
                ]),
                LocalTraffic::Interface("cbr0".into()),
                LocalTraffic::InterfacePrefix("veth".into()),
                LocalTraffic::None,
                LocalTraffic::InterfacePrefix("br-1a2b3c4d5e6f".into()),
            ] {
                let mut s = rich_state();
                Arc::make_mut(&mut s.node).local_traffic = detector.clone();
                kproxy_testkit::sync(&mut m, &s);
                let desired = m.render_once(&s);
                let live = read(&mut m);
                assert_eq!(live, desired, "{detector:?}");
                assert!(
                    kproxy_contract::Plan::is_empty(&plan::plan(&live, &desired)),
                    "{detector:?}"
                );
            }
        },
    );
}

fn cleanup_table() {
    let _ = kproxy_contract::command::run(
        "nft",
        "nftables",
        &["delete", "table", "ip", "kproxy"],
        None,
    );
}

/// The drift probe asks netlink about kproxy's table alone: absent, then present in one
/// family only, then absent again; another table's presence changes nothing.
#[test]
fn table_existence_through_netlink() {
    in_netns("table_existence_through_netlink", || {
        let sock = NftSocket::open().unwrap();
        let exists = |f| sock.table_exists(f, crate::model::TABLE).unwrap();
        assert!(!exists(IpFamily::V4));
        apply_with_nft_script("add table ip other\nadd table ip6 kproxyx\n");
        assert!(!exists(IpFamily::V4));
        assert!(!exists(IpFamily::V6));
        apply_with_nft_script("add table ip kproxy\n");
        assert!(exists(IpFamily::V4));
        assert!(!exists(IpFamily::V6));
        apply_with_nft_script("delete table ip kproxy\n");
        assert!(!exists(IpFamily::V4));
    });
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = nix::sys::utsname::uname().unwrap();
    let mut parts = release
        .release()
        .to_str()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Two kproxies in one namespace (a surge update) apply the same plan: the second finds the
/// deleted elements gone. With `NFT_MSG_DESTROYSETELEM` (6.3+, probed) and with the
/// `DELSETELEM` fallback that resends without the missing elements, both succeed and the table
/// is the desired one; a deletion from a set that does not exist still fails.
#[test]
fn applying_the_same_deletions_twice_succeeds() {
    in_netns("applying_the_same_deletions_twice_succeeds", || {
        let sock = NftSocket::open().unwrap();
        assert_eq!(
            sock.knows_destroy().unwrap(),
            kernel_at_least(6, 3),
            "the destroy probe disagrees with the kernel version"
        );
        let mut m = mode();
        let both = state(vec![
            service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
            service(
                "b",
                "10.96.0.11",
                vec![ep("10.244.1.2", false), ep("10.244.1.3", false)],
            ),
            service(
                "c",
                "10.96.0.12",
                vec![ep("10.244.1.4", false), ep("10.244.1.5", false)],
            ),
        ]);
        let one = state(vec![
            service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]),
            service(
                "c",
                "10.96.0.12",
                vec![ep("10.244.1.4", false), ep("10.244.1.5", false)],
            ),
        ]);
        let mut memo = crate::render::RenderCache::default();
        let (full, less) = (
            m.render(&both, &(), &mut memo),
            m.render(&one, &(), &mut memo),
        );
        let removal = plan::plan(&full, &less);
        assert!(steps::split(&removal).is_ok(), "elements only");
        let deleted: usize = removal
            .families
            .values()
            .flat_map(|fp| fp.delete_elements.values())
            .map(crate::plan::ElementList::len)
            .sum();
        assert!(deleted >= 4, "{deleted} deletions");

        // The probed way (destroy here), through the whole apply path, twice.
        m.apply(&plan::plan(&NftRuleset::default(), &full)).unwrap();
        m.apply(&removal).unwrap();
        m.apply(&removal).expect("the second kproxy's apply");
        assert_eq!(read(&mut m), less);

        // DELSETELEM, as before 6.3: every missing element is left out, one round trip each.
        m.apply(&plan::plan(&less, &full)).unwrap();
        m.apply(&removal).unwrap();
        let batch = super::encode(&removal, Deletes::Delete, &BTreeSet::new())
            .unwrap()
            .unwrap();
        let (elements, _) = steps::apply_elements(&sock, &removal, Deletes::Delete, batch)
            .expect("the fallback skips the missing elements");
        assert_eq!(elements, 0, "every deletion was of a missing element");
        assert_eq!(read(&mut m), less);

        // Not an element but its set is missing: an error, with either way of deleting.
        let ty = SetType::parse("ipv4_addr").unwrap();
        for deletes in [Deletes::Delete, Deletes::Destroy] {
            let elements_4 = [(Text::from("10.0.0.1"), None)];
            let mut b = Batch::with_deletes(500, deletes);
            b.push_set(
                IpFamily::V4,
                "kproxy",
                "no-such-set",
                &ty,
                Op::Delete,
                &elements_4,
            )
            .unwrap();
            let b = b.finish();
            let err = if deletes == Deletes::Destroy && !kernel_at_least(6, 3) {
                continue;
            } else {
                steps::apply_elements(&sock, &removal, deletes, b).unwrap_err()
            };
            assert!(
                matches!(
                    err,
                    NetlinkError::Rejected {
                        errno: 2,
                        missing: None,
                        ..
                    }
                ),
                "{err}"
            );
        }
    });
}

/// The same for chains: a plan that creates a `pick-N` chain and one that deletes it, each
/// applied twice (by two kproxies), succeed, and the chain is never filled twice.
#[test]
fn applying_the_same_chain_changes_twice_succeeds() {
    in_netns("applying_the_same_chain_changes_twice_succeeds", || {
        let mut m = mode();
        let a = service("a", "10.96.0.10", vec![ep("10.244.1.1", false)]);
        let five: Vec<_> = (1..=5)
            .map(|i| ep(&format!("10.244.2.{i}"), false))
            .collect();
        let before = state(vec![a.clone()]);
        let after = state(vec![a, service("b", "10.96.0.11", five)]);
        let mut memo = crate::render::RenderCache::default();
        let (old, new) = (
            m.render(&before, &(), &mut memo),
            m.render(&after, &(), &mut memo),
        );
        m.apply(&plan::plan(&NftRuleset::default(), &old)).unwrap();
        let grow = plan::plan(&old, &new);
        assert!(
            grow.script().contains("add chain ip kproxy pick-5"),
            "{grow}"
        );
        m.apply(&grow).unwrap();
        m.apply(&grow)
            .expect("the second kproxy creates the same chain");
        assert_eq!(read(&mut m), new, "rules added twice");
        let shrink = plan::plan(&new, &old);
        assert!(
            shrink.script().contains("delete chain ip kproxy pick-5"),
            "{shrink}"
        );
        m.apply(&shrink).unwrap();
        m.apply(&shrink)
            .expect("the second kproxy deletes the same chain");
        assert_eq!(read(&mut m), old);
    });
}

fn apply_with_nft_script(script: &str) {
    kproxy_contract::command::run("nft", "nftables", &["-f", "-"], Some(script)).unwrap();
}

/// Endpoint flips under a flood of new flows: no new flow leaves kproxy's nat chains without
/// DNAT. A frontend flips between 3 endpoints and 1 (one netlink batch each: `goto pick-3` ↔
/// `goto pick-1`, indexes 1 and 2 deleted and re-added) as fast as kproxy applies them, while a
/// thread opens a new UDP flow to it per datagram (nat output runs for each). A packet whose
/// `service-ips` lookup ran before a commit and whose endpoints-map lookup ran after it draws
/// `numgen mod 3` in a map holding index 0 only; without the `pick-N` fallback it leaves
/// unDNATed (see `README.md`, "One packet, two generations"). A nat chain of a table of the
/// test's own, after kproxy's, counts every new flow to the frontend that kproxy did not DNAT
/// (NAT chains after the one that NATed a flow are skipped).
#[test]
fn flips_under_a_flood_of_new_flows_leave_none_without_dnat() {
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    in_netns(
        "flips_under_a_flood_of_new_flows_leave_none_without_dnat",
        || {
            #[expect(
                clippy::disallowed_methods,
                reason = "the test drives ip and nft in its own namespace directly"
            )]
            let sh = |cmd: &str, args: &[&str]| {
                let out = std::process::Command::new(cmd).args(args).output().unwrap();
                assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            sh("ip", &["link", "set", "lo", "up"]);
            for a in ["10.244.1.1/32", "10.244.1.2/32", "10.244.1.3/32"] {
                sh("ip", &["addr", "add", a, "dev", "lo"]);
            }
            sh("ip", &["route", "add", "10.96.0.0/12", "dev", "lo"]);
            let udp = |name: &str, ip: &str, eps: &[&str]| {
                let mut s = service(name, ip, eps.iter().map(|e| ep(e, false)).collect());
                s.name.protocol = Protocol::Udp;
                s
            };
            // pick-3 and pick-1 exist in both states: every flip is elements only.
            let keep = || {
                vec![
                    udp(
                        "three",
                        "10.96.0.11",
                        &["10.244.1.1", "10.244.1.2", "10.244.1.3"],
                    ),
                    udp("one", "10.96.0.12", &["10.244.1.1"]),
                ]
            };
            let with = |eps: &[&str]| {
                let mut v = keep();
                v.push(udp("flip", "10.96.0.10", eps));
                state(v)
            };
            let m = NftablesMode::new(NftCli, vec![IpFamily::V4]);
            let mut memo = crate::render::RenderCache::default();
            let three = m.render(
                &with(&["10.244.1.1", "10.244.1.2", "10.244.1.3"]),
                &(),
                &mut memo,
            );
            let one = m.render(&with(&["10.244.1.2"]), &(), &mut memo);
            let apply = |p: &NftPlan| steps::apply(p, apply_with_nft).unwrap();
            apply(&plan::plan(&NftRuleset::default(), &three));
            let (down, up) = (plan::plan(&three, &one), plan::plan(&one, &three));
            assert!(steps::whole_reason(&down).is_none() && split_is_empty(&down));
            sh(
                "nft",
                &["add table ip count; \
                     add chain ip count out { type nat hook output priority -99; }; \
                     add rule ip count out ip daddr 10.96.0.10 meta l4proto udp counter"],
            );

            let stop = AtomicBool::new(false);
            let sent = AtomicU64::new(0);
            let flips = std::thread::scope(|s| {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                        let _ = sock.send_to(b"x", "10.96.0.10:80");
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                });
                let start = Instant::now();
                let mut flips = 0;
                while start.elapsed() < Duration::from_secs(4) {
                    apply(&down);
                    apply(&up);
                    flips += 2;
                }
                stop.store(true, Ordering::Relaxed);
                flips
            });
            let counter = sh("nft", &["list", "chain", "ip", "count", "out"]);
            let missed: u64 = counter
                .split("packets ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no counter in {counter}"));
            let sent = sent.load(Ordering::Relaxed);
            eprintln!("flips={flips} new flows={sent} without DNAT={missed}");
            assert!(flips > 1000 && sent > 10_000, "flips={flips} sent={sent}");
            assert_eq!(missed, 0, "{missed} of {sent} new flows left without DNAT");
        },
    );
}

/// Whether a plan is elements only (no nft step before or after the netlink batch).
fn split_is_empty(plan: &NftPlan) -> bool {
    steps::split(plan).is_ok_and(|s| s.prepare.families.is_empty() && s.finish.families.is_empty())
}
