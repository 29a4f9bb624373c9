//! Topology (docs/semantics.md, rule 16): which ready endpoints topology hints keep
//! (`topology`).

use serde_json::{Value, json};

use super::*;
use crate::desired_state::build;

fn hinted(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
    let mut e = ready(addr, node);
    let mut hints = serde_json::Map::new();
    if !zones.is_empty() {
        hints.insert(
            "forZones".into(),
            json!(zones.iter().map(|z| json!({"name": z})).collect::<Vec<_>>()),
        );
    }
    if !nodes.is_empty() {
        hints.insert(
            "forNodes".into(),
            json!(nodes.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()),
        );
    }
    e["hints"] = Value::Object(hints);
    e
}

#[test]
fn topology_hints() {
    // (case, endpoints, zone, labels known, cluster)
    let cases: Vec<(&str, Value, Option<&str>, bool, Vec<&str>)> = vec![
        (
            "zone hints match",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80"],
        ),
        (
            "zone hints, no zone label",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            None,
            true,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "zone hints, node not seen yet",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            Some("z1"),
            false,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "zone hints, no match",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[])
            ]),
            Some("z3"),
            true,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "one endpoint without zone hint",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                ready("10.1.0.2", "n2")
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80", "10.1.0.2:80"],
        ),
        (
            "non-ready endpoint without hint is ignored",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &[]),
                hinted("10.1.0.2", "n2", &["z2"], &[]),
                terminating("10.1.0.3", "n3", true)
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80"],
        ),
        (
            "node hints match",
            json!([
                hinted("10.1.0.1", NODE, &["z1"], &[NODE]),
                hinted("10.1.0.2", "n2", &["z1"], &["n2"])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80 local"],
        ),
        (
            "node hints, no match: zone",
            json!([
                hinted("10.1.0.1", "n1", &["z1"], &["n1"]),
                hinted("10.1.0.2", "n2", &["z2"], &["n2"])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.1:80"],
        ),
        (
            "node hints incomplete: zone",
            json!([
                hinted("10.1.0.1", "n1", &["z2"], &[NODE]),
                hinted("10.1.0.2", "n2", &["z1"], &[])
            ]),
            Some("z1"),
            true,
            vec!["10.1.0.2:80"],
        ),
        (
            "node hints without zone hints",
            json!([
                hinted("10.1.0.1", "n1", &[], &[NODE]),
                hinted("10.1.0.2", "n2", &[], &["n2"])
            ]),
            None,
            false,
            vec!["10.1.0.1:80"],
        ),
    ];
    for (name, endpoints, zone, known, cluster) in cases {
        let c = cache(
            vec![simple_svc("s", "10.0.0.1")],
            vec![slice("s-1", "s", "IPv4", json!([{"port": 80}]), endpoints)],
        );
        let mut ctx = ctx(zone);
        ctx.node_labels_known = known;
        let built = build(&c, &ctx, None);
        assert_eq!(
            eps(&get(&built, &v4("s")).endpoints.cluster),
            cluster,
            "{name}"
        );
    }
}

#[test]
fn topology_does_not_touch_local_or_fallback() {
    let c = cache(
        vec![simple_svc("s", "10.0.0.1")],
        vec![slice(
            "s-1",
            "s",
            "IPv4",
            json!([{"port": 80}]),
            json!([
                hinted("10.1.0.1", NODE, &["z2"], &[]),
                hinted("10.1.0.2", "n2", &["z1"], &[]),
            ]),
        )],
    );
    let built = build(&c, &ctx(Some("z1")), None);
    let e = &get(&built, &v4("s")).endpoints;
    assert_eq!(eps(&e.cluster), vec!["10.1.0.2:80"]);
    assert_eq!(eps(&e.local), vec!["10.1.0.1:80 local"]);

    let mut t1 = terminating("10.1.0.1", "n1", true);
    t1["hints"] = json!({"forZones": [{"name": "z2"}]});
    let c = cache(
        vec![simple_svc("s", "10.0.0.1")],
        vec![slice(
            "s-1",
            "s",
            "IPv4",
            json!([{"port": 80}]),
            json!([t1]),
        )],
    );
    let built = build(&c, &ctx(Some("z1")), None);
    assert_eq!(
        eps(&get(&built, &v4("s")).endpoints.cluster),
        vec!["10.1.0.1:80"]
    );
}
