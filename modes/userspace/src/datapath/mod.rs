//! The data path: listening sockets and the connections and flows they carry, on a tokio
//! runtime of their own.
//!
//! Why a separate multi-thread runtime rather than the control plane's: the sync loop runs
//! blocking kernel work (`block_in_place`) and CPU-heavy builds of large clusters on its
//! executor; proxied bytes must not wait behind either, and a burst of connections must not
//! delay a sync or the health probes. Two runtimes keep the two latencies independent, and the
//! data path's threads (`kproxy-data`) show up separately in `top -H`. The control plane only
//! talks to the data path through [`DataPath::apply`], which is synchronous: it binds sockets
//! itself (so a bind error is reported to the sync), swaps endpoint tables atomically
//! (`arc-swap`), and waits until closed listeners are really closed.

mod copy;
pub mod pick;
mod socket;
mod tcp;
mod udp;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use arc_swap::ArcSwap;
use kproxy_contract::{IpFamily, ServicePortName};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::AbortHandle;

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
    /// Worker threads of the data-path runtime; 0 means one per CPU.
    pub workers: usize,
    /// How TCP bytes are copied.
    pub copy: CopyMethod,
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
#[derive(Debug)]
pub(crate) struct ListenerState {
    pub(crate) key: ListenerKey,
    pub(crate) active: ArcSwap<Active>,
    /// Round-robin position.
    pub(crate) rr: AtomicUsize,
}

/// State every task reads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The tables of the running listeners, for "is this connection's endpoint still serving".
    tables: ArcSwap<HashMap<ListenerKey, Arc<Table>>>,
    /// Bumped after every apply; connections re-check their endpoint.
    pub(crate) generation: watch::Sender<u64>,
    pub(crate) options: Options,
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
    task: AbortHandle,
    /// Disconnects when the task (and so the socket) is gone.
    closed: std::sync::mpsc::Receiver<()>,
}

/// The listeners this process runs.
pub struct DataPath {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    running: BTreeMap<ListenerKey, Running>,
    /// Wanted listeners whose socket could not be bound (retried on the next full sync).
    failed: BTreeMap<ListenerKey, Arc<Table>>,
    affinity: HashMap<(ServicePortName, IpFamily), Arc<Affinity>>,
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath")
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .field("failed", &self.failed.keys().collect::<Vec<_>>())
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

impl DataPath {
    /// Starts the runtime (no listeners yet).
    pub fn new(options: Options) -> io::Result<DataPath> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name("kproxy-data");
        if options.workers > 0 {
            builder.worker_threads(options.workers);
        }
        let runtime = builder.build()?;
        let (generation, _) = watch::channel(0);
        Ok(DataPath {
            runtime: Some(runtime),
            shared: Arc::new(Shared {
                tables: ArcSwap::from_pointee(HashMap::new()),
                generation,
                options,
            }),
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            affinity: HashMap::new(),
        })
    }

    /// The running listeners and their tables.
    pub fn listeners(&self) -> BTreeMap<ListenerKey, Arc<Table>> {
        self.running
            .iter()
            .map(|(k, r)| (*k, r.state.active.load().table.clone()))
            .collect()
    }

    /// Whether a wanted listener is not running (its bind failed).
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Closes, re-points and opens listeners. Closing waits (up to a second each) until the
    /// socket is closed, so a port can be bound again at once. Returns what could not be opened;
    /// everything else is applied.
    pub fn apply(
        &mut self,
        close: &[(ListenerKey, Arc<Table>)],
        update: &[(ListenerKey, Arc<Table>)],
        open: &[(ListenerKey, Arc<Table>)],
    ) -> Vec<ListenerError> {
        let mut errors = Vec::new();
        let mut closing = Vec::new();
        for (key, _) in close {
            self.failed.remove(key);
            if let Some(r) = self.running.remove(key) {
                r.task.abort();
                closing.push(r.closed);
            }
        }
        for closed in closing {
            let _ = closed.recv_timeout(Duration::from_secs(1));
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
                r.task.abort();
                let _ = r.closed.recv_timeout(Duration::from_secs(1));
            }
            if let Err(error) = self.open(*key, table.clone()) {
                errors.push(ListenerError { key: *key, error });
            }
        }
        // Affinity of service ports no listener uses any more is forgotten.
        let used: std::collections::HashSet<(ServicePortName, IpFamily)> = self
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

    fn open(&mut self, key: ListenerKey, table: Arc<Table>) -> io::Result<()> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| io::Error::other("the data path is shut down"))?;
        let affinity = affinity_for(&mut self.affinity, &table);
        let state = Arc::new(ListenerState {
            key,
            active: ArcSwap::from_pointee(Active {
                table: table.clone(),
                affinity,
            }),
            rr: AtomicUsize::new(0),
        });
        let (tx, closed) = std::sync::mpsc::channel();
        // Sockets become tokio sockets inside the data-path runtime's context.
        let _enter = runtime.enter();
        let shared = self.shared.clone();
        let task = match key.transport {
            Transport::Tcp => {
                let listener = match socket::tcp_listener(key.addr) {
                    Ok(l) => tokio::net::TcpListener::from_std(l),
                    Err(e) => Err(e),
                };
                match listener {
                    Ok(l) => runtime.spawn(tcp::serve(l, state.clone(), shared, tx)),
                    Err(e) => {
                        self.failed.insert(key, table);
                        return Err(e);
                    }
                }
            }
            Transport::Udp => {
                let socket = match socket::udp_socket(key.addr) {
                    Ok(s) => tokio::net::UdpSocket::from_std(s),
                    Err(e) => Err(e),
                };
                match socket {
                    Ok(s) => runtime.spawn(udp::serve(s, state.clone(), shared, tx)),
                    Err(e) => {
                        self.failed.insert(key, table);
                        return Err(e);
                    }
                }
            }
        };
        self.failed.remove(&key);
        self.running.insert(
            key,
            Running {
                state,
                task: task.abort_handle(),
                closed,
            },
        );
        Ok(())
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
    /// Dropped from inside the control plane's runtime: a runtime may not be dropped (blocking)
    /// there, so its threads are told to stop in the background.
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
