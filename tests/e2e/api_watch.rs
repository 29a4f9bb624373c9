//! `kproxy::source::kube::run` against the fake API server: initial lists, selectors, live
//! events, relist after 410 Gone, recovery from failures, and bookmarks.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kproxy::source::slim::{Service, Slice};
use kproxy::source::{
    Change, HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, Update,
};
use kube::ResourceExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::support::fake_apiserver::{FakeApiServer, Kind};

/// Upper bound for any single wait.
const STEP: Duration = Duration::from_secs(20);
const NODE: &str = "node-a";

fn service(name: &str, labels: &Value) -> Value {
    json!({
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

fn slice(name: &str, service: &str, extra_labels: &Value) -> Value {
    let mut labels = json!({ SERVICE_NAME_LABEL: service });
    if let (Some(labels), Some(extra)) = (labels.as_object_mut(), extra_labels.as_object()) {
        labels.extend(extra.clone());
    }
    json!({
        "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": name, "labels": labels},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": NODE}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, labels: &Value) -> Value {
    json!({
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": "10.244.0.0/24"},
    })
}

/// An object's name, whichever form the source keeps it in.
trait Named {
    fn name_of(&self) -> String;
}

impl Named for Service {
    fn name_of(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
}

impl Named for Slice {
    fn name_of(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
}

impl Named for Node {
    fn name_of(&self) -> String {
        self.name_any()
    }
}

fn names<K: Named>(objects: &[Arc<K>]) -> BTreeSet<String> {
    objects.iter().map(|o| o.name_of()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// What the source sent, in a form that is easy to assert on.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Reset(Kind, BTreeSet<String>),
    Apply(Kind, String),
    Delete(Kind, String),
}

fn seen(update: &Update) -> Seen {
    fn one<K: Named>(kind: Kind, change: &Change<Arc<K>>) -> Seen {
        match change {
            Change::Reset(objects) => Seen::Reset(kind, names(objects)),
            Change::Apply(object) => Seen::Apply(kind, object.name_of()),
            Change::Delete(object) => Seen::Delete(kind, object.name_of()),
        }
    }
    match update {
        Update::Services(change) => one(Kind::Service, change),
        Update::EndpointSlices(change) => one(Kind::EndpointSlice, change),
        Update::Node(change) => one(Kind::Node, change),
        Update::Status(status) => panic!("the API source reports no status: {status:?}"),
    }
}

/// The source under test, connected to a fake server.
struct Source {
    rx: mpsc::Receiver<Update>,
    task: JoinHandle<()>,
}

impl Source {
    fn start(server: &FakeApiServer) -> Self {
        let url = server.url().parse().expect("parse fake API server URL");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("build kube client");
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(kproxy::source::kube::run(client, NODE.to_owned(), tx));
        Self { rx, task }
    }

    async fn next(&mut self) -> Update {
        timeout(STEP, self.rx.recv())
            .await
            .expect("timed out waiting for an update")
            .expect("the source stopped")
    }

    async fn next_seen(&mut self) -> Seen {
        seen(&self.next().await)
    }

    /// One Reset per kind, in any order, and nothing else.
    async fn resets(&mut self) -> (Vec<Arc<Service>>, Vec<Arc<Slice>>, Vec<Arc<Node>>) {
        let (mut services, mut slices, mut nodes) = (None, None, None);
        while services.is_none() || slices.is_none() || nodes.is_none() {
            match self.next().await {
                Update::Services(Change::Reset(v)) if services.is_none() => services = Some(v),
                Update::EndpointSlices(Change::Reset(v)) if slices.is_none() => slices = Some(v),
                Update::Node(Change::Reset(v)) if nodes.is_none() => nodes = Some(v),
                other => panic!("expected one Reset per kind, got {:?}", seen(&other)),
            }
        }
        (
            services.unwrap_or_default(),
            slices.unwrap_or_default(),
            nodes.unwrap_or_default(),
        )
    }

    /// Asserts that nothing arrives for `period`.
    async fn quiet(&mut self, period: Duration) {
        if let Ok(update) = timeout(period, self.rx.recv()).await {
            panic!("expected no update, got {:?}", update.as_ref().map(seen));
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `condition` every 20 ms until it holds, for at most [`STEP`].
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    timeout(STEP, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

fn count(requests: &[String], prefix: &str) -> usize {
    requests.iter().filter(|r| r.starts_with(prefix)).count()
}

#[tokio::test]
async fn initial_list_is_paginated_and_reset_per_kind() {
    let server = FakeApiServer::start();
    // kproxy asks for pages of 5,000 (src/source/kube.rs, PAGE_SIZE); a server may answer
    // fewer (its own cap, here 500): 1,100 Services then take three pages.
    server.set_max_page_size(Some(500));
    let expected: BTreeSet<String> = (0..1100).map(|i| format!("svc-{i:04}")).collect();
    for name in &expected {
        server.apply(service(name, &json!({})));
    }
    server.apply(slice("svc-0000-abcde", "svc-0000", &json!({})));
    server.apply(node(NODE, &json!({})));
    let list_rv = server.resource_version();

    let mut source = Source::start(&server);
    let (services, slices, nodes) = source.resets().await;
    assert_eq!(names(&services), expected);
    assert_eq!(services.len(), 1100, "no duplicates across pages");
    assert_eq!(names(&slices), set(&["svc-0000-abcde"]));
    assert_eq!(names(&nodes), set(&[NODE]));

    // The exact requests kube's watcher sends.
    let requests = server.requests();
    let list =
        "/api/v1/services?&labelSelector=%21service.kubernetes.io%2Fservice-proxy-name&limit=5000";
    assert_eq!(count(&requests, list), 3, "three pages: {requests:#?}");
    assert!(
        requests.iter().any(|r| r == list),
        "first page: {requests:#?}"
    );
    assert_eq!(count(&requests, &format!("{list}&continue=")), 2);
    let watch = format!(
        "/api/v1/services?&watch=true&timeoutSeconds=290\
         &labelSelector=%21service.kubernetes.io%2Fservice-proxy-name\
         &allowWatchBookmarks=true&resourceVersion={list_rv}"
    );
    until("the Service watch is requested", || {
        server.requests().contains(&watch)
    })
    .await;
    source.quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn selectors_exclude_other_proxies_headless_slices_and_other_nodes() {
    let server = FakeApiServer::start();
    // Smaller pages than the client asks for: pagination with selectors in play.
    server.set_max_page_size(Some(2));
    server.apply(service("plain", &json!({})));
    server.apply(service(
        "other",
        &json!({ SERVICE_PROXY_NAME_LABEL: "foo" }),
    ));
    server.apply(service("plain-2", &json!({})));
    server.apply(slice("plain-abc", "plain", &json!({})));
    server.apply(slice(
        "headless-abc",
        "headless",
        &json!({ HEADLESS_LABEL: "" }),
    ));
    server.apply(slice(
        "other-abc",
        "other",
        &json!({ SERVICE_PROXY_NAME_LABEL: "foo" }),
    ));
    server.apply(slice("plain-2-abc", "plain-2", &json!({})));
    for name in ["node-0", NODE, "node-b", "node-c"] {
        server.apply(node(name, &json!({})));
    }

    let mut source = Source::start(&server);
    let (services, slices, nodes) = source.resets().await;
    assert_eq!(names(&services), set(&["plain", "plain-2"]));
    assert_eq!(names(&slices), set(&["plain-2-abc", "plain-abc"]));
    assert_eq!(names(&nodes), set(&[NODE]));

    let requests = server.requests();
    assert!(
        requests.contains(
            &"/apis/discovery.k8s.io/v1/endpointslices?&labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless&limit=5000".to_owned()
        ),
        "{requests:#?}"
    );
    assert!(
        requests
            .contains(&"/api/v1/nodes?&fieldSelector=metadata.name%3Dnode-a&limit=5000".to_owned()),
        "{requests:#?}"
    );

    // Changes to excluded objects produce nothing: each is followed by a change to an included
    // object of the same kind, which must be the next update.
    server.apply(node("node-b", &json!({"changed": "yes"})));
    server.apply(node(NODE, &json!({"changed": "yes"})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::Node, NODE.into())
    );
    server.apply(slice(
        "headless-abc",
        "headless",
        &json!({ HEADLESS_LABEL: "", "x": "y" }),
    ));
    server.apply(slice(
        "other-2-abc",
        "other",
        &json!({ SERVICE_PROXY_NAME_LABEL: "foo" }),
    ));
    server.apply(slice("plain-abc", "plain", &json!({"x": "y"})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::EndpointSlice, "plain-abc".into())
    );
    server.apply(service(
        "other-2",
        &json!({ SERVICE_PROXY_NAME_LABEL: "foo" }),
    ));
    server.delete("Service", "default", "other");
    server.apply(service("plain-3", &json!({})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::Service, "plain-3".into())
    );
    source.quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn apply_and_delete_events_arrive() {
    let server = FakeApiServer::start();
    server.apply(service("web", &json!({})));
    server.apply(slice("web-abc", "web", &json!({})));
    server.apply(node(NODE, &json!({})));

    let mut source = Source::start(&server);
    let (services, ..) = source.resets().await;
    assert_eq!(names(&services), set(&["web"]));

    server.apply(service("api", &json!({})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::Service, "api".into())
    );

    // The modified object arrives as kproxy keeps it (no labels but the one it reads, no
    // resource version): the changed port tells it from the first version.
    let mut web = service("web", &json!({"tier": "front"}));
    web["spec"]["ports"][0]["port"] = json!(8081);
    server.apply(web);
    match source.next().await {
        Update::Services(Change::Apply(svc)) => {
            assert_eq!(svc.name_of(), "web");
            let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
            assert_eq!(ports.map(|p| p[0].port), Some(8081));
            assert_eq!(svc.metadata.labels, None);
        }
        other => panic!("expected the modified Service, got {:?}", seen(&other)),
    }

    server.delete("Service", "default", "api");
    assert_eq!(
        source.next_seen().await,
        Seen::Delete(Kind::Service, "api".into())
    );

    server.apply(slice("web-def", "web", &json!({})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::EndpointSlice, "web-def".into())
    );
    // A slice that starts matching the exclusion selector leaves the watch as a deletion.
    server.apply(slice(
        "web-def",
        "web",
        &json!({ SERVICE_PROXY_NAME_LABEL: "foo" }),
    ));
    assert_eq!(
        source.next_seen().await,
        Seen::Delete(Kind::EndpointSlice, "web-def".into())
    );
    // And comes back as an addition.
    server.apply(slice("web-def", "web", &json!({})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::EndpointSlice, "web-def".into())
    );

    server.apply(node(NODE, &json!({"ready": "no"})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::Node, NODE.into())
    );
    server.delete("Node", "", NODE);
    assert_eq!(
        source.next_seen().await,
        Seen::Delete(Kind::Node, NODE.into())
    );
    source.quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn relists_after_compaction_while_the_watch_was_down() {
    let server = FakeApiServer::start();
    for name in ["a", "b", "c"] {
        server.apply(service(name, &json!({})));
    }
    server.apply(slice("a-abc", "a", &json!({})));
    server.apply(node(NODE, &json!({})));

    let mut source = Source::start(&server);
    let (services, ..) = source.resets().await;
    assert_eq!(names(&services), set(&["a", "b", "c"]));
    until("all watches are open", || {
        Kind::ALL.iter().all(|kind| server.open_watches(*kind) == 1)
    })
    .await;

    // The API goes away (open watches break); meanwhile b is deleted and d created, and the
    // history is compacted, so resuming from the old resourceVersion gets 410 Gone.
    server.set_unavailable(true);
    server.delete("Service", "default", "b");
    server.apply(service("d", &json!({})));
    server.compact();
    server.close_watches();
    let requests_before = server.requests().len();
    server.set_unavailable(false);

    let (services, slices, nodes) = source.resets().await;
    assert_eq!(names(&services), set(&["a", "c", "d"]));
    assert_eq!(names(&slices), set(&["a-abc"]));
    assert_eq!(names(&nodes), set(&[NODE]));
    assert!(server.expired_watches() >= 3, "every kind resumed too late");
    let after = server.requests().split_off(requests_before);
    assert!(
        after
            .iter()
            .any(|r| r.starts_with("/api/v1/services?&labelSelector=")),
        "the Services were listed again: {after:#?}"
    );

    // And it watches again from the new list.
    server.apply(service("e", &json!({})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::Service, "e".into())
    );
    source.quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn recovers_from_server_errors() {
    let server = FakeApiServer::start();
    server.apply(service("a", &json!({})));
    server.apply(slice("a-abc", "a", &json!({})));
    server.apply(node(NODE, &json!({})));

    // The initial lists fail first.
    server.fail_next(3, 500);
    let mut source = Source::start(&server);
    let (services, ..) = source.resets().await;
    assert_eq!(names(&services), set(&["a"]));

    // Then the re-watches after the streams end, while a change is made.
    until("all watches are open", || {
        Kind::ALL.iter().all(|kind| server.open_watches(*kind) == 1)
    })
    .await;
    let before = server.requests().len();
    server.fail_next(3, 500);
    server.close_watches();
    server.apply(service("b", &json!({})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::Service, "b".into())
    );
    until("all watches are open again", || {
        Kind::ALL.iter().all(|kind| server.open_watches(*kind) == 1)
    })
    .await;
    // Three failed and at least three succeeded; no relist was needed.
    let after = server.requests().split_off(before);
    assert!(after.len() >= 6, "{after:#?}");
    assert!(after.iter().all(|r| r.contains("watch=true")), "{after:#?}");
    source.quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn bookmarks_move_the_resume_point_without_updates() {
    let server = FakeApiServer::start();
    server.set_bookmark_interval(Duration::from_millis(50));
    server.apply(service("a", &json!({})));
    server.apply(slice("a-abc", "a", &json!({})));
    server.apply(node(NODE, &json!({})));

    let mut source = Source::start(&server);
    source.resets().await;
    until("every watch got bookmarks", || {
        let bookmarks = server.bookmarks();
        Kind::ALL
            .iter()
            .all(|kind| bookmarks.iter().filter(|(k, _)| k == kind).count() >= 3)
    })
    .await;
    source.quiet(Duration::from_millis(300)).await;

    // A change to Services moves the global version past what the Node and EndpointSlice
    // watches have seen; only bookmarks tell them.
    let rv = server.apply(service("b", &json!({})));
    assert_eq!(
        source.next_seen().await,
        Seen::Apply(Kind::Service, "b".into())
    );
    until("every watch got a bookmark at the new version", || {
        let bookmarks = server.bookmarks();
        Kind::ALL
            .iter()
            .all(|kind| bookmarks.iter().any(|(k, v)| k == kind && *v >= rv))
    })
    .await;

    // Compaction now does not force a relist: every watch resumes from its bookmark.
    let before = server.requests().len();
    server.compact();
    server.close_watches();
    until("all watches are open again", || {
        Kind::ALL.iter().all(|kind| server.open_watches(*kind) == 1)
    })
    .await;
    source.quiet(Duration::from_millis(300)).await;
    let after = server.requests().split_off(before);
    assert_eq!(server.expired_watches(), 0);
    assert!(
        after.contains(&format!(
            "/api/v1/nodes?&watch=true&timeoutSeconds=290&fieldSelector=metadata.name%3D{NODE}\
             &allowWatchBookmarks=true&resourceVersion={rv}"
        )),
        "the Node watch resumed at the bookmark's version: {after:#?}"
    );
    assert!(after.iter().all(|r| r.contains("watch=true")), "{after:#?}");
}

/// The fake server's own protocol, checked with a plain HTTP client (kube's raw requests).
#[tokio::test]
async fn fake_server_protocol() {
    use futures::{AsyncBufReadExt, TryStreamExt};

    let server = FakeApiServer::start();
    let client =
        kube::Client::try_from(kube::Config::new(server.url().parse().expect("parse URL")))
            .expect("build kube client");
    let get = |uri: &str| http_get(uri).expect("build request");
    for i in 0..5 {
        server.apply(service(&format!("s{i}"), &json!({"i": i.to_string()})));
    }
    let rv = server.resource_version();

    // Pagination: consistent snapshot even if objects change between pages.
    let page: Value = client
        .request(get("/api/v1/services?limit=2&labelSelector=i%21%3D1"))
        .await
        .expect("first page");
    assert_eq!(page["metadata"]["resourceVersion"], json!(rv.to_string()));
    assert_eq!(page["metadata"]["remainingItemCount"], json!(2));
    assert!(
        page["items"][0].get("kind").is_none(),
        "no kind in list items"
    );
    let token = page["metadata"]["continue"]
        .as_str()
        .expect("continue")
        .to_owned();
    server.delete("Service", "default", "s3");
    let page: Value = client
        .request(get(&format!(
            "/api/v1/services?limit=2&labelSelector=i%21%3D1&continue={token}"
        )))
        .await
        .expect("second page");
    let names: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["s3", "s4"], "the snapshot still has s3");
    assert!(page["metadata"].get("continue").is_none());

    // Field selector.
    let list: Value = client
        .request(get("/api/v1/services?fieldSelector=metadata.name%3Ds2"))
        .await
        .expect("field selector list");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));

    // Watch from an old version replays, then 410 after compaction.
    let lines: Vec<Value> = {
        let stream = client
            .request_stream(get(&format!(
                "/api/v1/services?watch=true&timeoutSeconds=1&resourceVersion={rv}"
            )))
            .await
            .expect("watch");
        stream
            .lines()
            .map_ok(|line| serde_json::from_str(&line).expect("event JSON"))
            .try_collect()
            .await
            .expect("read watch")
    };
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["type"], "DELETED");
    server.compact();
    let stream = client
        .request_stream(get(&format!(
            "/api/v1/services?watch=true&resourceVersion={rv}"
        )))
        .await
        .expect("watch");
    let lines: Vec<String> = stream.lines().try_collect().await.expect("read watch");
    let event: Value = serde_json::from_str(&lines[0]).expect("event JSON");
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");

    // Injected failures and bad selectors.
    // kube's client retries 429/503/504 by itself (Config::default_retry); 500 reaches the caller.
    let before = server.requests().len();
    server.fail_next(1, 503);
    let _: Value = client
        .request(get("/api/v1/nodes"))
        .await
        .expect("503 retried by the client");
    assert_eq!(server.requests().len() - before, 2);
    server.fail_next(1, 500);
    let err = client
        .request::<Value>(get("/api/v1/nodes"))
        .await
        .expect_err("injected 500");
    assert!(err.to_string().contains("injected failure"), "{err}");
    let err = client
        .request::<Value>(get("/api/v1/nodes?labelSelector=a%20in%20(b)"))
        .await
        .expect_err("unsupported selector");
    assert!(err.to_string().contains("not supported"), "{err}");
}

fn http_get(uri: &str) -> Result<http::Request<Vec<u8>>, http::Error> {
    http::Request::get(uri).body(Vec::new())
}
