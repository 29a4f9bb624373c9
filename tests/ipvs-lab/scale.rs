//! Not part of CI: the IPVS mode's sync time at 10,000 services, measured once in the lab guest
//! with `KPROXY_LAB_FILTER=scale:: KPROXY_LAB_ARGS=--nocapture cargo test --test ipvs_lab guest_runs`.
//! It drives the mode directly (render, plan, apply against the real kernel), so the figure is
//! the data plane's, not the manifest parser's.

use std::time::Instant;

use kproxy_contract::{Mode as _, ServicePortKey};
use kproxy_ipvs::{IpvsMode, IpvsOptions, SystemKernel};
use kproxy_testkit::{ep, many, state};

use crate::support::netns::Netns;

#[test]
#[ignore = "measurement: run inside the lab guest on request"]
fn sync_10k_services() {
    let ns = Netns::new("scale");
    let services = many(10_000, 2);
    let full = state(services.clone());
    // The changed service port replaces its own; every other one is the same `Arc`, as the
    // daemon's incremental build leaves them.
    let mut one = services[5_000].clone();
    let mut eps = one.endpoints.cluster.to_vec();
    eps.push(ep("10.250.0.1", false));
    one.endpoints.cluster = eps.into();
    let mut changed = full.clone();
    changed.services.insert(
        ServicePortKey {
            family: one.family,
            name: one.name.clone(),
        },
        std::sync::Arc::new(one),
    );
    let report = ns.in_ns(move || {
        let mut m = IpvsMode::new(SystemKernel::new(), IpvsOptions::default());
        // As the sync loop: one memo across renders, the next plan against the last render.
        let mut memo = Default::default();
        let t = Instant::now();
        let live = m.read_live().unwrap();
        let facts = m.observe();
        let desired = m.render(&full, &facts, &mut memo);
        let plan = m.plan(&live, &desired);
        m.apply(&plan).unwrap();
        let first = t.elapsed();
        let t = Instant::now();
        let facts = m.observe();
        let desired2 = m.render(&changed, &facts, &mut memo);
        let plan2 = m.plan(&desired, &desired2);
        m.apply(&plan2).unwrap();
        let one = t.elapsed();
        let t = Instant::now();
        let live = m.read_live().unwrap();
        let read = t.elapsed();
        assert_eq!(live.services().len(), 10_000);
        format!(
            "full sync {first:?} ({} ops), one endpoint change {one:?} ({} ops), read-back {read:?}",
            plan.ops.len(),
            plan2.ops.len()
        )
    });
    eprintln!("IPVS-SCALE 10000 services x 2 endpoints: {report}");
    let vs = ns
        .run("ipvsadm", &["-Ln"])
        .lines()
        .filter(|l| l.starts_with("TCP"))
        .count();
    assert_eq!(vs, 10_000);
}
