#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    clippy::disallowed_methods,
    reason = "tests time the watcher against the real clock"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tokio::sync::mpsc;

use super::*;

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kproxy-manifests-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log output captured from the closure (WARN and above, no colours).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn warnings(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains("WARN"))
            .map(str::to_owned)
            .collect()
    }
}

fn with_logs<R>(f: impl FnOnce() -> R) -> (R, Captured) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    (result, captured)
}

/// Loads `dir` with `files`, returning the result and the warnings logged.
fn load(dir: &TempDir, files: &mut LoadedFiles) -> (Loaded, Vec<String>) {
    let (loaded, logs) = with_logs(|| load_dir(&dir.0, files));
    (loaded.unwrap(), logs.warnings())
}

fn service_names(loaded: &Loaded) -> Vec<String> {
    loaded
        .services
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or("-"),
                s.metadata.name.as_deref().unwrap_or("-")
            )
        })
        .collect()
}

fn slice_names(loaded: &Loaded) -> Vec<String> {
    loaded
        .endpoint_slices
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or("-"),
                s.metadata.name.as_deref().unwrap_or("-")
            )
        })
        .collect()
}

fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: ns\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: {port}\n    targetPort: http\n"
    )
}

fn first_port(loaded: &Loaded, index: usize) -> i32 {
    loaded.services[index]
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()[0]
        .port
}

const SLICE: &str = r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: ns
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: ["10.0.0.1"]
  conditions: {ready: true}
ports:
- name: http
  port: 8080
  protocol: TCP
"#;

#[test]
fn multi_document_yaml_lists_and_json() {
    let dir = TempDir::new("multi");
    dir.write("a.yaml", &format!("{}---\n{SLICE}", service("web", 80)));
    dir.write(
        "b.yml",
        r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: from-list, namespace: ns}
  spec: {ports: [{port: 81}]}
- apiVersion: v1
  kind: Node
  metadata: {name: node-1}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
"#,
    );
    dir.write(
        "c.json",
        r#"{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "from-json", "namespace": "ns"},
            "spec": {"ports": [{"port": 82, "targetPort": 8082}]}}"#,
    );
    // A typed list as the API returns it: the items carry neither kind nor apiVersion.
    dir.write(
        "d.yaml",
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSliceList
items:
- metadata: {name: typed-list, namespace: ns}
  addressType: IPv4
  endpoints: []
"#,
    );
    dir.write(
        "e.yaml",
        "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {name: typed, namespace: ns}\n",
    );

    let mut files = LoadedFiles::new("node-1");
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(
        service_names(&loaded),
        ["ns/web", "ns/from-list", "ns/from-json", "ns/typed"]
    );
    assert_eq!(slice_names(&loaded), ["ns/web-abc", "ns/typed-list"]);
    assert_eq!(
        loaded.node.as_ref().unwrap().metadata.name.as_deref(),
        Some("node-1")
    );
    assert_eq!(first_port(&loaded, 2), 82);
}

#[test]
fn comment_only_and_empty_documents_are_skipped() {
    let dir = TempDir::new("comments");
    dir.write(
        "a.yaml",
        &format!(
            "# header comment\n---\n# only a comment\n---\n---\n\n{}---\n# trailing\n",
            service("web", 80)
        ),
    );
    dir.write("empty.yaml", "");
    dir.write("only-comments.yaml", "# nothing here\n# at all\n");
    let mut files = LoadedFiles::new("n");
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(service_names(&loaded), ["ns/web"]);
}

#[test]
fn other_kinds_hidden_files_and_subdirectories_are_ignored() {
    let dir = TempDir::new("kinds");
    dir.write(
        "a.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec: {{replicas: 3}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{k: v}}\n---\n{}",
            service("web", 80)
        ),
    );
    dir.write(".hidden.yaml", &service("hidden", 80));
    dir.write("notes.txt", &service("txt", 80));
    dir.write("backup.yaml~", &service("backup", 80));
    dir.write("UPPER.YAML", &service("upper", 80));
    std::fs::create_dir(dir.0.join("sub.yaml")).unwrap();
    std::fs::write(dir.0.join("sub.yaml/x.yaml"), service("nested", 80)).unwrap();

    let mut files = LoadedFiles::new("n");
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(service_names(&loaded), ["ns/upper", "ns/web"]);
}

#[test]
fn label_filters_match_the_api_source() {
    let dir = TempDir::new("labels");
    dir.write(
        "a.yaml",
        r#"apiVersion: v1
kind: Service
metadata:
  name: other-proxy
  namespace: ns
  labels: {service.kubernetes.io/service-proxy-name: cilium}
---
apiVersion: v1
kind: Service
metadata: {name: mine, namespace: ns, labels: {app: web}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-proxy-x
  namespace: ns
  labels: {service.kubernetes.io/service-proxy-name: cilium}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: headless-x
  namespace: ns
  labels: {service.kubernetes.io/headless: ""}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mine-x
  namespace: ns
  labels: {kubernetes.io/service-name: mine}
addressType: IPv4
endpoints: []
"#,
    );
    let mut files = LoadedFiles::new("n");
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(service_names(&loaded), ["ns/mine"]);
    assert_eq!(slice_names(&loaded), ["ns/mine-x"]);
}

#[test]
fn only_this_node_is_kept() {
    let dir = TempDir::new("nodes");
    dir.write(
        "nodes.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\n  labels: {zone: z1}\n",
    );
    let (loaded, _) = load(&dir, &mut LoadedFiles::new("node-b"));
    let node = loaded.node.unwrap();
    assert_eq!(node.metadata.name.as_deref(), Some("node-b"));
    assert_eq!(node.metadata.namespace, None);

    let (loaded, _) = load(&dir, &mut LoadedFiles::new("node-c"));
    assert!(loaded.node.is_none());
    assert!(matches!(
        &loaded.into_updates()[0],
        Update::Node(Change::Reset(nodes)) if nodes.is_empty()
    ));
}

#[test]
fn missing_namespace_defaults_to_default() {
    let dir = TempDir::new("namespace");
    dir.write(
        "a.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1}\naddressType: IPv4\nendpoints: []\n",
    );
    let (loaded, warnings) = load(&dir, &mut LoadedFiles::new("n"));
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(service_names(&loaded), ["default/web"]);
    assert_eq!(slice_names(&loaded), ["default/web-1"]);
}

#[test]
fn bad_file_keeps_its_previous_content_and_warns_once() {
    let dir = TempDir::new("bad");
    dir.write("other.yaml", &service("other", 90));
    dir.write(
        "web.yaml",
        &format!("{}---\n{}", service("web", 80), service("web2", 81)),
    );
    let mut files = LoadedFiles::new("n");
    let (good, warnings) = load(&dir, &mut files);
    assert!(warnings.is_empty());
    assert_eq!(service_names(&good), ["ns/other", "ns/web", "ns/web2"]);

    // Truncated mid-write: the second document stops inside a flow sequence.
    dir.write(
        "web.yaml",
        &format!("{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web2, namespace: ns}}\nspec:\n  ports: [{{port: 81", service("web", 8080)),
    );
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(loaded, good, "previous content stays in effect");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("web.yaml"), "{}", warnings[0]);
    assert!(warnings[0].contains("document=2"), "{}", warnings[0]);

    // Unchanged bad file: no second warning.
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(loaded, good);
    assert!(warnings.is_empty(), "{warnings:?}");

    // A different problem: a port that is not a number. Reported with kind and name.
    dir.write(
        "web.yaml",
        &service("web", 80).replace("port: 80", "port: \"eighty\""),
    );
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(loaded, good);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning = &warnings[0];
    for expected in [
        "web.yaml",
        "document=1",
        "kind=\"Service\"",
        "object=\"ns/web\"",
        "spec.ports[0].port",
    ] {
        assert!(warning.contains(expected), "{expected} not in {warning}");
    }

    // Fixed: the new content applies.
    dir.write("web.yaml", &service("web", 8080));
    let (loaded, warnings) = load(&dir, &mut files);
    assert!(warnings.is_empty());
    assert_eq!(service_names(&loaded), ["ns/other", "ns/web"]);
    assert_eq!(first_port(&loaded, 1), 8080);
}

#[test]
fn file_that_never_parsed_contributes_nothing() {
    let dir = TempDir::new("never");
    dir.write("ok.yaml", &service("ok", 80));
    dir.write(
        "noname.yaml",
        &format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: ns}}\n",
            service("named", 80)
        ),
    );
    dir.write(
        "syntax.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [oops\n",
    );
    dir.write("scalar.yaml", "just a string\n");
    dir.write(
        "version.yaml",
        "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old}\n",
    );
    let mut files = LoadedFiles::new("n");
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(service_names(&loaded), ["ns/ok"]);
    assert_eq!(warnings.len(), 4, "{warnings:?}");
    let all = warnings.join("\n");
    assert!(all.contains("metadata.name is missing"), "{all}");
    assert!(all.contains("discovery.k8s.io/v1beta1"), "{all}");
    assert!(all.contains("syntax.yaml"), "{all}");
    assert!(all.contains("scalar.yaml"), "{all}");
}

#[test]
fn deleted_file_objects_disappear() {
    let dir = TempDir::new("deleted");
    dir.write("a.yaml", &service("a", 80));
    dir.write("b.yaml", &format!("{}---\n{SLICE}", service("b", 80)));
    let mut files = LoadedFiles::new("n");
    let (loaded, _) = load(&dir, &mut files);
    assert_eq!(service_names(&loaded), ["ns/a", "ns/b"]);
    assert_eq!(loaded.endpoint_slices.len(), 1);

    dir.remove("b.yaml");
    let (loaded, _) = load(&dir, &mut files);
    assert_eq!(service_names(&loaded), ["ns/a"]);
    assert!(loaded.endpoint_slices.is_empty());
}

#[test]
fn duplicates_keep_the_first_and_warn_once() {
    let dir = TempDir::new("dups");
    dir.write("a.yaml", &service("web", 80));
    dir.write(
        "b.yaml",
        &format!("{}---\n{}", service("web", 81), service("other", 82)),
    );
    let mut files = LoadedFiles::new("n");
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(service_names(&loaded), ["ns/web", "ns/other"]);
    assert_eq!(first_port(&loaded, 0), 80);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("b.yaml") && warnings[0].contains("a.yaml"));

    let (_, warnings) = load(&dir, &mut files);
    assert!(warnings.is_empty(), "{warnings:?}");

    // Within one file as well: the first document wins.
    dir.write(
        "c.yaml",
        &format!("{}---\n{}", service("twice", 1), service("twice", 2)),
    );
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(service_names(&loaded), ["ns/web", "ns/other", "ns/twice"]);
    assert_eq!(first_port(&loaded, 2), 1);
}

#[test]
fn missing_directory_is_an_error_naming_it() {
    let dir = std::env::temp_dir().join("kproxy-manifests-does-not-exist");
    let err = load_dir(&dir, &mut LoadedFiles::new("n")).unwrap_err();
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
}

#[test]
fn problems_carry_document_index_and_file_line() {
    let text = format!(
        "# preamble\n---\n{}---\n# comment only\n---\nkind: Service\nmetadata: {{name: x\n",
        service("a", 1)
    );
    let problems = parse_file(&text).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].document, 3);
    // The broken line is line 17 of the file (1-based), not line 3 of the document.
    assert!(
        problems[0].reason.starts_with("line 17 "),
        "{}",
        problems[0].reason
    );
}

/// Issue #20 item 14: the error of a file too large for the parser's default limits is
/// recomputed with the same limits as the parse, so it names the real line.
#[test]
fn yaml_error_in_a_large_file_names_the_real_line() {
    let mut text = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: big}\ndata:\n");
    for i in 0..140_000 {
        text.push_str(&format!("  k{i}: [v]\n"));
    }
    // Line 130,005 (1-based, past the default budget of 250,000 nodes): an unclosed bracket;
    // the parser notices on the next line.
    let broken = 130_005;
    let mut lines: Vec<&str> = text.lines().collect();
    lines[broken - 1] = "  broken: [v";
    let text = lines.join("\n") + "\n";
    let problems = parse_file(&text).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let reason = &problems[0].reason;
    assert!(!reason.contains("budget"), "{reason}");
    assert!(
        reason.starts_with(&format!("line {} ", broken + 1)),
        "{reason}"
    );
}

fn sized(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

#[test]
fn oversized_file_is_refused_and_its_previous_content_kept() {
    let dir = TempDir::new("oversized");
    dir.write("a.yaml", &service("web", 80));
    let mut files = LoadedFiles::new("n");
    let (loaded, _) = load(&dir, &mut files);
    assert_eq!(service_names(&loaded), ["ns/web"]);
    sized(&dir.0.join("a.yaml"), MAX_FILE_BYTES + 1);
    let (loaded, warnings) = load(&dir, &mut files);
    assert_eq!(service_names(&loaded), ["ns/web"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("larger than 64 MiB"), "{warnings:?}");
    // Nothing of the text is kept: only a digest.
    assert!(
        files
            .files
            .values()
            .all(|f| f.digest.is_none() || f.digest.is_some())
    );
}

/// A file that cannot be read (here: /proc/self/mem, which fails with EIO as root too) makes the
/// load incomplete, so the source retries it; its previous content stays.
#[test]
fn an_unreadable_file_makes_the_load_incomplete() {
    let dir = TempDir::new("unreadable");
    dir.write("a.yaml", &service("web", 80));
    let mut files = LoadedFiles::new("n").holding_removals(Duration::from_secs(5));
    let t0 = tokio::time::Instant::now();
    let report = load_dir_at(&dir.0, &mut files, t0).unwrap();
    assert!(report.complete());
    std::os::unix::fs::symlink("/proc/self/mem", dir.0.join("b.yaml")).unwrap();
    let report = load_dir_at(&dir.0, &mut files, t0).unwrap();
    assert!(!report.complete());
    assert!(
        report.unreadable[0].contains("b.yaml"),
        "{:?}",
        report.unreadable
    );
    assert_eq!(service_names(&report.loaded), ["ns/web"]);
    std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
    let report = load_dir_at(&dir.0, &mut files, t0).unwrap();
    assert!(report.complete());
    // A held-back version that becomes unreadable is no longer pending: nothing to confirm
    // (the retry reads it again), and the content in effect stays.
    dir.write("a.yaml", "");
    let report = load_dir_at(&dir.0, &mut files, t0).unwrap();
    assert!(report.next_confirmation.is_some());
    std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
    std::os::unix::fs::symlink("/proc/self/mem", dir.0.join("a.yaml")).unwrap();
    let report = load_dir_at(&dir.0, &mut files, t0 + Duration::from_secs(10)).unwrap();
    assert!(!report.complete());
    assert_eq!(report.next_confirmation, None);
    assert_eq!(service_names(&report.loaded), ["ns/web"]);
}

fn two_services() -> String {
    format!("{}---\n{}---\n{SLICE}", service("a", 80), service("b", 81))
}

/// Issue #20 item 4: `kubectl get ... > file` truncates, then writes 1.5 s later.
#[test]
fn a_truncated_file_is_held_until_confirmed() {
    let s = Duration::from_secs(1);
    let dir = TempDir::new("truncate");
    dir.write("all.yaml", &two_services());
    let mut files = LoadedFiles::new("n").holding_removals(5 * s);
    let t0 = tokio::time::Instant::now();
    let first = load_dir_at(&dir.0, &mut files, t0).unwrap();
    assert_eq!(service_names(&first.loaded), ["ns/a", "ns/b"]);

    dir.write("all.yaml", "");
    let report = load_dir_at(&dir.0, &mut files, t0 + s).unwrap();
    assert_eq!(report.loaded, first.loaded, "the old content stays");
    assert_eq!(report.holds_started, 1);
    assert_eq!(report.next_confirmation, Some(t0 + 6 * s));
    // Rewritten 1.5 s later: nothing was ever removed, and the hold is over.
    dir.write("all.yaml", &two_services());
    let report = load_dir_at(&dir.0, &mut files, t0 + 2500 * s / 1000).unwrap();
    assert_eq!(report.loaded, first.loaded);
    assert_eq!(report.next_confirmation, None);

    // Emptied for good: held, then applied once it stayed empty for 5 s.
    dir.write("all.yaml", "");
    let report = load_dir_at(&dir.0, &mut files, t0 + 10 * s).unwrap();
    assert_eq!(service_names(&report.loaded), ["ns/a", "ns/b"]);
    let report = load_dir_at(&dir.0, &mut files, t0 + 14 * s).unwrap();
    assert_eq!(service_names(&report.loaded), ["ns/a", "ns/b"], "not yet");
    assert_eq!(report.holds_started, 0, "the same hold");
    let report = load_dir_at(&dir.0, &mut files, t0 + 15 * s).unwrap();
    assert!(report.loaded.services.is_empty());
    assert_eq!(report.next_confirmation, None);

    // A smaller change (one of three service ports and endpoints) applies at once.
    dir.write("all.yaml", &two_services());
    load_dir_at(&dir.0, &mut files, t0 + 16 * s).unwrap();
    dir.write("all.yaml", &format!("{}---\n{SLICE}", service("a", 80)));
    let report = load_dir_at(&dir.0, &mut files, t0 + 17 * s).unwrap();
    assert_eq!(service_names(&report.loaded), ["ns/a"]);
    assert_eq!(report.holds_started, 0);
}

/// An EndpointSlice scaled down from three endpoints to one is the cluster's own update: applied
/// at once, whatever share of the file's endpoints it removes; the slice vanishing from the
/// file is held like a truncation.
#[test]
fn a_slice_scaled_down_applies_at_once_and_a_vanished_one_is_held() {
    let s = Duration::from_secs(1);
    let dir = TempDir::new("scale");
    let three = SLICE.replace(
        "- addresses: [\"10.0.0.1\"]\n  conditions: {ready: true}\n",
        "- addresses: [\"10.0.0.1\"]\n  conditions: {ready: true}\n- addresses: [\"10.0.0.2\"]\n  conditions: {ready: true}\n- addresses: [\"10.0.0.3\"]\n  conditions: {ready: true}\n",
    );
    assert_ne!(three, SLICE);
    dir.write("slice.yaml", &three);
    let mut files = LoadedFiles::new("n").holding_removals(5 * s);
    let t0 = tokio::time::Instant::now();
    let first = load_dir_at(&dir.0, &mut files, t0).unwrap();
    assert_eq!(first.loaded.endpoint_slices[0].endpoints.len(), 3);
    dir.write("slice.yaml", SLICE);
    let report = load_dir_at(&dir.0, &mut files, t0 + s).unwrap();
    assert_eq!(report.loaded.endpoint_slices[0].endpoints.len(), 1);
    assert_eq!(report.holds_started, 0);
    dir.write("slice.yaml", "");
    let report = load_dir_at(&dir.0, &mut files, t0 + 2 * s).unwrap();
    assert_eq!(report.loaded.endpoint_slices.len(), 1, "held");
    assert_eq!(report.holds_started, 1);
}

/// A write cut in the middle of a line (`port: 81` read as `port: 8`) is held back.
#[test]
fn a_file_cut_mid_line_is_held() {
    let s = Duration::from_secs(1);
    let dir = TempDir::new("cut");
    let text = two_services();
    dir.write("all.yaml", &text);
    let mut files = LoadedFiles::new("n").holding_removals(5 * s);
    let t0 = tokio::time::Instant::now();
    let first = load_dir_at(&dir.0, &mut files, t0).unwrap();
    let cut = text.find("port: 81").unwrap() + "port: 8".len();
    dir.write("all.yaml", &text[..cut]);
    let report = load_dir_at(&dir.0, &mut files, t0 + s).unwrap();
    assert_eq!(report.loaded, first.loaded);
    assert_eq!(first_port(&report.loaded, 1), 81);
    dir.write("all.yaml", &text);
    let report = load_dir_at(&dir.0, &mut files, t0 + 2 * s).unwrap();
    assert_eq!(report.loaded, first.loaded);
    assert_eq!(report.next_confirmation, None);
}

/// An emptied directory (its files deleted before new ones arrive) keeps its content until
/// the removal is confirmed; deleting a minor file applies at once. The first load holds
/// nothing, and a one-shot load (no confirmation period) never holds.
#[test]
fn an_emptied_directory_is_held_until_confirmed() {
    let s = Duration::from_secs(1);
    let dir = TempDir::new("emptied");
    dir.write("a.yaml", &service("a", 80));
    dir.write("b.yaml", &format!("{}---\n{SLICE}", service("b", 81)));
    dir.write("c.yaml", &service("c", 82));
    let mut files = LoadedFiles::new("n").holding_removals(5 * s);
    let t0 = tokio::time::Instant::now();
    let first = load_dir_at(&dir.0, &mut files, t0).unwrap();
    assert_eq!(first.loaded.services.len(), 3);
    dir.remove("c.yaml");
    let report = load_dir_at(&dir.0, &mut files, t0 + s).unwrap();
    assert_eq!(
        service_names(&report.loaded),
        ["ns/a", "ns/b"],
        "a minor removal"
    );
    dir.remove("a.yaml");
    dir.remove("b.yaml");
    let report = load_dir_at(&dir.0, &mut files, t0 + 2 * s).unwrap();
    assert_eq!(service_names(&report.loaded), ["ns/a", "ns/b"], "held");
    assert_eq!(report.holds_started, 1);
    // The files come back before the confirmation: nothing was removed.
    dir.write("a.yaml", &service("a", 80));
    dir.write("b.yaml", &format!("{}---\n{SLICE}", service("b", 81)));
    let report = load_dir_at(&dir.0, &mut files, t0 + 3 * s).unwrap();
    assert_eq!(service_names(&report.loaded), ["ns/a", "ns/b"]);
    assert_eq!(report.next_confirmation, None);
    // Gone for good.
    dir.remove("a.yaml");
    dir.remove("b.yaml");
    load_dir_at(&dir.0, &mut files, t0 + 4 * s).unwrap();
    let report = load_dir_at(&dir.0, &mut files, t0 + 9 * s).unwrap();
    assert!(report.loaded.services.is_empty());

    // One-shot: nothing held.
    dir.write("a.yaml", &service("a", 80));
    let mut once = LoadedFiles::new("n");
    load_dir(&dir.0, &mut once).unwrap();
    dir.write("a.yaml", "");
    assert!(load_dir(&dir.0, &mut once).unwrap().services.is_empty());
}

#[test]
fn objects_are_kept_slimmed() {
    // A managed field the API server would have refused does not fail the object either.
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: ns\n  managedFields: [{manager: 7, fieldsV1: [1]}]\n  annotations:\n    kubectl.kubernetes.io/last-applied-configuration: '{\"big\": 1}'\n    other: x\n  labels: {app: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    let loaded = parse_text(Path::new("a.yaml"), text, "n");
    // The kept Service has no room for managed fields, annotations or labels but the one
    // kproxy reads.
    let meta = &loaded.services[0].metadata;
    assert_eq!(meta.name.as_deref(), Some("a"));
    assert!(meta.labels.is_none(), "{:?}", meta.labels);
}

#[test]
fn removes_most_is_more_than_half() {
    assert!(removes_most(3, 1));
    assert!(removes_most(2, 0));
    assert!(!removes_most(2, 1));
    assert!(!removes_most(0, 0));
    assert!(!removes_most(4, 2));
    assert!(removes_most(5, 2));
}

#[test]
fn split_documents_keeps_lines() {
    let docs = split_documents("%YAML 1.2\n---\na: 1\n--- \nb: 2\n---x: 3\n");
    assert_eq!(
        docs,
        [(0, "%YAML 1.2\n---\na: 1\n"), (3, "--- \nb: 2\n---x: 3\n")]
    );
    assert_eq!(
        split_documents("a: 1\n---\nb: 2"),
        [(0, "a: 1\n"), (1, "---\nb: 2")]
    );
    assert_eq!(split_documents(""), [(0, "")]);
}

#[test]
fn odd_inputs_never_panic() {
    for text in [
        "[1, 2]",
        "42",
        "null",
        "~",
        "kind: 5",
        "kind: List\nitems: 5",
        "kind: List\nitems: [1, null, {kind: Service}]",
        "kind: List\nitems: [{kind: List, items: [{kind: Service}]}]",
        "apiVersion: v1\nkind: ServiceList\nitems: [{metadata: 5}]",
        "apiVersion: v1\nkind: Service\nmetadata: 5",
        "apiVersion: v1\nkind: Service\nmetadata: {name: 5}",
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: 5}",
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 99999999999}]}",
        "apiVersion: v1\nkind: Node\nmetadata: {name: a, namespace: x}",
        "\u{feff}---\n---\n...\n",
        "a: &x [*x]",
        "- - - -",
        "\t\t",
        ":",
    ] {
        let _ = parse_file(text);
    }
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse_file(&text);
    }

    #[test]
    fn yamlish_text_never_panics(parts in proptest::collection::vec(
        prop::sample::select(vec![
            "---\n", "apiVersion: v1\n", "kind: Service\n", "kind: List\n", "items:\n", "- ",
            "metadata:\n", "  name: a\n", "  namespace: b\n", "spec:\n", "  ports:\n",
            "  - port: 80\n", "    port: x\n", "{", "}", "[", "]", "\"", "# c\n", "  ", "\n",
        ]),
        0..30,
    )) {
        let _ = parse_file(&parts.concat());
    }
}

/// Receives the next three updates (one Reset per kind), or None if they don't come in time.
async fn next_resets(
    rx: &mut mpsc::Receiver<Update>,
    within: Duration,
) -> Option<(Vec<String>, usize, bool)> {
    let deadline = tokio::time::Instant::now() + within;
    let mut services = None;
    let mut slices = None;
    let mut node = None;
    for _ in 0..3 {
        match tokio::time::timeout_at(deadline, rx.recv()).await.ok()?? {
            Update::Services(Change::Reset(s)) => {
                services = Some(
                    s.iter()
                        .map(|s| s.metadata.name.clone().unwrap_or_default())
                        .collect(),
                );
            }
            Update::EndpointSlices(Change::Reset(s)) => slices = Some(s.len()),
            Update::Node(Change::Reset(n)) => node = Some(!n.is_empty()),
            other => panic!("unexpected update {other:?}"),
        }
    }
    Some((services?, slices?, node?))
}

#[tokio::test]
async fn run_sends_resets_and_follows_changes() {
    let dir = TempDir::new("run");
    dir.write("a.yaml", &service("a", 80));
    dir.write(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: me}\n",
    );
    // The current-thread runtime runs `run` on this thread, so its logs land here.
    let logs = Captured::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish(),
    );
    let reloads = || logs.text().matches("nothing changed").count();

    let (tx, mut rx) = mpsc::channel(16);
    let confirm = Duration::from_secs(1);
    let task = tokio::spawn(run_with(
        dir.0.clone(),
        LoadedFiles::new("me").holding_removals(confirm),
        tx,
    ));

    let initial = next_resets(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(initial, Some((vec!["a".to_owned()], 0, true)));

    // Reading the files must not look like a change: an idle directory is not reloaded.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), rx.recv())
            .await
            .is_err()
    );
    assert_eq!(reloads(), 0, "{}", logs.text());

    // A new file.
    let start = Instant::now();
    dir.write(
        "b.yaml",
        &format!("{}---\n{}---\n{SLICE}", service("b", 80), service("c", 80)),
    );
    let update = next_resets(&mut rx, Duration::from_secs(1)).await;
    let added = start.elapsed();
    assert_eq!(
        update,
        Some((
            vec!["a".to_owned(), "b".to_owned(), "c".to_owned()],
            1,
            true
        ))
    );

    // An editor's atomic save: write a hidden temporary file, rename it over the original.
    let start = Instant::now();
    dir.write(".a.yaml.tmp", &service("a2", 80));
    std::fs::rename(dir.0.join(".a.yaml.tmp"), dir.0.join("a.yaml")).unwrap();
    let update = next_resets(&mut rx, Duration::from_secs(1)).await;
    let renamed = start.elapsed();
    assert_eq!(
        update,
        Some((
            vec!["a2".to_owned(), "b".to_owned(), "c".to_owned()],
            1,
            true
        ))
    );

    // Deletion of a file with most of the directory's service ports (2 of 3):
    // held back, then applied once it has stayed so for the confirmation period.
    let start = Instant::now();
    dir.remove("b.yaml");
    let held = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
    assert!(
        matches!(held, Ok(Some(Update::Status(SourceStatus::RemovalHeld)))),
        "{held:?}"
    );
    let update = next_resets(&mut rx, Duration::from_secs(3)).await;
    let deleted = start.elapsed();
    assert_eq!(update, Some((vec!["a2".to_owned()], 0, true)));
    assert!(deleted >= confirm, "{deleted:?}");

    // A broken write changes nothing, so nothing is sent.
    dir.write(
        "a.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: a3\n",
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), rx.recv())
            .await
            .is_err(),
        "a bad file must not produce a Reset"
    );
    // A rewrite with the same objects changes nothing either.
    dir.write("a.yaml", &service("a2", 80));
    assert!(
        tokio::time::timeout(Duration::from_millis(600), rx.recv())
            .await
            .is_err()
    );
    // Both were reloaded, and found unchanged (as was the held-back deletion's first read).
    assert_eq!(reloads(), 3, "{}", logs.text());
    // (The bad file's warning is logged on a blocking-pool thread, outside this subscriber;
    // warnings are checked in the synchronous tests.)

    // The node file goes away: the Node Reset is empty.
    dir.remove("node.yaml");
    let update = next_resets(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(update, Some((vec!["a2".to_owned()], 0, false)));

    eprintln!("reload latency: add {added:?}, atomic rename {renamed:?}, delete {deleted:?}");

    // Closing the channel ends the source.
    drop(rx);
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn run_fails_on_a_missing_directory() {
    let dir = std::env::temp_dir().join(format!("kproxy-manifests-missing-{}", std::process::id()));
    let (tx, _rx) = mpsc::channel(16);
    let result = tokio::time::timeout(Duration::from_secs(5), run(dir.clone(), "n".to_owned(), tx))
        .await
        .unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, ManifestsError::ReadDir { .. }));
    assert!(
        err.to_string().contains(&dir.display().to_string()),
        "{err}"
    );
}

/// A JSON list is parsed item by item (never as one tree); it must give exactly what the same
/// document gives as YAML, which is parsed whole: objects in order, and problems with their item.
#[test]
fn json_lists_parse_item_by_item_like_yaml() {
    let documents = [
        // kubectl's order: items before kind.
        r#"{"apiVersion": "v1", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "ns"}, "spec": {"ports": [{"port": 80}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "ns"}, "spec": {"ports": "x"}},
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}},
            7
        ], "kind": "List", "metadata": {}}"#,
        // A typed list: kind and apiVersion come from the list.
        r#"{"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "items": [
            {"metadata": {"name": "s", "namespace": "ns"}, "addressType": "IPv4", "endpoints": []},
            {"metadata": {"namespace": "ns"}, "addressType": "IPv4", "endpoints": []}
        ]}"#,
        r#"{"kind": "List", "items": null}"#,
        r#"{"kind": "List"}"#,
        r#"{"kind": "ServiceList", "items": {"a": 1}}"#,
        // Not a list: an items field is only a field.
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "ns"}, "items": [1]}"#,
        r#"{"kind": 5, "items": []}"#,
        r#"[{"kind": "Service"}]"#,
        r#""text""#,
    ];
    for json in documents {
        let value: Value = serde_json::from_str(json).expect("valid JSON");
        let yaml = serde_json::to_string(&value).expect("JSON is YAML");
        let as_json = format!("{:?}", parse_json(json));
        let as_yaml = format!("{:?}", parse_file(&yaml));
        assert_eq!(as_json, as_yaml, "{json}");
    }
    // The cases above do not all fail: the first one has objects and problems.
    let first = parse_json(documents[0]).expect_err("one bad item");
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[0].item, Some(2));
    assert_eq!(
        parse_json(documents[1]).expect_err("a nameless item")[0].item,
        Some(2)
    );
    assert_eq!(
        parse_json(documents[5]).expect("a Service").len(),
        1,
        "the non-list document is one object"
    );
    // An item nested past serde_json's limit fails the file as one problem, as a whole-tree
    // parse did.
    let deep = format!(
        r#"{{"kind": "List", "items": [{}1{}]}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let deep = parse_json(&deep).expect_err("too deep");
    assert_eq!(deep.len(), 1, "{deep:?}");
    assert!(deep[0].reason.contains("recursion limit"), "{deep:?}");
    // A syntax error anywhere is still the file's one problem, with serde_json's position.
    let broken = parse_json(r#"{"kind": "List", "items": [{"kind": "Service",}]}"#)
        .expect_err("trailing comma");
    assert_eq!(broken.len(), 1);
    assert!(broken[0].reason.contains("line 1 column"), "{broken:?}");
}
