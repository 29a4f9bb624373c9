//! The data path: listening sockets and the connections and flows they carry, on worker threads
//! of their own.
//!
//! A socket per core: the data path has one worker thread per CPU, and every listener address
//! has one `SO_REUSEPORT` socket per worker. The kernel spreads connections and UDP flows over
//! the sockets by a hash of the 4-tuple, so accepting scales with the cores and each UDP socket
//! owns its flows (no shared flow table, no lock on the path of a datagram; buffers and pipe
//! pools are per thread). By default each worker runs a single-threaded runtime of its own
//! ([`Threads::PerCore`]): a connection is accepted, proxied and closed on one core, with no
//! cross-thread wake-up. The hash does not know which worker is free, so a worker about to
//! sleep first takes the connections waiting in busy workers' queues (`steal.rs`).
//! [`Threads::Shared`] makes the workers one multi-thread runtime instead, whose work stealing
//! keeps every core busy when a few heavy connections hash to one socket.
//!
//! Why not the control plane's runtime: the sync loop runs blocking kernel work
//! (`block_in_place`) and CPU-heavy builds of large clusters on its executor; proxied bytes must
//! not wait behind either, and a burst of connections must not delay a sync or the health
//! probes. The control plane only talks to the data path through [`DataPath::apply`], which is
//! synchronous: it binds sockets itself (so a bind error is reported to the sync), swaps
//! endpoint tables atomically (`arc-swap`), and waits until closed listeners are really closed.
//! A listener whose bind failed (its port is taken) keeps retrying in the background, from
//! 100 ms doubling to 5 s, and serves as soon as the port is free.
//!
//! Upgrades: [`DataPath::handover`] is what SIGTERM runs (see `handover.rs`).

mod copy;
mod handover;
pub mod pick;
mod socket;
mod steal;
mod tcp;
mod udp;

use kproxy_contract::clock::{Clock as _, SystemClock};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use kproxy_contract::{IpFamily, ServicePortName};
use tokio::runtime::Handle;
use tokio::sync::{Notify, oneshot, watch};

pub use copy::CopyMethod;
use pick::Affinity;

use crate::model::{ListenerKey, Table, Transport};

/// Data-path settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long one connect to an endpoint may take before the next endpoint is tried.
    pub connect_timeout: Duration,
    /// How many endpoints one new connection tries at most.
    pub max_attempts: usize,
    /// How long a connection to an endpoint that is no longer serving stays open.
    pub grace_period: Duration,
    /// How long an idle UDP flow lives.
    pub udp_idle_timeout: Duration,
    /// Data-path worker threads (each with its own socket on every listener address); 0 means
    /// one per CPU.
    pub workers: usize,
    /// How TCP bytes are copied.
    pub copy: CopyMethod,
    /// How the worker threads share the work.
    pub threads: Threads,
}

/// How the data path's threads share the work. Either way every listener address has one
/// `SO_REUSEPORT` socket per worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threads {
    /// A single-threaded runtime per thread, each serving its own sockets, so no cross-thread
    /// wake-up; a connection stays on the core that accepted it. A worker whose run queue empties
    /// takes the connections waiting in busy workers' accept queues (`steal.rs`). Measured ahead
    /// on connection rate and few-flow UDP (`benches/results/userspace.md`).
    #[default]
    PerCore,
    /// One multi-thread runtime: a busy thread's connections are taken over by an idle one (work
    /// stealing), so a few heavy connections hashed to one socket still use every core.
    Shared,
}

impl Threads {
    /// `KPROXY_USERSPACE_THREADS=shared` selects [`Threads::Shared`].
    pub fn from_env() -> Threads {
        match std::env::var("KPROXY_USERSPACE_THREADS").as_deref() {
            Ok("shared") => Threads::Shared,
            _ => Threads::PerCore,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(1),
            max_attempts: 4,
            grace_period: Duration::from_secs(10),
            udp_idle_timeout: Duration::from_secs(30),
            workers: 0,
            copy: CopyMethod::from_env(),
            threads: Threads::from_env(),
        }
    }
}

/// What a listener places new connections with. Swapped as a whole.
#[derive(Debug)]
pub(crate) struct Active {
    pub(crate) table: Arc<Table>,
    pub(crate) affinity: Option<Arc<Affinity>>,
}

/// A listener's state shared with its task and its connections.
///
/// It also carries the listener's lifecycle (the stop signal, its live tasks, its sockets'
/// inodes) rather than a channel of each kind per listener: a `watch` and an `mpsc` channel were
/// 850 bytes a listener, 8 MiB at 10,000 service ports (issue #17).
#[derive(Debug)]
pub(crate) struct ListenerState {
    pub(crate) key: ListenerKey,
    pub(crate) active: ArcSwap<Active>,
    /// Round-robin position.
    pub(crate) rr: AtomicUsize,
    /// Set once the listener closes; its tasks stop at the next wake-up.
    stopped: AtomicBool,
    /// Wakes the tasks when `stopped` is set.
    stop: Notify,
    /// How many of its tasks (accept loops, UDP shards, the bind retry) are alive.
    tasks: Mutex<usize>,
    /// Signalled when `tasks` reaches zero: every socket of the listener is closed.
    closed: Condvar,
    /// This process's sockets on the address (empty while the bind is being retried).
    inodes: Mutex<Vec<u64>>,
}

impl ListenerState {
    fn new(key: ListenerKey, active: Active) -> Self {
        Self {
            key,
            active: ArcSwap::from_pointee(active),
            rr: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            tasks: Mutex::new(0),
            closed: Condvar::new(),
            inodes: Mutex::new(Vec::new()),
        }
    }

    /// Tells every task of the listener to stop.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    /// Whether the listener was told to stop.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Completes once the listener is told to stop (at once if it already was).
    pub(crate) async fn stopped(&self) {
        loop {
            let notified = self.stop.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a stop in between is not missed.
            notified.as_mut().enable();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }

    /// A task of this listener: counted until it is dropped.
    fn task(self: &Arc<Self>) -> Task {
        if let Ok(mut n) = self.tasks.lock() {
            *n += 1;
        }
        Task(self.clone())
    }

    /// Waits up to `limit` until every task of the listener is gone.
    fn wait_closed(&self, limit: Duration) {
        if let Ok(n) = self.tasks.lock() {
            let _ = self.closed.wait_timeout_while(n, limit, |n| *n > 0);
        }
    }
}

/// One live task of a listener (see [`ListenerState::task`]); dropped with the task, and the
/// last one dropped says the listener's sockets are closed.
#[derive(Debug)]
pub(crate) struct Task(Arc<ListenerState>);

impl Task {
    /// The listener it belongs to.
    pub(crate) fn listener(&self) -> &ListenerState {
        &self.0
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Ok(mut n) = self.0.tasks.lock() {
            *n -= 1;
            if *n == 0 {
                self.0.closed.notify_all();
            }
        }
    }
}

/// State every task reads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The tables of the running listeners, for "is this connection's endpoint still serving".
    tables: ArcSwap<HashMap<ListenerKey, Arc<Table>>>,
    /// Bumped after every apply; connections re-check their endpoint.
    pub(crate) generation: watch::Sender<u64>,
    pub(crate) options: Options,
    /// Proxied TCP connections alive now.
    pub(crate) connections: AtomicUsize,
    /// Where workers about to sleep find other workers' waiting connections (per-core workers
    /// only, and only with more than one).
    pub(crate) spare: Option<Arc<steal::Spare>>,
}

impl Shared {
    /// Whether connections of `key` to `ep` stay up.
    pub(crate) fn keeps(&self, key: &ListenerKey, ep: std::net::SocketAddr) -> bool {
        self.tables
            .load()
            .get(key)
            .is_some_and(|t| t.keep.contains(&ep))
    }
}

struct Running {
    state: Arc<ListenerState>,
}

impl Running {
    fn close(&self) {
        self.state.stop();
    }
}

/// A listener no longer tracked stops, as its tasks would when the stop signal's sender was
/// dropped.
impl Drop for Running {
    fn drop(&mut self) {
        self.state.stop();
    }
}

/// A data-path thread: its runtime's handle, and the way to stop it.
struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

/// The listeners this process runs.
pub struct DataPath {
    workers: Vec<Worker>,
    handles: Arc<[Handle]>,
    /// How many listeners get a socket per thread; the others get one socket, placed on the
    /// threads in turn ([`Place`]).
    per_thread_listeners: usize,
    /// The thread the next one-socket listener goes to.
    next_thread: usize,
    shared: Arc<Shared>,
    running: BTreeMap<ListenerKey, Running>,
    affinity: HashMap<(ServicePortName, IpFamily), Arc<Affinity>>,
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath")
            .field("workers", &self.workers.len())
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One listener change the data path could not make.
#[derive(Debug)]
pub struct ListenerError {
    /// The listener.
    pub key: ListenerKey,
    /// Why.
    pub error: io::Error,
}

/// What [`DataPath::handover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handover {
    /// Listeners closed once another socket (the successor's) listened on their address.
    pub handed_over: usize,
    /// Listeners closed with no successor in sight by the deadline.
    pub without_successor: usize,
    /// How long the listeners stayed open after the request.
    pub listeners_open_for: Duration,
    /// Connections still open when the grace period ended (closed by the exit).
    pub connections_cut: usize,
    /// How long the established connections took to finish (up to the grace period).
    pub drained_in: Duration,
}

impl DataPath {
    /// Starts the worker threads (no listeners yet).
    pub fn new(options: Options) -> io::Result<DataPath> {
        socket::raise_nofile_limit();
        let n = if options.workers > 0 {
            options.workers
        } else {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        };
        let per_core = options.threads == Threads::PerCore;
        // A shared runtime steals work on its own; a single worker has no one to take from.
        let spare = if per_core && n > 1 {
            Some(steal::Spare::new(socket::listener_socket_budget())?)
        } else {
            None
        };
        let mut workers = Vec::with_capacity(n);
        for i in 0..(if per_core { n } else { 1 }) {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let spare = spare.clone();
            std::thread::Builder::new()
                .name(format!("kproxy-data-{i}"))
                .spawn(move || {
                    let built = if per_core {
                        let mut b = tokio::runtime::Builder::new_current_thread();
                        if let Some(spare) = spare {
                            b.on_thread_park(move || spare.before_park());
                        }
                        b.enable_all().build()
                    } else {
                        tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(n)
                            .thread_name("kproxy-data")
                            .enable_all()
                            .build()
                    };
                    let rt = match built {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    // Runs the listeners' tasks until the data path is dropped; dropping the
                    // runtime then drops every task, and with them every socket.
                    let _ = rt.block_on(stop_rx);
                })?;
            let handle = ready_rx
                .recv()
                .map_err(|_| io::Error::other("a data-path thread did not start"))??;
            workers.push(Worker {
                handle,
                stop: Some(stop_tx),
            });
        }
        // One socket per worker thread on every listener address, whichever runtime runs them.
        let handles: Arc<[Handle]> = (0..n)
            .map(|i| workers[i % workers.len()].handle.clone())
            .collect();
        let (generation, _) = watch::channel(0);
        let per_thread_listeners = socket::listener_socket_budget() / handles.len().max(1);
        Ok(DataPath {
            workers,
            handles,
            per_thread_listeners,
            next_thread: 0,
            shared: Arc::new(Shared {
                tables: ArcSwap::from_pointee(HashMap::new()),
                generation,
                options,
                connections: AtomicUsize::new(0),
                spare,
            }),
            running: BTreeMap::new(),
            affinity: HashMap::new(),
        })
    }

    /// The running listeners and their tables (a listener whose bind is being retried counts:
    /// it serves as soon as its port is free).
    pub fn listeners(&self) -> BTreeMap<ListenerKey, Arc<Table>> {
        self.running
            .iter()
            .map(|(k, r)| (*k, r.state.active.load().table.clone()))
            .collect()
    }

    /// Proxied TCP connections alive now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Closes, re-points and opens listeners. Closing waits (up to a second each) until the
    /// socket is closed, so a port can be bound again at once. Returns what could not be bound
    /// at once (retried in the background); everything else is applied.
    pub fn apply(
        &mut self,
        close: &[(ListenerKey, Arc<Table>)],
        update: &[(ListenerKey, Arc<Table>)],
        open: &[(ListenerKey, Arc<Table>)],
    ) -> Vec<ListenerError> {
        let mut errors = Vec::new();
        let mut closing = Vec::new();
        for (key, _) in close {
            if let Some(r) = self.running.remove(key) {
                r.close();
                closing.push(r);
            }
        }
        for r in closing {
            r.state.wait_closed(Duration::from_secs(1));
        }
        for (key, table) in update {
            match self.running.get(key) {
                Some(r) => {
                    let affinity = affinity_for(&mut self.affinity, table);
                    r.state.active.store(Arc::new(Active {
                        table: table.clone(),
                        affinity,
                    }));
                }
                None => {
                    if let Err(error) = self.open(*key, table.clone()) {
                        errors.push(ListenerError { key: *key, error });
                    }
                }
            }
        }
        for (key, table) in open {
            if let Some(r) = self.running.remove(key) {
                // Believed closed but running (a full resync after a failure): replace it.
                r.close();
                r.state.wait_closed(Duration::from_secs(1));
            }
            if let Err(error) = self.open(*key, table.clone()) {
                errors.push(ListenerError { key: *key, error });
            }
        }
        // Affinity of service ports no listener uses any more is forgotten.
        let used: HashSet<(ServicePortName, IpFamily)> = self
            .running
            .values()
            .map(|r| {
                let t = &r.state.active.load().table;
                (t.service.clone(), t.family)
            })
            .collect();
        self.affinity.retain(|k, _| used.contains(k));
        self.shared.tables.store(Arc::new(
            self.listeners().into_iter().collect::<HashMap<_, _>>(),
        ));
        self.shared.generation.send_modify(|g| *g += 1);
        errors
    }

    /// Starts a listener: one socket per worker. When the address cannot be bound, the listener
    /// is kept (it retries in the background) and the error returned.
    fn open(&mut self, key: ListenerKey, table: Arc<Table>) -> io::Result<()> {
        let affinity = affinity_for(&mut self.affinity, &table);
        let state = Arc::new(ListenerState::new(key, Active { table, affinity }));
        let place = Place::next(
            self.running.len(),
            self.per_thread_listeners,
            self.handles.len(),
            &mut self.next_thread,
        );
        let result = match bind(key, place.sockets) {
            Ok(sockets) => {
                start(place.threads(&self.handles), sockets, &state, &self.shared);
                Ok(())
            }
            Err(error) => {
                let retry = retry_bind(
                    self.handles.clone(),
                    place,
                    state.task(),
                    self.shared.clone(),
                );
                self.handles[0].spawn(retry);
                Err(error)
            }
        };
        self.running.insert(key, Running { state });
        result
    }

    /// What SIGTERM runs: hands every listener over to a successor and lets the established
    /// connections finish.
    ///
    /// Each listener keeps accepting until another socket (a new kproxy's, bound alongside
    /// through `SO_REUSEPORT`) listens on its address, or until `wait` has passed; then it takes
    /// what is in its accept queue and closes, so nothing queued is reset and new connections
    /// go to the successor. The established connections then have up to `grace` to finish
    /// before this returns (the process exits after it).
    pub fn handover(&self, wait: Duration, grace: Duration) -> Handover {
        let start = SystemClock.now();
        let mut report = Handover::default();
        let mut pending: Vec<&Running> = self.running.values().collect();
        loop {
            let now = handover::listening();
            pending.retain(|r| {
                let ours: HashSet<u64> = r
                    .state
                    .inodes
                    .lock()
                    .map(|i| i.iter().copied().collect())
                    .unwrap_or_default();
                if ours.is_empty() {
                    // Never bound: nothing to hand over.
                    r.close();
                    false
                } else if handover::has_successor(&now, &r.state.key, &ours) {
                    r.close();
                    report.handed_over += 1;
                    false
                } else {
                    true
                }
            });
            if pending.is_empty() || start.elapsed() >= wait {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for r in pending {
            r.close();
            report.without_successor += 1;
        }
        for r in self.running.values() {
            r.state.wait_closed(Duration::from_secs(1));
        }
        report.listeners_open_for = start.elapsed();
        let drain = SystemClock.now();
        while self.connections() > 0 && drain.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        report.drained_in = drain.elapsed();
        report.connections_cut = self.connections();
        report
    }
}

/// One socket per worker on `key` (all or none).
/// How many sockets a listener has, and the thread its first one is served on (the others on
/// the threads after it). A socket per thread spreads a busy service over every core; but
/// sockets cost a descriptor and kernel memory each, so past a budget (a quarter of the
/// open-file limit, [`socket::listener_socket_budget`]) listeners get one socket each, and
/// 10,000 services on a 64-core node hold about 10,000 listener sockets, not 640,000.
#[derive(Debug, Clone, Copy)]
struct Place {
    sockets: usize,
    first: usize,
}

impl Place {
    /// Where a new listener goes when `running` listeners are open already: a socket on each of
    /// the `threads` while fewer than `per_thread_listeners` are, else one socket on the thread
    /// after the last one-socket listener's.
    fn next(
        running: usize,
        per_thread_listeners: usize,
        threads: usize,
        last: &mut usize,
    ) -> Place {
        if running < per_thread_listeners {
            Place {
                sockets: threads,
                first: 0,
            }
        } else {
            *last = (*last + 1) % threads.max(1);
            Place {
                sockets: 1,
                first: *last,
            }
        }
    }

    /// The threads the sockets go to, in order.
    fn threads(self, handles: &[Handle]) -> impl Iterator<Item = &Handle> {
        handles.iter().cycle().skip(self.first)
    }
}

fn bind(key: ListenerKey, n: usize) -> io::Result<Vec<Bound>> {
    (0..n)
        .map(|_| match key.transport {
            Transport::Tcp => socket::tcp_listener(key.addr).map(Bound::Tcp),
            Transport::Udp => socket::udp_socket(key.addr).map(Bound::Udp),
        })
        .collect()
}

enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// Starts one task per socket, each on the next of `threads` (see [`Place::threads`]).
fn start<'a>(
    threads: impl Iterator<Item = &'a Handle>,
    sockets: Vec<Bound>,
    state: &Arc<ListenerState>,
    shared: &Arc<Shared>,
) {
    let mut ids = Vec::with_capacity(sockets.len());
    for (handle, socket) in threads.zip(sockets) {
        let (task, shared) = (state.task(), shared.clone());
        match socket {
            Bound::Tcp(l) => {
                ids.push(socket::inode(&l));
                handle.spawn(tcp::serve(l, state.clone(), shared, task));
            }
            Bound::Udp(s) => {
                ids.push(socket::inode(&s));
                handle.spawn(udp::serve(s, state.clone(), shared, task));
            }
        }
    }
    if let Ok(mut i) = state.inodes.lock() {
        *i = ids;
    }
}

/// Binds a listener whose port was taken, from 100 ms doubling to 5 s, until it works or the
/// listener is closed.
async fn retry_bind(handles: Arc<[Handle]>, place: Place, task: Task, shared: Arc<Shared>) {
    let state = &task.0;
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 1u32;
    loop {
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = state.stopped() => return,
        }
        if state.is_stopped() {
            return;
        }
        attempts += 1;
        match bind(state.key, place.sockets) {
            Ok(sockets) => {
                tracing::info!(listener = %state.key, attempts, "listening now");
                // The serve tasks are counted before this one ends.
                start(place.threads(&handles), sockets, state, &shared);
                return;
            }
            Err(err) => {
                tracing::debug!(listener = %state.key, error = %err, "still cannot listen");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The affinity state of `table`'s service port, shared by its frontends.
fn affinity_for(
    all: &mut HashMap<(ServicePortName, IpFamily), Arc<Affinity>>,
    table: &Table,
) -> Option<Arc<Affinity>> {
    table.affinity?;
    Some(
        all.entry((table.service.clone(), table.family))
            .or_default()
            .clone(),
    )
}

impl Drop for DataPath {
    /// Tells every worker to stop; each drops its runtime (and every socket) on its own thread,
    /// so this never blocks the control plane.
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests;
