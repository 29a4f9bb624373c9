//! How skipped input is reported: the `Display` of a `Skipped` (`skipped`).

use serde_json::json;

use super::*;

#[test]
fn skipped_display() {
    let built = run(
        vec![svc(
            "web",
            json!({"clusterIP": "10.0.0.1", "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 0}]}),
        )],
        vec![],
    );
    assert_eq!(
        built
            .skipped
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![
            "Service default/web: spec.ports[1].port: 0 is not a valid port (1-65535); port skipped"
        ]
    );
}
