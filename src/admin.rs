//! The admin socket: a running daemon answers `kproxy services` with what it last applied.
//!
//! A Unix socket (default `/run/kproxy/kproxy.sock`, mode 0600) rather than another TCP port:
//! nothing new listens on the network, only root on the node can ask, and `kubectl exec` into
//! the DaemonSet's pod reaches it. It speaks plain HTTP/1.1 so `curl --unix-socket` works too:
//! `GET /services` answers JSON, `GET /services?output=table` the table.
//!
//! The path is shared with whatever else is on the node, so kproxy never deletes what is not
//! its own:
//! - its parent directory is opened without following a symbolic link (a symlinked parent is
//!   refused), and every later step goes through that directory's descriptor (`*at` calls, and
//!   `/proc/self/fd/N/NAME` for bind and connect), so the directory cannot be swapped after the
//!   check;
//! - a file at the path that is not a socket is left alone (and reported);
//! - a socket that accepts a connection belongs to a running daemon (the old kproxy of a
//!   rolling update with surge): it is left alone, and binding is retried every 5 s until that
//!   daemon has gone; a socket that refuses connections is stale (a killed daemon's) and is
//!   replaced;
//! - on exit the path is removed only if it is still the socket this daemon bound (same device
//!   and inode), so two daemons given one path never remove each other's socket. The check runs
//!   while a duplicate of the listening descriptor is still open: a bound Unix socket holds its
//!   file's inode, so the inode number cannot have been handed to a newer socket yet (file
//!   systems such as ext4 reuse a freed number at once).
//!
//! While the socket cannot be bound it is counted in `kproxy_unbound_listeners{listener="admin"}`.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

/// The default socket path (a configuration default: [`crate::config::defaults`]).
pub use crate::config::defaults::ADMIN_SOCKET as DEFAULT_SOCKET;

/// What the daemon last applied: the build of its last successful sync (its desired state and
/// the objects it skipped), shared with the sync loop rather than copied.
pub type Applied = crate::desired_state::Built;

/// Where the sync loop publishes each applied state.
pub type Publisher = watch::Sender<Option<Arc<Applied>>>;

/// The admin socket serves the last applied build: it follows the sync loop's outcomes.
impl crate::sync::Follower for Publisher {
    fn on(&mut self, event: &crate::sync::Event<'_>) {
        if let crate::sync::Event::Synced(outcome) = event {
            self.send_replace(Some(outcome.built.clone()));
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct ServicesQuery {
    output: Option<String>,
}

async fn services(
    State(rx): State<watch::Receiver<Option<Arc<Applied>>>>,
    Query(q): Query<ServicesQuery>,
) -> Response {
    let Some(applied) = rx.borrow().clone() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "kproxy has not completed its first sync yet\n",
        )
            .into_response();
    };
    let skipped: Vec<String> = applied.skipped.iter().map(ToString::to_string).collect();
    match q.output.as_deref() {
        Some("table") => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            crate::services::to_table(&applied.state, &skipped),
        )
            .into_response(),
        None | Some("json") => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{:#}\n", crate::services::to_json(&applied.state, &skipped)),
        )
            .into_response(),
        Some(other) => (
            StatusCode::BAD_REQUEST,
            format!("unknown output {other:?}: use json or table\n"),
        )
            .into_response(),
    }
}

/// The admin socket server; dropping it stops the server and removes the socket file if it is
/// still the one this server bound.
#[derive(Debug)]
pub struct AdminServer {
    task: tokio::task::JoinHandle<()>,
    bound: Arc<Mutex<Option<Bound>>>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
        let bound = self
            .bound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(b) = bound {
            b.remove_if_ours();
        }
    }
}

/// Why the socket cannot be bound now.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The path has no file name (`/`, `..`).
    #[error("{0} names no file")]
    NoFileName(PathBuf),
    /// The parent directory is a symbolic link (or not a directory).
    #[error(
        "its directory {0} is a symbolic link or not a directory; kproxy does not follow it \
         (give the real directory)"
    )]
    Parent(PathBuf, #[source] nix::Error),
    /// Something that is not a socket is at the path.
    #[error(
        "{0} exists and is not a socket; kproxy leaves it alone (remove it, or pick another path)"
    )]
    NotASocket(PathBuf),
    /// A running daemon answers on the path.
    #[error("{0} is served by another running process (an old kproxy?); waiting for it to go")]
    InUse(PathBuf),
    /// Anything else.
    #[error("{what} {path}")]
    Io {
        /// What failed.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The socket file this daemon bound: its directory (held open) and identity.
#[derive(Debug)]
struct Bound {
    dir: OwnedFd,
    name: OsString,
    dev: u64,
    ino: u64,
    /// A duplicate of the listening socket: while it is open the socket holds its file's inode,
    /// so `(dev, ino)` names that file and no other until this record is dropped.
    _pin: OwnedFd,
}

impl Bound {
    /// Removes the socket file if the path still names the socket this daemon bound.
    fn remove_if_ours(&self) {
        use nix::fcntl::AtFlags;
        match nix::sys::stat::fstatat(
            &self.dir,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if is_socket(&st) && st.st_dev == self.dev && st.st_ino == self.ino => {
                let _ = nix::unistd::unlinkat(
                    &self.dir,
                    self.name.as_os_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
            Ok(_) => tracing::debug!("the admin socket path now holds another file; left alone"),
            Err(_) => {}
        }
    }
}

fn is_socket(st: &nix::sys::stat::FileStat) -> bool {
    nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
        == nix::sys::stat::SFlag::S_IFSOCK
}

/// Whether a process listens on the Unix socket at `path`: a non-blocking connect, so a daemon
/// whose backlog is full (alive, but slow) counts as listening instead of blocking the caller.
fn probe(path: &Path) -> nix::Result<bool> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) | Err(nix::Error::EAGAIN | nix::Error::EINPROGRESS) => Ok(true),
        Err(nix::Error::ECONNREFUSED) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Binds `path` under the rules of the module documentation.
fn bind(path: &Path) -> Result<(tokio::net::UnixListener, Bound), BindError> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::Mode;
    let io = |what: &'static str| {
        let path = path.to_path_buf();
        move |source: std::io::Error| BindError::Io { what, path, source }
    };
    let name = path
        .file_name()
        .ok_or_else(|| BindError::NoFileName(path.to_path_buf()))?
        .to_os_string();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.exists() {
        std::fs::create_dir_all(parent).map_err(io("creating the directory of"))?;
    }
    let dir = nix::fcntl::open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BindError::Parent(parent.to_path_buf(), e))?;
    // The directory as opened, whatever its path names by now.
    let via = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(&name);
    match nix::sys::stat::fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(io("inspecting")(e.into())),
        Ok(st) if !is_socket(&st) => return Err(BindError::NotASocket(path.to_path_buf())),
        Ok(_) => match probe(&via) {
            Ok(true) => return Err(BindError::InUse(path.to_path_buf())),
            Ok(false) => {
                // Stale: its daemon is gone.
                nix::unistd::unlinkat(
                    &dir,
                    name.as_os_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|e| io("removing the stale socket")(e.into()))?;
            }
            Err(e) => return Err(io("probing the socket")(e.into())),
        },
    }
    let listener = std::os::unix::net::UnixListener::bind(&via).map_err(io("binding"))?;
    let st = nix::sys::stat::fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| io("inspecting")(e.into()))?;
    nix::sys::stat::fchmodat(
        &dir,
        name.as_os_str(),
        Mode::from_bits_truncate(0o600),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| io("chmod 0600")(e.into()))?;
    listener.set_nonblocking(true).map_err(io("binding"))?;
    let pin = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .map_err(io("binding"))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(io("binding"))?;
    Ok((
        listener,
        Bound {
            dir,
            name,
            dev: st.st_dev,
            ino: st.st_ino,
            _pin: pin,
        },
    ))
}

/// Serves the published state on `path` until dropped, binding it as soon as it can (see the
/// module documentation); `unbound` counts it while it cannot.
pub fn spawn(
    path: &Path,
    rx: watch::Receiver<Option<Arc<Applied>>>,
    unbound: crate::listeners::Unbound,
) -> AdminServer {
    let bound: Arc<Mutex<Option<Bound>>> = Arc::default();
    let shared = bound.clone();
    let path = path.to_path_buf();
    let app = Router::new()
        .route("/services", get(services))
        .with_state(rx);
    let task = tokio::spawn(async move {
        let mut failures: u32 = 0;
        let mut reported = None;
        loop {
            match bind(&path) {
                Ok((listener, b)) => {
                    *shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(b);
                    reported = None;
                    failures = 0;
                    tracing::info!(path = %path.display(), "admin socket serving");
                    if let Err(err) = axum::serve(listener, app.clone()).await {
                        tracing::error!(error = %err, "admin socket server stopped");
                    }
                    let b = shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                    if let Some(b) = b {
                        b.remove_if_ours();
                    }
                }
                Err(err) => {
                    if reported.is_none() {
                        reported = Some(unbound.guard());
                    }
                    if failures == 0 {
                        tracing::error!(error = %kproxy_contract::Chain(&err), "cannot serve the admin socket; retrying every 5s");
                    } else if crate::listeners::log_failure(failures) {
                        tracing::warn!(error = %kproxy_contract::Chain(&err), "still cannot serve the admin socket; retrying every 5s");
                    }
                    failures = failures.saturating_add(1);
                }
            }
            tokio::time::sleep(crate::listeners::RETRY).await;
        }
    });
    AdminServer { task, bound }
}

/// `GET path_and_query` on the daemon's socket: the body of a 200 answer.
pub fn query(socket: &Path, path_and_query: &str) -> anyhow::Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the kproxy daemon at {} (is it running on this node? \
             or pass --manifests DIR to compute the answer locally)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: kproxy\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("reading the daemon's answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the daemon's answer has no HTTP header")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the daemon's answer has no HTTP status")?;
    if status != 200 {
        anyhow::bail!("the daemon answered {status}: {}", body.trim());
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods, reason = "these tests time real sockets")]
    use std::time::Duration;

    use prometheus_client::metrics::gauge::Gauge;

    use super::*;
    use crate::listeners::{RETRY, Unbound};

    async fn ask(path: &Path, what: &'static str) -> anyhow::Result<String> {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || query(&p, what))
            .await
            .expect("join")
    }

    /// Waits until `f` holds (checked every 50 ms), at most `within`.
    async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if f() {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_published_state_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/kproxy.sock");
        let (tx, rx) = watch::channel(None);
        let server = spawn(&path, rx, Unbound::default());
        assert!(eventually(Duration::from_secs(2), || path.exists()).await);
        let before = ask(&path, "/services").await;
        assert!(
            before
                .as_ref()
                .is_err_and(|e| e.to_string().contains("503")),
            "{before:?}"
        );
        let state = kproxy_testkit::state(vec![kproxy_testkit::service(
            "web",
            "10.96.0.10",
            vec![kproxy_testkit::ep("10.244.1.10", true)],
        )]);
        tx.send_replace(Some(Arc::new(Applied {
            state,
            skipped: Vec::new(),
            skipped_by_service: Default::default(),
            ..Default::default()
        })));
        let json = ask(&path, "/services").await.expect("answer");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert!(json.contains("10.244.1.10"), "{v:#}");
        let table = ask(&path, "/services?output=table").await.expect("answer");
        assert!(table.contains("ns/web"), "{table}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::symlink_metadata(&path)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(server);
        assert!(!path.exists(), "socket file removed on drop");
    }

    /// A regular file at the path is left alone and reported; once it is gone the socket binds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kproxy.sock");
        std::fs::write(&path, "precious").expect("write");
        let gauge = Gauge::default();
        let (_tx, rx) = watch::channel(None);
        let server = spawn(&path, rx, Unbound::new(gauge.clone()));
        assert!(eventually(Duration::from_secs(2), || gauge.get() == 1).await);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "precious");
        std::fs::remove_file(&path).expect("rm");
        assert!(eventually(RETRY + Duration::from_secs(2), || gauge.get() == 0).await);
        assert!(
            ask(&path, "/services")
                .await
                .is_err_and(|e| e.to_string().contains("503"))
        );
        drop(server);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_symlinked_parent_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::os::unix::fs::symlink(&real, dir.path().join("link")).expect("symlink");
        let err = bind(&dir.path().join("link/kproxy.sock")).expect_err("refused");
        assert!(matches!(err, BindError::Parent(..)), "{err}");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(&real).expect("ls").count(), 0);
    }

    /// A live socket is another daemon's: left alone until it goes. A stale one is replaced.
    /// On exit only our own socket is removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_stale_and_own_sockets_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kproxy.sock");
        let (_tx, rx) = watch::channel(None);
        let first = spawn(&path, rx.clone(), Unbound::default());
        assert!(eventually(Duration::from_secs(2), || path.exists()).await);
        let err = bind(&path).expect_err("in use");
        assert!(matches!(err, BindError::InUse(_)), "{err}");
        // Another process takes the path over: our exit leaves its socket.
        std::fs::remove_file(&path).expect("rm");
        let theirs = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        drop(first);
        assert!(path.exists(), "removed another process's socket");
        // Once that process is gone its socket is stale, and replaced.
        drop(theirs);
        let (listener, bound) = bind(&path).expect("stale socket replaced");
        assert!(probe(&path).expect("probe"), "the new socket listens");
        drop(listener);
        bound.remove_if_ours();
        assert!(!path.exists());
    }

    /// Our exit never removes a socket that was bound after our listener closed, even when the
    /// file system hands it our old inode number (ext4 does so at once): the record of what we
    /// bound holds the inode until the check is done.
    #[tokio::test]
    async fn a_reused_inode_number_is_not_taken_for_ours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kproxy.sock");
        for _ in 0..50 {
            let (listener, ours) = bind(&path).expect("bind");
            drop(listener);
            std::fs::remove_file(&path).expect("rm");
            let theirs = std::os::unix::net::UnixListener::bind(&path).expect("bind theirs");
            ours.remove_if_ours();
            assert!(path.exists(), "removed a socket bound after ours closed");
            drop(theirs);
            std::fs::remove_file(&path).expect("rm theirs");
        }
    }

    /// A daemon that is alive but does not accept (its backlog full) is not taken for stale,
    /// and probing it does not block.
    #[test]
    fn a_daemon_with_a_full_backlog_is_in_use() {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kproxy.sock");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .expect("socket");
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
        listen(&fd, Backlog::new(0).expect("backlog")).expect("listen");
        // Fill the backlog (non-blocking connects, never accepted).
        let mut pending = Vec::new();
        while probe(&path).expect("probe") {
            let c = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .expect("socket");
            match nix::sys::socket::connect(c.as_raw_fd(), &UnixAddr::new(&path).expect("addr")) {
                Ok(()) => pending.push(c),
                Err(_) => break,
            }
            assert!(pending.len() < 64, "the backlog never filled");
        }
        let started = std::time::Instant::now();
        assert!(
            probe(&path).expect("probe"),
            "a live daemon taken for stale"
        );
        assert!(matches!(super::bind(&path), Err(BindError::InUse(_))));
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(fd);
        assert!(
            !probe(&path).expect("probe"),
            "a closed daemon's socket is stale"
        );
    }
}
