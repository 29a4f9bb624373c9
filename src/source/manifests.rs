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
//!
//! Lasting faults (issue #20):
//!
//! - **A read that fails** (the directory cannot be listed, a file cannot be opened: EMFILE, EIO,
//!   a missing directory) keeps what was last read in effect and is retried with backoff (1 s
//!   doubling to 5 s, with jitter) until the directory has been read in full, so a change made
//!   during the fault is not lost. The source reports itself unreadable meanwhile
//!   ([`SourceStatus`]; /healthz turns 503 after 2 × sync-period), and readable again after.
//! - **A replaced directory** (deleted and recreated, renamed over, or a symlink to it swapped,
//!   as ConfigMap volumes and `kubectl cp` do) is followed: DIR's identity (device and inode,
//!   through symlinks) is checked every second and on any event about DIR itself, and the watch
//!   is set up again on the new directory, which is then read.
//! - **A transiently empty or truncated file** (`kubectl get ... > file` truncates first and
//!   writes later) does not wipe the node: a new version of a file from which objects holding
//!   most (more than half) of its service ports and endpoints are gone, or whose last line is
//!   incomplete (a write in progress), is held back, its previous content staying in effect,
//!   until the file has shown that same version for [`CONFIRM`]. An object that stays with less
//!   in it (an EndpointSlice scaled down) is an ordinary update, applied at once. Likewise when
//!   files disappear and take more than half of the directory's service ports with them. Each hold is logged at WARN and
//!   counted (`kproxy_source_removals_held_total`). Upstream wipes on an empty list.
//! - **Large files**: a file over [`MAX_FILE_BYTES`] is refused (reported; its previous content
//!   stays), and only a digest of each file's bytes is kept after parsing, never the text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{Hash as _, Hasher as _};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;

use super::slim::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Change, SERVICE_PROXY_NAME_LABEL, SourceStatus, Update};
use crate::retry::{Backoff, Jitter, Repeats, Say};

#[cfg(test)]
mod tests;

/// How long the watcher waits for a burst of file events to settle before reloading.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// How often DIR's identity is checked (a replaced directory is followed within this).
const POLL: Duration = Duration::from_secs(1);
/// How long a held-back removal must stay the same before it is applied.
pub const CONFIRM: Duration = Duration::from_secs(5);
/// The largest manifest file read. 64 MiB holds a `kubectl get -o yaml` export of about 40,000
/// Services; a larger file is refused with a warning, its previous content staying in effect.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Retries of a failed read: 1 s doubling to 5 s, plus jitter.
const RETRY: Backoff = Backoff {
    initial: Duration::from_secs(1),
    cap: Duration::from_secs(5),
};

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
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices, in file order, without those owned by another proxy or of headless
    /// Services.
    pub endpoint_slices: Vec<Arc<super::slim::Slice>>,
    /// This node's Node object, if a manifest holds it.
    pub node: Option<Arc<Node>>,
}

impl Loaded {
    /// The three Resets that describe this content, the Node first: the first sync starts as
    /// soon as Services and EndpointSlices are listed, and must already know the node's
    /// addresses (which a ClusterIP or external IP may not claim), as upstream knows them from
    /// the Node it reads before its first sync. Sent last, the Node could arrive just after
    /// that sync, which then refused a Service for another reason than every later sync.
    pub fn into_updates(self) -> [Update; 3] {
        [
            Update::Node(Change::Reset(self.node.into_iter().collect())),
            Update::Services(Change::Reset(self.services)),
            Update::EndpointSlices(Change::Reset(self.endpoint_slices)),
        ]
    }

    /// A digest of the content, so the source can tell a change without keeping a copy of
    /// everything it sent.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = HashWriter(std::hash::DefaultHasher::new());
        // Serializing typed objects cannot fail; a failure would only cost a redundant send.
        let _ = serde_json::to_writer(&mut hasher, &(&self.services, &self.endpoint_slices));
        let _ = serde_json::to_writer(&mut hasher, &self.node);
        hasher.0.finish()
    }
}

/// Feeds serialized bytes into a hasher.
struct HashWriter(std::hash::DefaultHasher);

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A digest of a file's bytes (length and a 64-bit hash): an unchanged file is neither re-parsed
/// nor re-reported, and its text is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest(u64, u64);

impl Digest {
    fn of(bytes: &[u8]) -> Self {
        let mut hasher = std::hash::DefaultHasher::new();
        bytes.hash(&mut hasher);
        Self(bytes.len() as u64, hasher.finish())
    }
}

/// Memory kept between loads: each file's last good content and the problems already reported,
/// so a broken file keeps its previous objects and its warning is logged once.
#[derive(Debug)]
pub struct LoadedFiles {
    node_name: String,
    files: BTreeMap<PathBuf, FileState>,
    /// Duplicate-object messages reported by the previous load.
    duplicates: BTreeSet<String>,
    /// How long a held-back removal must stay the same; zero: nothing is held.
    confirm: Duration,
    /// Whether a load completed before: the first one holds nothing back.
    loaded_once: bool,
}

impl LoadedFiles {
    /// Empty memory for a one-shot load that keeps only the Node named `node_name` (nothing is
    /// held back: see [`LoadedFiles::holding_removals`]).
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            files: BTreeMap::new(),
            duplicates: BTreeSet::new(),
            confirm: Duration::ZERO,
            loaded_once: false,
        }
    }

    /// Holds back removals of most of a file's (or the directory's) content, and versions of a
    /// file cut mid-line, until they have stayed the same for `confirm` (see the module
    /// documentation).
    pub fn holding_removals(mut self, confirm: Duration) -> Self {
        self.confirm = confirm;
        self
    }

    /// When the earliest held-back change may be confirmed.
    fn next_confirmation(&self) -> Option<Instant> {
        self.files
            .values()
            .filter_map(|f| {
                let held = f.held.as_ref().map(|h| h.since);
                held.into_iter().chain(f.missing_since).min()
            })
            .min()
            .map(|t| t + self.confirm)
    }
}

#[derive(Debug, Default)]
struct FileState {
    /// The digest of the bytes last read.
    digest: Option<Digest>,
    /// The objects in effect: the last version that parsed (and was not held back).
    good: Vec<Parsed>,
    /// Problems of the current (bad) version, already logged.
    reported: BTreeSet<String>,
    /// A version that parsed but is held back until confirmed.
    held: Option<Held>,
    /// The file is gone since then, but its removal is held back.
    missing_since: Option<Instant>,
}

#[derive(Debug)]
struct Held {
    digest: Digest,
    objects: Vec<Parsed>,
    /// When this version was first seen.
    since: Instant,
}

/// The outcome of one load of DIR.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// What the source sends.
    pub loaded: Loaded,
    /// Files that could not be read (the directory was listed): their previous content stays
    /// in effect, and the load must be retried.
    pub unreadable: Vec<String>,
    /// Removals that began to be held back in this load (logged; counted in the metric).
    pub holds_started: usize,
    /// When the earliest held-back change may be confirmed (the source reads again then).
    pub next_confirmation: Option<Instant>,
}

impl LoadReport {
    /// Whether every file was read (nothing to retry).
    pub fn complete(&self) -> bool {
        self.unreadable.is_empty()
    }
}

/// A parsed object, slimmed ([`super::slim`]) and shared with the cache: the source keeps each
/// file's objects to re-assemble the directory, and that is the only copy.
#[derive(Debug, Clone)]
enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<super::slim::Slice>),
    Node(Arc<Node>),
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
        let (kind, namespace, name) = match &self.object {
            Object::Service(o) => ("Service", &o.metadata.namespace, &o.metadata.name),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata.namespace, &o.metadata.name),
            Object::Node(o) => ("Node", &o.metadata.namespace, &o.metadata.name),
        };
        (
            kind,
            namespace.clone().unwrap_or_default(),
            name.clone().unwrap_or_default(),
        )
    }

    /// What this object contributes to traffic: its service ports or its endpoints.
    fn weight(&self) -> usize {
        match &self.object {
            Object::Service(s) => s
                .spec
                .as_ref()
                .and_then(|spec| spec.ports.as_ref())
                .map_or(0, Vec::len),
            Object::EndpointSlice(e) => e.endpoints.len(),
            Object::Node(_) => 0,
        }
    }
}

/// Service ports plus endpoints of `objects`.
fn weight(objects: &[Parsed]) -> usize {
    objects.iter().map(Parsed::weight).sum()
}

/// Service ports plus endpoints of the objects of `applied` that `new` no longer has. An object
/// that stays with less in it (an EndpointSlice scaled down from 3 endpoints to 1) is an update
/// the cluster made, applied at once; objects that vanish from a file are what a truncation
/// looks like.
fn removed_weight(applied: &[Parsed], new: &[Parsed]) -> usize {
    let kept: BTreeSet<_> = new.iter().map(Parsed::key).collect();
    applied
        .iter()
        .filter(|o| !kept.contains(&o.key()))
        .map(Parsed::weight)
        .sum()
}

/// The service ports of `objects`: what a directory's files taking most of them with them
/// would remove (deleting one Service's files among a few is an ordinary deletion).
fn service_ports(objects: &[Parsed]) -> usize {
    objects
        .iter()
        .filter(|o| matches!(o.object, Object::Service(_)))
        .map(Parsed::weight)
        .sum()
}

/// Whether a change from content of weight `before` to `after` removes most of it (more than
/// half): the change is then held back until confirmed.
pub fn removes_most(before: usize, after: usize) -> bool {
    before > 0 && after.saturating_mul(2) < before
}

/// Why a new version of a file is held back, if it is: `applied` and `new` are the weights of the
/// content in effect and of the new version, `removed` that of the objects in effect the new
/// version no longer has, `cut` whether its last line is incomplete. Held when most of the
/// weight goes and goes with vanished objects: a truncation, not a scale-down (objects stay) or
/// a rename (the weight stays).
fn hold_reason(applied: usize, new: usize, removed: usize, cut: bool) -> Option<&'static str> {
    if cut {
        Some("its last line is incomplete (a write in progress?)")
    } else if removes_most(applied, new) && removes_most(applied, applied.saturating_sub(removed)) {
        Some("objects holding most of the file's service ports and endpoints are gone from it")
    } else {
        None
    }
}

/// A YAML file whose last line has no newline: most likely a write cut short (kubectl, editors
/// and generators end files with one). JSON cut short does not parse, so it needs no rule.
fn cut_mid_line(path: &Path, text: &str) -> bool {
    !is_json(path) && !text.trim().is_empty() && !text.ends_with('\n')
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

/// DIR's identity: device and inode of the directory it names (through symlinks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity(u64, u64);

fn identity(dir: &Path) -> Option<Identity> {
    std::fs::metadata(dir)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|m| Identity(m.dev(), m.ino()))
}

/// An inotify watch on one directory (the one DIR named when it was set up).
struct Watch {
    _debouncer: notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    identity: Identity,
}

/// Watches the directory `dir` names now; the events go to `events`.
fn watch(
    dir: &Path,
    events: &mpsc::UnboundedSender<DebounceEventResult>,
) -> Result<Watch, ManifestsError> {
    let watch_error = |source| ManifestsError::Watch {
        dir: dir.to_path_buf(),
        source,
    };
    let events = events.clone();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |batch| {
        // Only fails once `run` has returned, when nobody needs the events any more.
        let _ = events.send(batch);
    })
    .map_err(watch_error)?;
    let before = identity(dir);
    debouncer
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    // Replaced while the watch was set up: the watch may be on either; say so.
    match (before, identity(dir)) {
        (Some(a), Some(b)) if a == b => Ok(Watch {
            _debouncer: debouncer,
            identity: a,
        }),
        _ => Err(ManifestsError::ReadDir {
            dir: dir.to_path_buf(),
            source: io::Error::other("the directory was replaced while it was being watched"),
        }),
    }
}

/// Loads DIR once, sends Reset for Services, EndpointSlices and Node (the Node named `node_name`,
/// or an empty Reset), then watches DIR and, within 1 s of any change on disk, re-sends the three
/// Resets with the new content. Runs until `tx` closes. See the module documentation for faults.
pub async fn run(
    dir: PathBuf,
    node_name: String,
    tx: mpsc::Sender<Update>,
) -> Result<(), ManifestsError> {
    run_with(
        dir,
        LoadedFiles::new(node_name).holding_removals(CONFIRM),
        tx,
    )
    .await
}

/// [`run`] with the given memory (tests choose the confirmation period).
async fn run_with(
    dir: PathBuf,
    mut files: LoadedFiles,
    tx: mpsc::Sender<Update>,
) -> Result<(), ManifestsError> {
    // A missing DIR is a start-up error with a clear message, not a watcher error.
    manifest_files(&dir)?;

    let (events_tx, mut events) = mpsc::unbounded_channel::<DebounceEventResult>();
    let mut watched: Option<Watch> = None;
    let mut sent: Option<u64> = None;
    let mut jitter = Jitter::from_entropy();
    let mut repeats = Repeats::default();
    // A failed read: when to retry, and which retry that is.
    let mut retry: Option<(Instant, u32)> = None;
    let mut unreadable_since: Option<std::time::SystemTime> = None;
    let mut next_confirmation: Option<Instant> = None;
    let mut rewatch = true;
    let mut reload = true;
    // The directory the last watch attempt was for (a failed attempt is retried with backoff,
    // or at once when DIR changes again).
    let mut tried: Option<Identity> = None;

    loop {
        if rewatch {
            rewatch = false;
            reload = true;
            // Watch before the load, so nothing written in between is missed.
            watched = None;
            tried = identity(&dir);
            match watch(&dir, &events_tx) {
                Ok(w) => {
                    tracing::debug!(dir = %dir.display(), "watching the manifests directory");
                    watched = Some(w);
                }
                // Reported with the failed load below (the directory is missing, or was
                // replaced meanwhile).
                Err(err) => tracing::debug!(error = %err, "cannot watch the manifests directory"),
            }
        }
        if reload {
            reload = false;
            let now = Instant::now();
            let (back, result) = load_blocking(dir.clone(), files, now).await?;
            files = back;
            let failure = match result {
                Ok(report) => {
                    next_confirmation = report.next_confirmation;
                    for _ in 0..report.holds_started {
                        if tx
                            .send(Update::Status(SourceStatus::RemovalHeld))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                    let failure = if report.complete() && watched.is_some() {
                        None
                    } else if let Some(file) = report.unreadable.first() {
                        Some(format!(
                            "{} file(s) cannot be read: {file}",
                            report.unreadable.len()
                        ))
                    } else {
                        Some(format!(
                            "cannot watch manifests directory {}",
                            dir.display()
                        ))
                    };
                    let fingerprint = report.loaded.fingerprint();
                    if sent == Some(fingerprint) {
                        tracing::debug!(dir = %dir.display(), "manifests reloaded, nothing changed");
                    } else {
                        let loaded = report.loaded;
                        tracing::info!(
                            dir = %dir.display(),
                            services = loaded.services.len(),
                            endpoint_slices = loaded.endpoint_slices.len(),
                            node = loaded.node.is_some(),
                            "{}",
                            if sent.is_none() { "manifests loaded" } else { "manifests changed" }
                        );
                        sent = Some(fingerprint);
                        if !send_all(&tx, loaded).await {
                            return Ok(());
                        }
                    }
                    failure
                }
                Err(err) => {
                    // Nothing can be confirmed without a read; the retry reads again.
                    next_confirmation = None;
                    Some(format!("{err}: {}", err_source(&err)))
                }
            };
            match failure {
                None => {
                    retry = None;
                    if let Some(run) = repeats.succeeded(now) {
                        tracing::info!(
                            dir = %dir.display(),
                            failed_attempts = run.failures,
                            unreadable_for = ?run.after,
                            "manifests directory read in full again"
                        );
                    }
                    if unreadable_since.take().is_some()
                        && tx
                            .send(Update::Status(SourceStatus::Readable))
                            .await
                            .is_err()
                    {
                        return Ok(());
                    }
                }
                Some(error) => {
                    let attempt = retry.map_or(0, |(_, n)| n);
                    let delay = RETRY.delay(attempt, jitter.next_unit());
                    retry = Some((now + delay, attempt.saturating_add(1)));
                    match repeats.failed(&error, now) {
                        Say::Failed => tracing::warn!(
                            %error,
                            retry_in = ?delay,
                            "cannot read the manifests in full; what was last read stays in effect"
                        ),
                        Say::StillFailing {
                            failures,
                            unlogged,
                            failing_for,
                        } => tracing::warn!(
                            %error,
                            failed_attempts = failures,
                            not_logged = unlogged,
                            ?failing_for,
                            retry_in = ?delay,
                            "manifests still cannot be read in full; what was last read stays in effect"
                        ),
                        Say::Quiet => {
                            tracing::debug!(%error, retry_in = ?delay, "manifests still unreadable")
                        }
                    }
                    if unreadable_since.is_none() {
                        let since = std::time::SystemTime::now();
                        unreadable_since = Some(since);
                        if tx
                            .send(Update::Status(SourceStatus::Unreadable { since, error }))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                    }
                }
            }
        }

        let deadline = [
            retry.map(|(at, _)| at),
            next_confirmation,
            Some(Instant::now() + POLL),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + POLL);
        tokio::select! {
            batch = events.recv() => {
                // `events_tx` lives as long as this loop: the channel never closes here.
                let Some(batch) = batch else {
                    return Err(ManifestsError::WatcherStopped { dir });
                };
                let mut seen = Relevance::of(batch, &dir);
                while let Ok(more) = events.try_recv() {
                    seen = seen.or(Relevance::of(more, &dir));
                }
                reload |= seen.reload;
                rewatch |= seen.root;
            }
            () = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if retry.is_some_and(|(at, _)| at <= now) {
                    reload = true;
                    rewatch |= watched.is_none();
                }
                if next_confirmation.is_some_and(|at| at <= now) {
                    reload = true;
                }
            }
            () = tx.closed() => return Ok(()),
        }
        // DIR replaced (deleted and recreated, renamed over, a symlink swapped): watch the new
        // directory and read it.
        let current = identity(&dir);
        let following = watched.as_ref().map_or(tried, |w| Some(w.identity));
        if current != following {
            if watched.is_some() {
                tracing::info!(dir = %dir.display(), "the manifests directory was replaced or removed; following it");
            }
            rewatch = true;
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

/// Runs [`load_dir_at`] off the async threads (it does blocking file I/O).
async fn load_blocking(
    dir: PathBuf,
    mut files: LoadedFiles,
    now: Instant,
) -> Result<(LoadedFiles, Result<LoadReport, ManifestsError>), ManifestsError> {
    Ok(tokio::task::spawn_blocking(move || {
        let loaded = load_dir_at(&dir, &mut files, now);
        (files, loaded)
    })
    .await?)
}

/// What a batch of debounced events means.
#[derive(Debug, Clone, Copy, Default)]
struct Relevance {
    /// DIR's content may have changed: read it again.
    reload: bool,
    /// An event about DIR itself (removed, renamed): set the watch up again.
    root: bool,
}

impl Relevance {
    /// Our own reads of the files show up as open/close-read events; they must not trigger
    /// another reload.
    fn of(batch: DebounceEventResult, dir: &Path) -> Self {
        match batch {
            Ok(events) => Self {
                reload: events.iter().any(|event| match event.kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                    EventKind::Access(_) => false,
                    _ => true,
                }),
                root: events.iter().any(|event| {
                    !matches!(event.kind, EventKind::Access(_))
                        && event.paths.iter().any(|p| p == dir)
                }),
            },
            Err(errors) => {
                for error in &errors {
                    tracing::warn!(%error, "manifests watcher error; reloading the directory");
                }
                Self {
                    reload: true,
                    root: true,
                }
            }
        }
    }

    fn or(self, other: Self) -> Self {
        Self {
            reload: self.reload || other.reload,
            root: self.root || other.root,
        }
    }
}

/// One-shot load: parses every `*.yaml`, `*.yml` and `*.json` file directly in `dir` (sorted by
/// name; not recursive, hidden files skipped). A file that fails to parse keeps the content it
/// had in `files` (nothing if it never parsed); problems are logged once with `tracing::warn!`.
/// Fails only when `dir` itself cannot be listed.
pub fn load_dir(dir: &Path, files: &mut LoadedFiles) -> Result<Loaded, ManifestsError> {
    load_dir_at(dir, files, Instant::now()).map(|report| report.loaded)
}

/// [`load_dir`] at `now`, with what the source needs to know beyond the content: files that
/// could not be read, and removals held back (see the module documentation).
pub fn load_dir_at(
    dir: &Path,
    files: &mut LoadedFiles,
    now: Instant,
) -> Result<LoadReport, ManifestsError> {
    let paths = manifest_files(dir)?;
    let holding = files.confirm > Duration::ZERO && files.loaded_once;
    let confirm = files.confirm;
    let before: usize = files.files.values().map(|f| service_ports(&f.good)).sum();
    let mut report = LoadReport::default();
    let mut missing: Vec<PathBuf> = files
        .files
        .keys()
        .filter(|p| paths.binary_search(p).is_err())
        .cloned()
        .collect();

    for path in &paths {
        match read_capped(path) {
            Ok(bytes) => {
                let state = files.files.entry(path.clone()).or_default();
                state.missing_since = None;
                let digest = Digest::of(&bytes);
                if state.digest == Some(digest) {
                    // Unchanged; a held version may be confirmed now.
                    if let Some(held) = &state.held
                        && held.digest == digest
                        && now.saturating_duration_since(held.since) >= confirm
                        && let Some(held) = state.held.take()
                    {
                        tracing::info!(file = %path.display(), held_for = ?now.saturating_duration_since(held.since), "held-back version of the manifest file confirmed; applying it");
                        state.good = held.objects;
                    }
                    continue;
                }
                state.digest = Some(digest);
                let (parsed, cut) = match std::str::from_utf8(&bytes) {
                    Ok(text) => (
                        if is_json(path) {
                            parse_json(text)
                        } else {
                            parse_file(text)
                        },
                        cut_mid_line(path, text),
                    ),
                    Err(err) => (Err(vec![file_problem(format!("not UTF-8: {err}"))]), false),
                };
                // The text is not kept: only its digest.
                drop(bytes);
                let reason = match &parsed {
                    Ok(objects) if holding => hold_reason(
                        weight(&state.good),
                        weight(objects),
                        removed_weight(&state.good, objects),
                        cut,
                    ),
                    _ => None,
                };
                match (parsed, reason) {
                    (Ok(objects), Some(reason)) => {
                        let since = now;
                        tracing::warn!(
                            file = %path.display(),
                            reason,
                            service_ports_and_endpoints_in_effect = weight(&state.good),
                            in_new_version = weight(&objects),
                            confirm_after = ?confirm,
                            "manifest file change held back: its previous content stays in effect until the new version stays the same for the confirmation period"
                        );
                        if weight(&state.good) > 0 {
                            report.holds_started += 1;
                        }
                        state.held = Some(Held {
                            digest,
                            objects,
                            since,
                        });
                    }
                    (parsed, _) => {
                        state.held = None;
                        update_file(path, state, parsed);
                    }
                }
            }
            // Deleted between the listing and the read: gone.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                if files.files.contains_key(path) {
                    missing.push(path.clone());
                }
            }
            Err(err) => {
                let state = files.files.entry(path.clone()).or_default();
                state.missing_since = None;
                // A held-back version is confirmed only by reading it again.
                state.held = None;
                if err.kind() == io::ErrorKind::FileTooLarge {
                    // Content, not a fault: reported once, not retried.
                    state.digest = None;
                    update_file(path, state, Err(vec![file_problem(err.to_string())]));
                } else {
                    // Read again on the retry.
                    state.digest = None;
                    report.unreadable.push(format!("{}: {err}", path.display()));
                    update_file(
                        path,
                        state,
                        Err(vec![file_problem(format!("cannot read: {err}"))]),
                    );
                }
            }
        }
    }

    // Files that are gone: applied at once, unless they take most of the directory's service
    // ports with them (an emptied or half-replaced directory).
    if !missing.is_empty() {
        let after: usize = files
            .files
            .iter()
            .filter(|(p, _)| !missing.contains(p))
            .map(|(_, f)| service_ports(&f.good))
            .sum();
        if holding && removes_most(before, after) {
            let mut started = 0;
            for path in &missing {
                if let Some(state) = files.files.get_mut(path) {
                    if state.missing_since.is_none() {
                        state.missing_since = Some(now);
                        started += 1;
                    }
                    let since = state.missing_since.unwrap_or(now);
                    if now.saturating_duration_since(since) >= confirm {
                        tracing::info!(file = %path.display(), "removal of the manifest file confirmed; applying it");
                        files.files.remove(path);
                    }
                }
            }
            if started > 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    files = started,
                    service_ports_in_effect = before,
                    left = after,
                    confirm_after = ?confirm,
                    "manifest files gone with most of the directory's service ports: the removal is held back until it stays so for the confirmation period"
                );
                report.holds_started += 1;
            }
        } else {
            for path in &missing {
                files.files.remove(path);
            }
        }
    }

    files.loaded_once |= report.complete();
    report.next_confirmation = files.next_confirmation();
    report.loaded = assemble(files);
    Ok(report)
}

/// Reads a file of at most [`MAX_FILE_BYTES`] (`FileTooLarge` otherwise).
fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    // Sized from the file's length: a buffer grown by doubling holds up to twice the file.
    let expected = file
        .metadata()
        .map_or(0, |m| m.len().min(MAX_FILE_BYTES + 1));
    let mut bytes = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "larger than {} MiB: not read (kproxy's limit per manifest file; split it)",
                MAX_FILE_BYTES >> 20
            ),
        ));
    }
    Ok(bytes)
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
    state.digest = Some(Digest::of(text.as_bytes()));
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
                    if service
                        .metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
                    {
                        tracing::debug!(file = %path.display(), service = ?service.metadata.name, "Service belongs to another proxy; ignored");
                    } else {
                        loaded.services.push(service.clone());
                    }
                }
                Object::EndpointSlice(slice) => {
                    if slice.not_proxied {
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
///
/// A list (`kubectl get -o json`, an export) is parsed one item at a time: the document is
/// first split into borrowed [`RawValue`] slices of the text, and each item becomes a JSON tree
/// only while it is typed. A tree of the whole list would take about eight times the file
/// (157 MiB for an 18 MiB list of 10,000 services and slices).
fn parse_json(text: &str) -> Result<Vec<Parsed>, Vec<Problem>> {
    let syntax = |err: serde_json::Error| {
        vec![Problem {
            document: 1,
            item: None,
            kind: None,
            object: None,
            reason: one_line(&err.to_string()),
        }]
    };
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    if text.trim_start().starts_with('{') {
        let mut fields: BTreeMap<String, &RawValue> = serde_json::from_str(text).map_err(syntax)?;
        let field = |fields: &BTreeMap<String, &RawValue>, name: &str| {
            fields
                .get(name)
                .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
        };
        let list_kind = field(&fields, "kind")
            .and_then(|kind| kind.as_str().map(str::to_owned))
            .filter(|kind| is_list(kind));
        match (list_kind, fields.remove("items")) {
            (Some(kind), Some(items)) if items.get().trim_start().starts_with('[') => {
                let items: Vec<&RawValue> = serde_json::from_str(items.get()).map_err(syntax)?;
                let api_version = field(&fields, "apiVersion");
                // The split above checked the syntax; a tree can still fail (nesting deeper than
                // serde_json's limit), and that fails the file as a syntax error would.
                let mut failed = None;
                let items = items.into_iter().map_while(|raw| {
                    serde_json::from_str(raw.get())
                        .map_err(|err| failed = Some(err))
                        .ok()
                });
                parse_list(&kind, api_version, items, 1, &mut objects, &mut problems);
                if let Some(err) = failed {
                    return Err(syntax(err));
                }
            }
            (_, items) => {
                // Not a list, or one without a list of items: the whole document as one tree,
                // from the fields already split.
                fields.extend(items.map(|raw| ("items".to_owned(), raw)));
                let mut value = serde_json::Map::new();
                for (name, raw) in fields {
                    value.insert(name, serde_json::from_str(raw.get()).map_err(syntax)?);
                }
                parse_document(Value::Object(value), 1, &mut objects, &mut problems);
            }
        }
    } else {
        let value: Value = serde_json::from_str(text).map_err(syntax)?;
        parse_document(value, 1, &mut objects, &mut problems);
    }
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
                // With the same limits as the parse above: the defaults would report a budget
                // breach (at the wrong place) for a large file instead of its real error.
                let reason = match serde_saphyr::from_multiple_with_options::<Value>(
                    &padded,
                    yaml_options(),
                ) {
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
    if is_list(&kind) {
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
        parse_list(
            &kind,
            api_version,
            items.into_iter(),
            document,
            objects,
            problems,
        );
        return;
    }
    parse_object(value, document, objects, problems);
}

/// `List`, or a typed list (`ServiceList`).
fn is_list(kind: &str) -> bool {
    kind.ends_with("List")
}

/// The items of a list document of this `kind`.
fn parse_list(
    kind: &str,
    api_version: Option<Value>,
    items: impl Iterator<Item = Value>,
    document: usize,
    objects: &mut Vec<Parsed>,
    problems: &mut Vec<Problem>,
) {
    // `kubectl get -o yaml` writes kind and apiVersion into each item; a typed list from the
    // API (ServiceList) leaves them out, so they come from the list.
    let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
    for (index, mut item) in items.enumerate() {
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

    strip_unused(&mut value);
    let object = match kind.as_str() {
        "Service" => typed::<k8s_openapi::api::core::v1::Service>(value)
            .map(|o| Object::Service(Arc::new(super::slim::service(o)))),
        "EndpointSlice" => typed::<EndpointSlice>(value)
            .map(|o| Object::EndpointSlice(Arc::new(super::slim::slice(o)))),
        _ => typed(value).map(|o| Object::Node(Arc::new(super::slim::node(o)))),
    };
    match object {
        Ok(object) => objects.push(Parsed { object, document }),
        Err(reason) => fail(reason),
    }
}

/// kubectl's copy of the whole object; often most of an export's bytes.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what exports carry in bulk and kproxy never reads (`metadata.managedFields`, kubectl's
/// last-applied annotation) before the object is typed: typing it would only allocate it once
/// more, and a managed field the API server would have rejected cannot fail the object. The
/// typed object is then slimmed ([`super::slim`]) to what kproxy keeps.
fn strip_unused(value: &mut Value) {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove(LAST_APPLIED);
        }
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
