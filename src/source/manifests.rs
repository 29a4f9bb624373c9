//! The `--manifests DIR` source: Services, EndpointSlices and this node's Node read from a
//! directory of YAML/JSON manifests instead of the Kubernetes API.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in DIR (not recursive, hidden files skipped)
//! is read in name order. A file may hold several YAML documents (`---`), and a document may be a
//! `List` (or `ServiceList`, `EndpointSliceList`, ...) whose `items` are read in turn. Kinds other
//! than Service (`v1`), EndpointSlice (`discovery.k8s.io/v1`) and Node (`v1`) are ignored.
//!
//! A file that does not parse is reported once per distinct problem and its previous good content
//! stays in effect, so a half-written file or a typo never takes Services away. Each change on disk
//! is picked up by a debounced inotify watch and re-sent as three [`Change::Reset`]s, only when the
//! result differs from what was last sent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Change, HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, Update};

#[cfg(test)]
mod tests;

/// How long the watcher waits for a burst of file events to settle before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Why the manifests source stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManifestsError {
    /// DIR does not exist, is not a directory or cannot be listed.
    #[error("cannot read manifests directory {}", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The inotify watch on DIR could not be set up.
    #[error("cannot watch manifests directory {}", dir.display())]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: notify::Error,
    },
    /// The file watcher went away (its thread ended).
    #[error("the watcher of manifests directory {} stopped", dir.display())]
    WatcherStopped {
        /// The directory.
        dir: PathBuf,
    },
    /// The blocking task that reads the directory did not finish.
    #[error("reading the manifests directory failed")]
    Task(#[from] tokio::task::JoinError),
}

/// What a load of DIR produced: exactly what the source sends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Services, in file order, without those owned by another proxy.
    pub services: Vec<Service>,
    /// EndpointSlices, in file order, without those owned by another proxy or of headless
    /// Services.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// This node's Node object, if a manifest holds it.
    pub node: Option<Node>,
}

impl Loaded {
    /// The three Resets that describe this content.
    pub fn into_updates(self) -> [Update; 3] {
        [
            Update::Services(Change::Reset(self.services)),
            Update::EndpointSlices(Change::Reset(self.endpoint_slices)),
            Update::Node(Change::Reset(self.node.into_iter().collect())),
        ]
    }
}

/// Memory kept between loads: each file's last good content and the problems already reported,
/// so a broken file keeps its previous objects and its warning is logged once.
#[derive(Debug, Default)]
pub struct LoadedFiles {
    node_name: String,
    files: BTreeMap<PathBuf, FileState>,
    /// Duplicate-object messages reported by the previous load.
    duplicates: BTreeSet<String>,
}

impl LoadedFiles {
    /// Empty memory for a source that keeps only the Node named `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            ..Self::default()
        }
    }
}

#[derive(Debug, Default)]
struct FileState {
    /// The bytes last read, so an unchanged file is neither re-parsed nor re-reported.
    bytes: Option<Vec<u8>>,
    /// The objects of the last version that parsed.
    good: Vec<Parsed>,
    /// Problems of the current (bad) version, already logged.
    reported: BTreeSet<String>,
}

#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per manifest object, the same objects the Resets carry unboxed"
)]
enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

#[derive(Debug, Clone)]
struct Parsed {
    object: Object,
    /// 1-based document index in the file.
    document: usize,
}

impl Parsed {
    /// `(kind, namespace, name)`.
    fn key(&self) -> (&'static str, String, String) {
        let (kind, meta) = match &self.object {
            Object::Service(o) => ("Service", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::Node(o) => ("Node", &o.metadata),
        };
        (
            kind,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

/// Why one document (or one item of a List) was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    /// 1-based document index; 0 for a problem with the whole file (unreadable).
    document: usize,
    /// 1-based index within a List's `items`.
    item: Option<usize>,
    kind: Option<String>,
    /// `namespace/name` or `name`.
    object: Option<String>,
    reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document > 0 {
            write!(f, "document {}", self.document)?;
            if let Some(item) = self.item {
                write!(f, ", item {item}")?;
            }
            if let (Some(kind), Some(object)) = (&self.kind, &self.object) {
                write!(f, " ({kind} {object})")?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.reason)
    }
}

/// Loads DIR once, sends Reset for Services, EndpointSlices and Node (the Node named `node_name`,
/// or an empty Reset), then watches DIR and, within 1 s of any change on disk, re-sends the three
/// Resets with the new content. Runs until `tx` closes.
pub async fn run(
    dir: PathBuf,
    node_name: String,
    tx: mpsc::Sender<Update>,
) -> Result<(), ManifestsError> {
    // A missing DIR is a start-up error with a clear message, not a watcher error.
    manifest_files(&dir)?;

    // Watch before the first load, so nothing written in between is missed.
    let (events_tx, mut events) = mpsc::unbounded_channel::<DebounceEventResult>();
    let watch_error = |source| ManifestsError::Watch {
        dir: dir.clone(),
        source,
    };
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |batch| {
        // Only fails once `run` has returned, when nobody needs the events any more.
        let _ = events_tx.send(batch);
    })
    .map_err(watch_error)?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;

    let (mut files, loaded) = load_blocking(dir.clone(), LoadedFiles::new(node_name)).await?;
    let mut sent = loaded?;
    tracing::info!(
        dir = %dir.display(),
        services = sent.services.len(),
        endpoint_slices = sent.endpoint_slices.len(),
        node = sent.node.is_some(),
        "manifests loaded"
    );
    if !send_all(&tx, sent.clone()).await {
        return Ok(());
    }

    loop {
        let batch = tokio::select! {
            batch = events.recv() => batch,
            () = tx.closed() => return Ok(()),
        };
        let Some(batch) = batch else {
            return Err(ManifestsError::WatcherStopped { dir });
        };
        let mut relevant = is_relevant(batch);
        while let Ok(more) = events.try_recv() {
            relevant |= is_relevant(more);
        }
        if !relevant {
            continue;
        }

        let (back, loaded) = load_blocking(dir.clone(), files).await?;
        files = back;
        match loaded {
            Ok(loaded) if loaded == sent => {
                tracing::debug!(dir = %dir.display(), "manifests reloaded, nothing changed");
            }
            Ok(loaded) => {
                tracing::info!(
                    dir = %dir.display(),
                    services = loaded.services.len(),
                    endpoint_slices = loaded.endpoint_slices.len(),
                    node = loaded.node.is_some(),
                    "manifests changed"
                );
                sent = loaded;
                if !send_all(&tx, sent.clone()).await {
                    return Ok(());
                }
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    cause = %err_source(&err),
                    "cannot reload manifests; the last loaded content stays in effect"
                );
            }
        }
    }
}

fn err_source(err: &ManifestsError) -> String {
    std::error::Error::source(err)
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Sends the three Resets; false once the receiver is gone.
async fn send_all(tx: &mpsc::Sender<Update>, loaded: Loaded) -> bool {
    for update in loaded.into_updates() {
        if tx.send(update).await.is_err() {
            return false;
        }
    }
    true
}

/// Runs [`load_dir`] off the async threads (it does blocking file I/O).
async fn load_blocking(
    dir: PathBuf,
    mut files: LoadedFiles,
) -> Result<(LoadedFiles, Result<Loaded, ManifestsError>), ManifestsError> {
    Ok(tokio::task::spawn_blocking(move || {
        let loaded = load_dir(&dir, &mut files);
        (files, loaded)
    })
    .await?)
}

/// Whether a batch of debounced events may have changed DIR. Our own reads of the files show up
/// as open/close-read events; they must not trigger another reload.
fn is_relevant(batch: DebounceEventResult) -> bool {
    match batch {
        Ok(events) => events.iter().any(|event| match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        }),
        Err(errors) => {
            for error in &errors {
                tracing::warn!(%error, "manifests watcher error; reloading the directory");
            }
            true
        }
    }
}

/// One-shot load: parses every `*.yaml`, `*.yml` and `*.json` file directly in `dir` (sorted by
/// name; not recursive, hidden files skipped). A file that fails to parse keeps the content it
/// had in `files` (nothing if it never parsed); problems are logged once with `tracing::warn!`.
/// Fails only when `dir` itself cannot be listed.
pub fn load_dir(dir: &Path, files: &mut LoadedFiles) -> Result<Loaded, ManifestsError> {
    let paths = manifest_files(dir)?;
    files.files.retain(|path, _| paths.contains(path));

    for path in &paths {
        match std::fs::read(path) {
            Ok(bytes) => {
                let state = files.files.entry(path.clone()).or_default();
                if state.bytes.as_ref() != Some(&bytes) {
                    let parsed = match std::str::from_utf8(&bytes) {
                        Ok(text) if is_json(path) => parse_json(text),
                        Ok(text) => parse_file(text),
                        Err(err) => Err(vec![file_problem(format!("not UTF-8: {err}"))]),
                    };
                    state.bytes = Some(bytes);
                    update_file(path, state, parsed);
                }
            }
            // Deleted between the listing and the read: gone.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                files.files.remove(path);
            }
            Err(err) => {
                let state = files.files.entry(path.clone()).or_default();
                state.bytes = None;
                update_file(
                    path,
                    state,
                    Err(vec![file_problem(format!("cannot read: {err}"))]),
                );
            }
        }
    }

    Ok(assemble(files))
}

/// Parses one file's `text` exactly as [`load_dir`] parses a file at `path` (JSON when it ends in
/// `.json`, YAML otherwise), with no directory involved: the fuzz target (`fuzz/`) feeds
/// arbitrary bytes through here. Problems are logged as for a real file.
pub fn parse_text(path: &Path, text: &str, node_name: &str) -> Loaded {
    let mut files = LoadedFiles::new(node_name);
    let state = files.files.entry(path.to_path_buf()).or_default();
    let parsed = if is_json(path) {
        parse_json(text)
    } else {
        parse_file(text)
    };
    state.bytes = Some(text.as_bytes().to_vec());
    update_file(path, state, parsed);
    assemble(&mut files)
}

fn file_problem(reason: String) -> Problem {
    Problem {
        document: 0,
        item: None,
        kind: None,
        object: None,
        reason,
    }
}

/// Records a file's new parse result: good content replaces the old, problems are logged
/// (each distinct one once) and leave the old content in place.
fn update_file(path: &Path, state: &mut FileState, parsed: Result<Vec<Parsed>, Vec<Problem>>) {
    match parsed {
        Ok(objects) => {
            if !state.reported.is_empty() {
                tracing::info!(file = %path.display(), "manifest file parses again");
                state.reported.clear();
            }
            state.good = objects;
        }
        Err(problems) => {
            let mut now = BTreeSet::new();
            for problem in problems {
                let message = problem.to_string();
                if !state.reported.contains(&message) {
                    tracing::warn!(
                        file = %path.display(),
                        document = problem.document,
                        item = problem.item,
                        kind = problem.kind.as_deref(),
                        object = problem.object.as_deref(),
                        reason = %problem.reason,
                        objects_kept = state.good.len(),
                        "invalid manifest file; its previous content stays in effect"
                    );
                }
                now.insert(message);
            }
            state.reported = now;
        }
    }
}

/// The manifest files directly in `dir`, sorted by name.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestsError> {
    let read_error = |source| ManifestsError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::debug!(file = ?name, "skipping a file whose name is not UTF-8");
            continue;
        };
        if name.starts_with('.') || !has_manifest_extension(name) {
            continue;
        }
        let path = entry.path();
        // Follows symlinks (a mounted ConfigMap's files are symlinks).
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => paths.push(path),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            // Reported when the read fails.
            Err(_) => paths.push(path),
        }
    }
    paths.sort();
    Ok(paths)
}

fn has_manifest_extension(name: &str) -> bool {
    let Some((_, ext)) = name.rsplit_once('.') else {
        return false;
    };
    ["yaml", "yml", "json"]
        .iter()
        .any(|known| ext.eq_ignore_ascii_case(known))
}

/// Combines the files' good content: first of each duplicate wins, label and node filters apply.
fn assemble(files: &mut LoadedFiles) -> Loaded {
    let mut loaded = Loaded::default();
    let mut seen: BTreeMap<(&'static str, String, String), (&Path, usize)> = BTreeMap::new();
    let mut duplicates = BTreeSet::new();

    for (path, state) in &files.files {
        for parsed in &state.good {
            let key = parsed.key();
            if let Some((first_file, first_doc)) = seen.get(&key) {
                let (kind, namespace, name) = &key;
                let object = object_name(namespace, name);
                let message = format!(
                    "{kind} {object} in {} document {} is ignored: already defined in {} document {}",
                    path.display(),
                    parsed.document,
                    first_file.display(),
                    first_doc,
                );
                if !files.duplicates.contains(&message) {
                    tracing::warn!(
                        kind,
                        object,
                        file = %path.display(),
                        document = parsed.document,
                        first_file = %first_file.display(),
                        first_document = first_doc,
                        "duplicate object ignored; the first definition wins"
                    );
                }
                duplicates.insert(message);
                continue;
            }
            seen.insert(key, (path, parsed.document));

            match &parsed.object {
                Object::Service(service) => {
                    if has_label(&service.metadata, SERVICE_PROXY_NAME_LABEL) {
                        tracing::debug!(file = %path.display(), service = ?service.metadata.name, "Service belongs to another proxy; ignored");
                    } else {
                        loaded.services.push(service.clone());
                    }
                }
                Object::EndpointSlice(slice) => {
                    if has_label(&slice.metadata, SERVICE_PROXY_NAME_LABEL)
                        || has_label(&slice.metadata, HEADLESS_LABEL)
                    {
                        tracing::debug!(file = %path.display(), slice = ?slice.metadata.name, "EndpointSlice belongs to another proxy or a headless Service; ignored");
                    } else {
                        loaded.endpoint_slices.push(slice.clone());
                    }
                }
                Object::Node(node) => {
                    if node.metadata.name.as_deref() == Some(files.node_name.as_str()) {
                        loaded.node = Some(node.clone());
                    } else {
                        tracing::debug!(file = %path.display(), node = ?node.metadata.name, "Node is not this node; ignored");
                    }
                }
            }
        }
    }

    files.duplicates = duplicates;
    loaded
}

fn has_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, key: &str) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(key))
}

fn object_name(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}/{name}")
    }
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// A JSON file: one document, parsed by serde_json (several times faster than the YAML parser
/// on the large generated lists that benchmarks and exports produce).
fn parse_json(text: &str) -> Result<Vec<Parsed>, Vec<Problem>> {
    let value: Value = serde_json::from_str(text).map_err(|err| {
        vec![Problem {
            document: 1,
            item: None,
            kind: None,
            object: None,
            reason: one_line(&err.to_string()),
        }]
    })?;
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    parse_document(value, 1, &mut objects, &mut problems);
    if problems.is_empty() {
        Ok(objects)
    } else {
        Err(problems)
    }
}

/// YAML parser limits: serde-saphyr's defaults (250,000 nodes) stop at about 5,000 services in
/// one file; these allow a 20,000-service export while still bounding memory on hostile input.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 20_000_000;
    budget.max_events = 50_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Parses one file: all its objects, or every problem found (then none of its objects count).
fn parse_file(text: &str) -> Result<Vec<Parsed>, Vec<Problem>> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (index, (first_line, chunk)) in split_documents(text).into_iter().enumerate() {
        let document = index + 1;
        let values = match serde_saphyr::from_multiple_with_options::<Value>(chunk, yaml_options())
        {
            Ok(values) => values,
            Err(_) => {
                // Parse again with the lines before the document blanked out, so the message
                // carries line numbers of the file rather than of the document. Errors are rare;
                // the cheap parse above is the common path.
                let padded = format!("{}{chunk}", "\n".repeat(first_line));
                let reason = match serde_saphyr::from_multiple::<Value>(&padded) {
                    Err(err) => err.to_string(),
                    Ok(_) => "invalid YAML".to_owned(),
                };
                problems.push(Problem {
                    document,
                    item: None,
                    kind: None,
                    object: None,
                    reason: one_line(&reason),
                });
                continue;
            }
        };
        for value in values {
            parse_document(value, document, &mut objects, &mut problems);
        }
    }
    if problems.is_empty() {
        Ok(objects)
    } else {
        Err(problems)
    }
}

/// The first line of a YAML error ("line 3 column 11: unclosed bracket '['"), without the
/// source snippet that follows it.
fn one_line(message: &str) -> String {
    let first = message
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("invalid YAML");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// Splits a YAML stream at its `---` lines: `(0-based first line, text)` per document. A `---`
/// at the start of a line always starts a document (YAML forbids it inside scalars), so this
/// agrees with the parser. Leading comments and directives belong to the first document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut starts = vec![(0usize, 0usize)];
    let mut offset = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        if let Some(rest) = line.strip_prefix("---")
            && (rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
        {
            starts.push((line_no, offset));
        }
        offset += line.len();
    }
    // A preamble without content (nothing, comments, directives) is not a document of its own.
    if let [(_, _), (_, second), ..] = starts[..]
        && text[..second].lines().all(|line| {
            let line = line.trim();
            line.is_empty() || line.starts_with('#') || line.starts_with('%')
        })
    {
        starts.remove(1);
    }
    let mut documents = Vec::with_capacity(starts.len());
    for (i, &(line, start)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |&(_, end)| end);
        documents.push((line, text.get(start..end).unwrap_or_default()));
    }
    documents
}

/// Dispatches one parsed YAML document on its `kind`.
fn parse_document(
    value: Value,
    document: usize,
    objects: &mut Vec<Parsed>,
    problems: &mut Vec<Problem>,
) {
    let problem = |reason: String| Problem {
        document,
        item: None,
        kind: None,
        object: None,
        reason,
    };
    let mut value = match value {
        Value::Null => return, // empty or comment-only document
        Value::Object(_) => value,
        other => {
            problems.push(problem(format!(
                "expected a Kubernetes object (a mapping), found {}",
                json_type(&other)
            )));
            return;
        }
    };
    let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        problems.push(problem("kind is missing or not a string".to_owned()));
        return;
    };
    if kind == "List" || kind.ends_with("List") {
        let api_version = value.get("apiVersion").cloned();
        let items = match value.get_mut("items").map(Value::take) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                problems.push(problem(format!(
                    "{kind}: items must be a list, found {}",
                    json_type(&other)
                )));
                return;
            }
        };
        // `kubectl get -o yaml` writes kind and apiVersion into each item; a typed list from
        // the API (ServiceList) leaves them out, so they come from the list.
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        for (index, mut item) in items.into_iter().enumerate() {
            if let (Some(item_kind), Some(fields)) = (item_kind, item.as_object_mut()) {
                fields
                    .entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_owned()));
                if let Some(api_version) = &api_version {
                    fields
                        .entry("apiVersion")
                        .or_insert_with(|| api_version.clone());
                }
            }
            let before = problems.len();
            parse_object(item, document, objects, problems);
            for problem in &mut problems[before..] {
                problem.item = Some(index + 1);
            }
        }
        return;
    }
    parse_object(value, document, objects, problems);
}

/// Turns one object into a Service, EndpointSlice or Node; other kinds are ignored.
fn parse_object(
    mut value: Value,
    document: usize,
    objects: &mut Vec<Parsed>,
    problems: &mut Vec<Problem>,
) {
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map(str::to_owned);

    let (expected_api, namespaced) = match kind.as_deref() {
        Some("Service") => ("v1", true),
        Some("EndpointSlice") => ("discovery.k8s.io/v1", true),
        Some("Node") => ("v1", false),
        Some(other) => {
            tracing::debug!(kind = other, document, name = ?name, "ignoring a manifest of a kind kproxy does not use");
            return;
        }
        None => {
            problems.push(Problem {
                document,
                item: None,
                kind: None,
                object: name,
                reason: format!(
                    "expected a Kubernetes object with a kind, found {}",
                    if value.is_object() {
                        "a mapping without kind"
                    } else {
                        json_type(&value)
                    }
                ),
            });
            return;
        }
    };
    let kind = kind.unwrap_or_default();

    // Like kubectl apply: a namespaced object without a namespace goes to `default`.
    let mut namespace = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .map(str::to_owned);
    if namespaced
        && namespace.is_none()
        && let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.insert("namespace".to_owned(), Value::String("default".to_owned()));
        namespace = Some("default".to_owned());
    }

    let mut fail = |reason: String| {
        problems.push(Problem {
            document,
            item: None,
            kind: Some(kind.clone()),
            object: name.as_ref().map(|name| {
                object_name(
                    if namespaced {
                        namespace.as_deref().unwrap_or_default()
                    } else {
                        ""
                    },
                    name,
                )
            }),
            reason,
        });
    };

    if api_version.as_deref() != Some(expected_api) {
        fail(match &api_version {
            Some(found) => {
                format!("apiVersion {found} is not supported for {kind}: expected {expected_api}")
            }
            None => format!("apiVersion is missing: expected {expected_api}"),
        });
        return;
    }
    if name.is_none() {
        fail("metadata.name is missing".to_owned());
        return;
    }

    let object = match kind.as_str() {
        "Service" => typed(value).map(Object::Service),
        "EndpointSlice" => typed(value).map(Object::EndpointSlice),
        _ => typed(value).map(Object::Node),
    };
    match object {
        Ok(object) => objects.push(Parsed { object, document }),
        Err(reason) => fail(reason),
    }
}

/// `serde_json::from_value` with the path of the offending field in the error.
fn typed<K: DeserializeOwned>(value: Value) -> Result<K, String> {
    serde_path_to_error::deserialize(value).map_err(|err| err.to_string())
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
