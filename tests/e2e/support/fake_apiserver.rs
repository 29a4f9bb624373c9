//! A fake Kubernetes API server for tests. It speaks the real list/watch protocol over plain
//! HTTP/1.1 for three resources:
//!
//! - `GET /api/v1/services`
//! - `GET /apis/discovery.k8s.io/v1/endpointslices`
//! - `GET /api/v1/nodes`
//!
//! What it implements, as the real API server does:
//!
//! - One global, monotonically increasing resourceVersion. Every stored object carries its
//!   `metadata.resourceVersion`; every change is kept in a per-kind history (with the previous
//!   object) until [`FakeApiServer::compact`].
//! - **LIST** (`{"kind":"ServiceList",...,"metadata":{"resourceVersion","continue",
//!   "remainingItemCount"},"items":[...]}`; items carry no `kind`/`apiVersion`, like the real
//!   server). Pagination with `limit` + `continue`: every page is a consistent snapshot at the
//!   first page's resourceVersion (rebuilt from the history), and a continue token older than the
//!   compacted history gets `410 Expired`. `resourceVersion` + `resourceVersionMatch=Exact` lists
//!   at that version (410 if compacted); other non-zero versions mean "not older than" (504 if in
//!   the future). [`FakeApiServer::set_max_page_size`] caps pages below the client's `limit`.
//! - Selectors: `labelSelector` with `key`, `!key`, `key=value`, `key==value`, `key!=value`
//!   (comma-separated; set-based forms give 400), `fieldSelector` on `metadata.name` and
//!   `metadata.namespace` with `=`, `==`, `!=`.
//! - **WATCH** (`watch=true` or `watch=1`): a chunked stream of newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{...}}`. With `resourceVersion=N`
//!   it replays the history after N, then live events. Without a version (or `0`, or with
//!   `sendInitialEvents=true`) it first sends synthetic ADDED events for the current objects; with
//!   `sendInitialEvents=true` that phase ends with a BOOKMARK annotated `k8s.io/initial-events-end`.
//!   Selectors are applied per event like the watch cache does: an object that starts matching is
//!   sent as ADDED, one that stops matching as DELETED (its last matching state, carrying the
//!   event's resourceVersion).
//! - A watch from a version older than the compacted history gets one ERROR event with a
//!   `410 Expired` Status ("too old resource version"), and the stream ends.
//! - BOOKMARK events (only `kind`, `apiVersion`, `metadata.resourceVersion`) every
//!   [`FakeApiServer::set_bookmark_interval`] when `allowWatchBookmarks=true`; their version is
//!   the global one at the time, which is what lets a client resume after a compaction.
//! - `timeoutSeconds` ends the stream cleanly.
//!
//! The server runs on its own thread with its own current-thread tokio runtime, so the handle is
//! plain synchronous code, usable from `#[test]` and `#[tokio::test]` alike. Dropping the handle
//! stops the server and ends every connection.

#![allow(dead_code, reason = "test support: not every test uses every control")]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The resources the fake server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// The kind named in an object's `kind` field.
    pub fn from_name(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.path() == path)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
}

/// Handle to a running fake API server.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port.
    pub fn start() -> Self {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake API server listener");
        Self::start_on(listener)
    }

    /// Starts a server on an existing listener (for example one created inside a network
    /// namespace).
    pub fn start_on(listener: std::net::TcpListener) -> Self {
        listener
            .set_nonblocking(true)
            .expect("set fake API server listener non-blocking");
        let addr = listener
            .local_addr()
            .expect("fake API server local address");
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel();
        let server_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake API server runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("register fake API server listener");
                    serve(listener, server_shared, stopped).await;
                });
            })
            .expect("spawn fake API server thread");
        Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://IP:PORT`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or updates an object; the kind comes from its `kind` field. Fills in
    /// `apiVersion`, `metadata.namespace` (`default` for namespaced kinds), `uid` and
    /// `creationTimestamp` when missing, and assigns the next resourceVersion, which it returns.
    pub fn apply(&self, object: Value) -> u64 {
        let mut object = object;
        let kind_name = object["kind"]
            .as_str()
            .expect("object has a kind")
            .to_owned();
        let kind = Kind::from_name(&kind_name)
            .unwrap_or_else(|| panic!("the fake API server does not serve kind {kind_name}"));
        object["apiVersion"] = json!(kind.api_version());
        let name = object["metadata"]["name"]
            .as_str()
            .expect("object has metadata.name")
            .to_owned();
        let meta = object["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        let namespace = if kind.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };

        let mut inner = self.shared.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let key = (namespace, name);
        let prev = inner.store(kind).objects.get(&key).cloned();
        let uid = match prev.as_ref().map(|p| p["metadata"]["uid"].clone()) {
            Some(uid) if uid.is_string() => uid,
            _ => json!(format!("00000000-0000-4000-8000-{rv:012}")),
        };
        let created = prev
            .as_ref()
            .map(|p| p["metadata"]["creationTimestamp"].clone())
            .filter(Value::is_string)
            .unwrap_or_else(|| json!("2026-01-01T00:00:00Z"));
        let meta = object["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        meta.insert("uid".into(), uid);
        meta.entry("creationTimestamp").or_insert(created);
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        inner.store(kind).objects.insert(key, object.clone());
        let event_type = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        inner.record(
            kind,
            HistEvent {
                rv,
                event_type,
                prev,
                object,
            },
        );
        rv
    }

    /// Deletes an object (`namespace` is ignored for Nodes). Returns the deletion's
    /// resourceVersion, or `None` if there was no such object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let kind = Kind::from_name(kind)
            .unwrap_or_else(|| panic!("the fake API server does not serve kind {kind}"));
        let namespace = if kind.namespaced() { namespace } else { "" };
        let mut inner = self.shared.lock();
        let prev = inner
            .store(kind)
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))?;
        inner.rv += 1;
        let rv = inner.rv;
        let mut object = prev.clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.record(
            kind,
            HistEvent {
                rv,
                event_type: EventType::Deleted,
                prev: Some(prev),
                object,
            },
        );
        Some(rv)
    }

    /// Forgets all history: watches (and continue tokens) from older versions get 410 Gone.
    /// Open watch streams are not affected.
    pub fn compact(&self) {
        let mut inner = self.shared.lock();
        inner.compacted_rv = inner.rv;
        for store in inner.stores.values_mut() {
            store.history.clear();
        }
    }

    /// Ends every open watch stream cleanly (as a server-side timeout does).
    pub fn close_watches(&self) {
        let mut inner = self.shared.lock();
        for watch in inner.watches.drain(..) {
            let _ = watch.tx.send(WatchMsg::Close);
        }
    }

    /// The next `n` requests (any path) get HTTP `status_code` with a Status body.
    ///
    /// Note: kube's client retries 429, 503 and 504 by itself (`Config::default_retry`, up to 15
    /// times from 5 ms), so only other codes (500, 403, ...) reach a watcher as errors.
    pub fn fail_next(&self, n: u32, status_code: u16) {
        self.shared.lock().fail_next = (n, status_code);
    }

    /// Every list and watch of `kind` is answered 403 Forbidden from now on (a role without
    /// that permission).
    pub fn forbid(&self, kind: Kind) {
        self.shared.lock().forbidden.push(kind);
    }

    /// While unavailable, new connections are closed at once, requests on open connections are
    /// dropped without an answer, and open watch streams are aborted mid-stream.
    pub fn set_unavailable(&self, unavailable: bool) {
        let mut inner = self.shared.lock();
        inner.unavailable = unavailable;
        if unavailable {
            for watch in inner.watches.drain(..) {
                let _ = watch.tx.send(WatchMsg::Abort);
            }
        }
    }

    /// When each connection attempt refused while unavailable arrived, oldest first: a client
    /// that backs off leaves growing gaps, one that spins leaves thousands.
    pub fn refused_connections(&self) -> Vec<std::time::Instant> {
        self.shared.lock().refused.clone()
    }

    /// Caps LIST pages at `max` items (the smaller of this and the client's `limit` applies).
    pub fn set_max_page_size(&self, max: Option<usize>) {
        self.shared.lock().max_page_size = max;
    }

    /// How often watches that allow bookmarks get one (default 1 s). Applies to new watches.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval;
    }

    /// Path and query (as sent, percent-encoded) of every request, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Watch streams currently open, per kind.
    pub fn open_watches(&self, kind: Kind) -> usize {
        let mut inner = self.shared.lock();
        inner.watches.retain(|w| !w.tx.is_closed());
        inner.watches.iter().filter(|w| w.kind == kind).count()
    }

    /// Every BOOKMARK written to a watch stream: (kind, resourceVersion), oldest first.
    pub fn bookmarks(&self) -> Vec<(Kind, u64)> {
        self.shared.lock().bookmarks.clone()
    }

    /// How many ERROR 410 events watches have been sent.
    pub fn expired_watches(&self) -> usize {
        self.shared.lock().expired_watches
    }

    /// The stored objects of a kind, in key order.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        let mut inner = self.shared.lock();
        inner.store(kind).objects.values().cloned().collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Inner {
    rv: u64,
    /// History at or below this version is gone.
    compacted_rv: u64,
    stores: HashMap<Kind, Store>,
    watches: Vec<WatchSub>,
    /// (remaining, status code)
    fail_next: (u32, u16),
    /// Kinds every request for which is answered 403, as RBAC answers a denied list or watch.
    forbidden: Vec<Kind>,
    unavailable: bool,
    /// When each connection refused while unavailable arrived (the clients' retry pattern).
    refused: Vec<std::time::Instant>,
    requests: Vec<String>,
    max_page_size: Option<usize>,
    bookmark_interval: Duration,
    bookmarks: Vec<(Kind, u64)>,
    expired_watches: usize,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            // Start above 1 so "0" (any version) and real versions are never confused.
            rv: 100,
            compacted_rv: 0,
            stores: HashMap::new(),
            watches: Vec::new(),
            fail_next: (0, 500),
            forbidden: Vec::new(),
            unavailable: false,
            refused: Vec::new(),
            requests: Vec::new(),
            max_page_size: None,
            bookmark_interval: Duration::from_secs(1),
            bookmarks: Vec::new(),
            expired_watches: 0,
        }
    }
}

type Key = (String, String);

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<HistEvent>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

struct HistEvent {
    rv: u64,
    event_type: EventType,
    /// The object before this change (None for a creation).
    prev: Option<Value>,
    /// The object after this change (for a deletion: its last state, with the deletion's RV).
    object: Value,
}

struct WatchSub {
    kind: Kind,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

enum WatchMsg {
    Event(Arc<HistEvent>),
    /// A complete event, written as is.
    Raw(Value),
    Bookmark(u64),
    /// End the stream cleanly.
    Close,
    /// Break the connection.
    Abort,
}

impl Inner {
    fn store(&mut self, kind: Kind) -> &mut Store {
        self.stores.entry(kind).or_default()
    }

    /// Appends to the history and fans out to open watches of that kind. Called with the lock
    /// held, so every watch sees events in resourceVersion order and without gaps.
    fn record(&mut self, kind: Kind, event: HistEvent) {
        let event = Arc::new(event);
        self.store(kind).history.push(Arc::clone(&event));
        self.watches.retain(|watch| {
            watch.kind != kind || watch.tx.send(WatchMsg::Event(Arc::clone(&event))).is_ok()
        });
    }

    /// The objects of `kind` as they were at `rv` (which must not be older than the compacted
    /// history), rebuilt by undoing newer history.
    fn snapshot(&mut self, kind: Kind, rv: u64) -> BTreeMap<Key, Value> {
        let store = self.store(kind);
        let mut objects = store.objects.clone();
        for event in store.history.iter().rev().take_while(|e| e.rv > rv) {
            let key = key_of(&event.object);
            match &event.prev {
                Some(prev) => objects.insert(key, prev.clone()),
                None => objects.remove(&key),
            };
        }
        objects
    }
}

fn key_of(object: &Value) -> Key {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP

type Body = BoxBody<Bytes, io::Error>;

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        {
            let mut inner = shared.lock();
            if inner.unavailable {
                inner.refused.push(std::time::Instant::now());
                drop(stream);
                continue;
            }
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&shared), req));
            // Errors here are clients going away or deliberate aborts.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    {
        let mut inner = shared.lock();
        if inner.unavailable {
            // Makes hyper drop the connection without an answer.
            return Err(io::Error::other("fake API server is unavailable"));
        }
        inner.requests.push(target);
        if inner.fail_next.0 > 0 {
            inner.fail_next.0 -= 1;
            let code = inner.fail_next.1;
            return Ok(status_response(code, "injected failure"));
        }
    }
    if req.method() != Method::GET {
        return Ok(status_response(405, "only GET is served"));
    }
    let Some(kind) = Kind::from_path(req.uri().path()) else {
        return Ok(status_response(
            404,
            &format!(
                "the server could not find the requested resource ({})",
                req.uri().path()
            ),
        ));
    };
    if shared.lock().forbidden.contains(&kind) {
        return Ok(status_response(403, "forbidden by the test"));
    }
    let params: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let selector = match Selector::parse(
        params.get("labelSelector").map(String::as_str),
        params.get("fieldSelector").map(String::as_str),
    ) {
        Ok(selector) => selector,
        Err(message) => return Ok(status_response(400, &message)),
    };
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    Ok(if watch {
        watch_response(&shared, kind, &params, selector)
    } else {
        list_response(&shared, kind, &params, &selector)
    })
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("serialize response");
    let mut response = Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(io::Error::other)
            .boxed(),
    );
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn status_object(code: u16, message: &str) -> Value {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status_response(code: u16, message: &str) -> Response<Body> {
    json_response(code, &status_object(code, message))
}

// ---------------------------------------------------------------------------------------------
// LIST

fn list_response(
    shared: &Shared,
    kind: Kind,
    params: &HashMap<String, String>,
    selector: &Selector,
) -> Response<Body> {
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(0)) => None,
        Some(Ok(limit)) => Some(limit),
        Some(Err(_)) => return status_response(400, "limit must be a non-negative integer"),
    };
    let mut inner = shared.lock();
    let limit = match (limit, inner.max_page_size) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };

    let (list_rv, start_after) = if let Some(token) = params.get("continue") {
        let Some((rv, key)) = decode_continue(token) else {
            return status_response(400, "continue key is not valid");
        };
        if rv < inner.compacted_rv {
            return status_response(
                410,
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            );
        }
        (rv, Some(key))
    } else {
        let requested = params.get("resourceVersion").map(String::as_str);
        let exact = params.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
        match requested {
            None | Some("" | "0") => (inner.rv, None),
            Some(rv) => {
                let Ok(rv) = rv.parse::<u64>() else {
                    return status_response(400, "resourceVersion: Invalid value");
                };
                if rv > inner.rv {
                    return status_response(504, "Too large resource version");
                }
                if exact {
                    if rv < inner.compacted_rv {
                        return status_response(
                            410,
                            &format!("too old resource version: {rv} ({})", inner.compacted_rv),
                        );
                    }
                    (rv, None)
                } else {
                    (inner.rv, None)
                }
            }
        }
    };

    let objects = inner.snapshot(kind, list_rv);
    drop(inner);
    let mut matching = objects
        .into_iter()
        .filter(|(key, _)| start_after.as_ref().is_none_or(|after| key > after))
        .filter(|(_, object)| selector.matches(object));
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, mut object) in matching.by_ref() {
        if limit.is_some_and(|limit| items.len() >= limit) {
            // Put it back in the count below.
            let remaining = 1 + matching.count();
            let mut metadata = json!({"resourceVersion": list_rv.to_string()});
            if let Some(last_key) = &last_key {
                metadata["continue"] = json!(encode_continue(list_rv, last_key));
                metadata["remainingItemCount"] = json!(remaining);
            }
            return json_response(200, &list_body(kind, metadata, items));
        }
        strip_type_meta(&mut object);
        items.push(object);
        last_key = Some(key);
    }
    json_response(
        200,
        &list_body(kind, json!({"resourceVersion": list_rv.to_string()}), items),
    )
}

fn list_body(kind: Kind, metadata: Value, items: Vec<Value>) -> Value {
    json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    })
}

/// The real server omits `kind` and `apiVersion` from list items.
fn strip_type_meta(object: &mut Value) {
    if let Some(map) = object.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
}

/// Opaque-looking continue token: hex of `RV/namespace/name`.
fn encode_continue(rv: u64, key: &Key) -> String {
    format!("{rv}/{}/{}", key.0, key.1)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, Key)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let namespace = parts.next()?.to_owned();
    let name = parts.next()?.to_owned();
    Some((rv, (namespace, name)))
}

// ---------------------------------------------------------------------------------------------
// WATCH

fn watch_response(
    shared: &Arc<Shared>,
    kind: Kind,
    params: &HashMap<String, String>,
    selector: Selector,
) -> Response<Body> {
    let flag = |name: &str| matches!(params.get(name).map(String::as_str), Some("true" | "1"));
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial_events = flag("sendInitialEvents");
    let deadline = match params.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None => None,
        Some(Ok(secs)) => Some(Instant::now() + Duration::from_secs(secs)),
        Some(Err(_)) => return status_response(400, "timeoutSeconds must be an integer"),
    };
    let requested = match params.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return status_response(400, "resourceVersion: Invalid value"),
        },
    };

    let (tx, rx) = mpsc::unbounded_channel();
    let mut inner = shared.lock();
    let bookmark_interval = inner.bookmark_interval;
    match requested {
        Some(rv) if !send_initial_events => {
            if rv < inner.compacted_rv {
                let status = status_object(
                    410,
                    &format!("too old resource version: {rv} ({})", inner.compacted_rv),
                );
                inner.expired_watches += 1;
                let _ = tx.send(WatchMsg::Raw(json!({"type": "ERROR", "object": status})));
                let _ = tx.send(WatchMsg::Close);
            } else {
                for event in inner.store(kind).history.iter().filter(|e| e.rv > rv) {
                    let _ = tx.send(WatchMsg::Event(Arc::clone(event)));
                }
            }
        }
        _ => {
            // "Start at most recent" (no version), "any" (0), or a streaming list: synthetic
            // ADDED events for the current state.
            for object in inner.store(kind).objects.values() {
                if selector.matches(object) {
                    let _ = tx.send(WatchMsg::Raw(json!({"type": "ADDED", "object": object})));
                }
            }
            if send_initial_events {
                let mut bookmark = bookmark_object(kind, inner.rv);
                bookmark["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                let _ = tx.send(WatchMsg::Raw(
                    json!({"type": "BOOKMARK", "object": bookmark}),
                ));
            }
        }
    }
    inner.watches.push(WatchSub {
        kind,
        tx: tx.clone(),
    });
    drop(inner);

    let state = WatchState {
        shared: Arc::clone(shared),
        kind,
        selector,
        rx,
        tx,
        deadline,
        bookmarks: bookmarks.then(|| {
            tokio::time::interval_at(Instant::now() + bookmark_interval, bookmark_interval)
        }),
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        let frame = state.next_frame().await?;
        Some((frame, state))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn bookmark_object(kind: Kind, rv: u64) -> Value {
    json!({
        "kind": kind.name(),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
    })
}

struct WatchState {
    shared: Arc<Shared>,
    kind: Kind,
    selector: Selector,
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    /// Our own sender, to queue bookmarks behind the events already queued.
    tx: mpsc::UnboundedSender<WatchMsg>,
    deadline: Option<Instant>,
    bookmarks: Option<tokio::time::Interval>,
    done: bool,
}

impl WatchState {
    async fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, io::Error>> {
        loop {
            if self.done {
                return None;
            }
            let far = Instant::now() + Duration::from_secs(24 * 3600);
            let deadline = tokio::time::sleep_until(self.deadline.unwrap_or(far));
            let bookmarks = &mut self.bookmarks;
            let tick = async {
                match bookmarks {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                msg = self.rx.recv() => Some(msg),
                () = deadline => Some(None),
                _ = tick => None,
            };
            let Some(msg) = msg else {
                // Queued under the lock: every event up to this version is already queued.
                let inner = self.shared.lock();
                let _ = self.tx.send(WatchMsg::Bookmark(inner.rv));
                continue;
            };
            let line = match msg {
                None | Some(WatchMsg::Close) => {
                    self.done = true;
                    return None;
                }
                Some(WatchMsg::Abort) => {
                    self.done = true;
                    return Some(Err(io::Error::other("watch aborted: API unavailable")));
                }
                Some(WatchMsg::Raw(event)) => event,
                Some(WatchMsg::Bookmark(rv)) => {
                    self.shared.lock().bookmarks.push((self.kind, rv));
                    json!({"type": "BOOKMARK", "object": bookmark_object(self.kind, rv)})
                }
                Some(WatchMsg::Event(event)) => match self.render(&event) {
                    Some(line) => line,
                    None => continue,
                },
            };
            let mut bytes = serde_json::to_vec(&line).expect("serialize watch event");
            bytes.push(b'\n');
            return Some(Ok(Frame::data(Bytes::from(bytes))));
        }
    }

    /// A history event as this watch sees it through its selector (as the watch cache does).
    fn render(&self, event: &HistEvent) -> Option<Value> {
        let now = self.selector.matches(&event.object);
        let before = event
            .prev
            .as_ref()
            .is_some_and(|p| self.selector.matches(p));
        let (event_type, object) = match (event.event_type, before, now) {
            (EventType::Added, _, true) => ("ADDED", event.object.clone()),
            (EventType::Modified, true, true) => ("MODIFIED", event.object.clone()),
            (EventType::Modified, false, true) => ("ADDED", event.object.clone()),
            (EventType::Modified, true, false) => {
                let mut last = event.prev.clone().unwrap_or_default();
                last["metadata"]["resourceVersion"] = json!(event.rv.to_string());
                ("DELETED", last)
            }
            (EventType::Deleted, true, _) => ("DELETED", event.object.clone()),
            _ => return None,
        };
        Some(json!({"type": event_type, "object": object}))
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Default)]
struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

#[derive(Debug)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

#[derive(Debug)]
struct FieldReq {
    field: String,
    value: String,
    equal: bool,
}

impl Selector {
    fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        let mut selector = Selector::default();
        for term in labels.unwrap_or_default().split(',').map(str::trim) {
            if term.is_empty() {
                continue;
            }
            if term.contains('(') || term.contains(' ') {
                return Err(format!(
                    "unable to parse requirement: set-based selector {term:?} is not supported by the fake API server"
                ));
            }
            let req = if let Some(key) = term.strip_prefix('!') {
                LabelReq::NotExists(key.to_owned())
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelReq::NotEquals(key.to_owned(), value.to_owned())
            } else if let Some((key, value)) = term.split_once("==") {
                LabelReq::Equals(key.to_owned(), value.to_owned())
            } else if let Some((key, value)) = term.split_once('=') {
                LabelReq::Equals(key.to_owned(), value.to_owned())
            } else {
                LabelReq::Exists(term.to_owned())
            };
            let (LabelReq::Exists(key)
            | LabelReq::NotExists(key)
            | LabelReq::Equals(key, _)
            | LabelReq::NotEquals(key, _)) = &req;
            if key.is_empty() {
                return Err(format!("unable to parse requirement: {term:?}: empty key"));
            }
            selector.labels.push(req);
        }
        for term in fields.unwrap_or_default().split(',').map(str::trim) {
            if term.is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!("invalid field selector: {term:?}"));
            };
            if !matches!(field, "metadata.name" | "metadata.namespace") {
                return Err(format!(
                    "field label not supported: {field} (the fake API server supports metadata.name and metadata.namespace)"
                ));
            }
            selector.fields.push(FieldReq {
                field: field.to_owned(),
                value: value.to_owned(),
                equal,
            });
        }
        Ok(selector)
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = object["metadata"]["labels"].as_object();
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|req| match req {
            LabelReq::Exists(key) => label(key).is_some(),
            LabelReq::NotExists(key) => label(key).is_none(),
            LabelReq::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelReq::NotEquals(key, value) => label(key) != Some(value.as_str()),
        });
        labels_match
            && self.fields.iter().all(|req| {
                let actual = match req.field.as_str() {
                    "metadata.name" => object["metadata"]["name"].as_str(),
                    _ => object["metadata"]["namespace"].as_str(),
                };
                (actual.unwrap_or_default() == req.value) == req.equal
            })
    }
}
