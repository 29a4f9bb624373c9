//! Not part of CI: the IPVS mode's sync time at 10,000 services, measured once in the lab guest
//! with `KPROXY_LAB_FILTER=scale:: KPROXY_LAB_ARGS=--nocapture cargo test --test ipvs_lab guest_runs`.
//! It drives the mode directly (render, plan, apply against the real kernel), so the figure is
//! the data plane's, not the manifest parser's.

use std::time::Instant;

use kproxy_contract::Mode as _;
use kproxy_ipvs::{IpvsMode, IpvsOptions, SystemKernel};
use kproxy_testkit::{ep, many, state};

use crate::support::netns::Netns;

#[test]
#[ignore = "measurement: run inside the lab guest on request"]
fn sync_10k_services() {
    let ns = Netns::new("scale");
    let full = state(many(10_000, 2));
    let mut changed = many(10_000, 2);
    changed[5_000]
        .endpoints
        .cluster
        .push(ep("10.250.0.1", false));
    let changed = state(changed);
    let report = ns.in_ns(move || {
        let mut m = IpvsMode::new(SystemKernel::new(), IpvsOptions::default());
        let t = Instant::now();
        let live = m.read_live().unwrap();
        let desired = m.render_once(&full);
        let plan = m.plan(&live, &desired);
        m.apply(&plan).unwrap();
        let first = t.elapsed();
        let t = Instant::now();
        let desired2 = m.render_once(&changed);
        let plan2 = m.plan(&desired, &desired2);
        m.apply(&plan2).unwrap();
        let one = t.elapsed();
        let t = Instant::now();
        let live = m.read_live().unwrap();
        let read = t.elapsed();
        assert_eq!(live.services.len(), 10_000);
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
