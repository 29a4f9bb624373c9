//! Snapshots: the state a build returns carries the node's settings, and with the `previous`
//! state a service port equal to the previous one reuses its `Arc` (`build`, in mod.rs).

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::cache::ClusterCache;
use crate::desired_state::build;

#[test]
fn reuses_previous_arcs_for_unchanged_ports() {
    let slices = vec![slice(
        "a-1",
        "a",
        "IPv4",
        json!([{"port": 80}]),
        json!([ready("10.1.0.1", "n1")]),
    )];
    let c = cache(
        vec![simple_svc("a", "10.0.0.1"), simple_svc("b", "10.0.0.2")],
        slices.clone(),
    );
    let first = build(&c, &ctx(None), None);
    let second = build(&c, &ctx(None), Some(&first.state));
    for (k, v) in &second.state.services {
        assert!(Arc::ptr_eq(v, &first.state.services[k]), "{k:?}");
    }
    let without = build(&c, &ctx(None), None);
    assert!(!Arc::ptr_eq(
        &without.state.services[&v4("a")],
        &first.state.services[&v4("a")]
    ));

    // Changing b's endpoints only: a keeps its Arc, b gets a new one.
    let mut slices2 = slices;
    slices2.push(slice(
        "b-1",
        "b",
        "IPv4",
        json!([{"port": 80}]),
        json!([ready("10.1.0.2", "n1")]),
    ));
    let c2 = cache(
        vec![simple_svc("a", "10.0.0.1"), simple_svc("b", "10.0.0.2")],
        slices2,
    );
    let third = build(&c2, &ctx(None), Some(&second.state));
    assert!(Arc::ptr_eq(
        &third.state.services[&v4("a")],
        &second.state.services[&v4("a")]
    ));
    assert!(!Arc::ptr_eq(
        &third.state.services[&v4("b")],
        &second.state.services[&v4("b")]
    ));
    assert!(third.state.services[&v4("b")].endpoints.any);
}

#[test]
fn state_carries_node_settings() {
    let ctx = ctx(None);
    let built = build(&ClusterCache::default(), &ctx, None);
    assert!(Arc::ptr_eq(&built.state.node, &ctx.node));
    assert!(built.state.services.is_empty());
}
