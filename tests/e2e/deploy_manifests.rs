//! The deployment manifests parse as the Kubernetes types they claim to be, with no field the
//! schema does not know (a typo in a DaemonSet is silently ignored by the API server), the RBAC
//! grants only list/watch, and the ConfigMap carries a KubeProxyConfiguration kproxy accepts.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("read manifest");
    serde_saphyr::from_multiple::<Value>(&text)
        .expect("valid YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Deserialises `v` as `T`, failing on any field `T` does not have.
fn strict<T: DeserializeOwned>(v: &Value) -> T {
    let mut unknown = Vec::new();
    let mut record = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
    let t = serde_ignored::deserialize(v, &mut record).expect("matches the schema");
    assert!(
        unknown.is_empty(),
        "fields unknown to the schema: {unknown:?}"
    );
    t
}

#[test]
fn daemonset_matches_the_schema_and_upstream_conventions() {
    let docs = documents("daemonset.yaml");
    assert_eq!(docs.len(), 1);
    let ds: DaemonSet = strict(&docs[0]);
    let spec = ds
        .spec
        .clone()
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = spec.tolerations.expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let c = &spec.containers[0];
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/healthz"));
    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/run/xtables.lock") && mounts.contains(&"/lib/modules"),
        "{mounts:?}"
    );
    // Every flag the DaemonSet passes is one kproxy accepts.
    let mut args = vec!["kproxy".to_string()];
    args.extend(c.command.iter().flatten().skip(1).cloned());
    kproxy::cli::Args::try_parse_go_style(&args).expect("kproxy accepts the DaemonSet's flags");
    // Requests so the scheduler accounts for it; no memory limit (an OOM kill would take every
    // service on the node down).
    let resources = c.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    assert!(
        resources
            .limits
            .as_ref()
            .is_none_or(|l| !l.contains_key("memory"))
    );
    let ds_spec = ds.spec.as_ref().expect("spec");
    let strategy = ds_spec.update_strategy.as_ref().expect("update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert!(strategy.rolling_update.is_some());
    // kube-prometheus's kube-proxy monitor selects this label.
    let labels = ds_spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .expect("pod labels");
    assert_eq!(
        labels.get("k8s-app").map(String::as_str),
        Some("kube-proxy")
    );
    // ... but the DaemonSet's own selector is kproxy's, so it never claims kube-proxy's pods.
    let selector = ds_spec.selector.match_labels.as_ref().expect("selector");
    assert!(!selector.contains_key("k8s-app"), "{selector:?}");
}

#[test]
fn rbac_is_list_and_watch_only() {
    for doc in documents("rbac.yaml") {
        match doc["kind"].as_str() {
            Some("ServiceAccount") => {
                let _: ServiceAccount = strict(&doc);
            }
            Some("ClusterRoleBinding") => {
                let _: ClusterRoleBinding = strict(&doc);
            }
            Some("ClusterRole") => {
                let role: ClusterRole = strict(&doc);
                for rule in role.rules.expect("rules") {
                    assert!(
                        rule.verbs.iter().all(|v| v == "list" || v == "watch"),
                        "verbs beyond list/watch: {:?}",
                        rule.verbs
                    );
                }
            }
            other => panic!("unexpected kind {other:?} in rbac.yaml"),
        }
    }
}

#[test]
fn configmap_carries_a_configuration_kproxy_accepts_and_a_direct_kubeconfig() {
    let docs = documents("configmap.yaml");
    let cm: ConfigMap = strict(&docs[0]);
    let mut data = cm.data.expect("data");
    let text = data.remove("config.conf").expect("config.conf");
    let (cfg, unknown) = kproxy::config::file::parse(&text).expect("valid KubeProxyConfiguration");
    assert!(unknown.is_empty(), "unknown fields: {unknown:?}");
    assert_eq!(cfg.kind.as_deref(), Some("KubeProxyConfiguration"));
    // It points at the kubeconfig in the same ConfigMap, as kubeadm's does.
    assert_eq!(
        cfg.client_connection.and_then(|c| c.kubeconfig).as_deref(),
        Some("/var/lib/kproxy/kubeconfig.conf")
    );
    let kubeconfig = data.remove("kubeconfig.conf").expect("kubeconfig.conf");
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).expect("a kubeconfig");
    let server = kc.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("server");
    // The one value an operator fills in; never the Service VIP (nothing programs it yet on a
    // fresh node).
    assert_eq!(server, "https://CONTROL-PLANE-ENDPOINT:6443");
}

/// `kubectl kustomize DIR`, as YAML documents.
fn kustomize(dir: &std::path::Path) -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .expect(
            "kubectl (Debian's kubernetes-client; tests/setup.sh installs it) must be installed",
        );
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).expect("YAML")
}

#[test]
fn kustomize_renders_the_base() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let docs = kustomize(&dir);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    for doc in &docs {
        match doc["kind"].as_str() {
            Some("DaemonSet") => {
                let _: DaemonSet = strict(doc);
            }
            Some("ConfigMap") => {
                let _: ConfigMap = strict(doc);
            }
            _ => {}
        }
    }
}

/// The strict check is real: a misspelt field is caught.
#[test]
#[should_panic(expected = "fields unknown to the schema")]
fn strict_parsing_catches_unknown_fields() {
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namspace": "typo"}
    });
    let _: ServiceAccount = strict(&doc);
}

/// The userspace component (`manifests/components/userspace`) renders on top of the base into a
/// surge rollout in userspace mode that the scheduler can place next to the old pod: no declared
/// (host) ports.
#[test]
fn kustomize_renders_the_userspace_component() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let overlay = tempfile::Builder::new()
        .prefix("kpx-overlay-")
        .tempdir_in(root.join("target"))
        .or_else(|_| tempfile::tempdir_in(root))
        .expect("temp dir");
    let base = pathdiff(root.join("manifests").as_path(), overlay.path());
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!("resources: [{base}]\ncomponents: [{base}/components/userspace]\n"),
    )
    .expect("write overlay");
    let docs = kustomize(overlay.path());
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let ds: DaemonSet = strict(ds);
    let spec = ds.spec.expect("spec");
    let rolling = spec
        .update_strategy
        .and_then(|s| s.rolling_update)
        .expect("rolling update");
    assert_eq!(
        serde_json::to_value(&rolling).unwrap(),
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0})
    );
    let pod = spec.template.spec.expect("pod spec");
    let c = &pod.containers[0];
    assert!(
        c.command
            .iter()
            .flatten()
            .any(|a| a == "--proxy-mode=userspace")
    );
    assert!(c.ports.is_none(), "host ports would block the surge pod");
    assert!(pod.termination_grace_period_seconds.unwrap_or(30) >= 20);
}

/// `path` relative to `from` (both absolute, `from` a directory).
fn pathdiff(path: &std::path::Path, from: &std::path::Path) -> String {
    let (p, f): (Vec<_>, Vec<_>) = (path.components().collect(), from.components().collect());
    let common = p.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out: Vec<String> = vec!["..".into(); f.len() - common];
    out.extend(
        p[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    out.join("/")
}
