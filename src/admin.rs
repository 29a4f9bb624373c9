//! The admin socket: a running daemon answers `kproxy services` with what it last applied.
//!
//! A Unix socket (default `/run/kproxy/kproxy.sock`, mode 0600) rather than another TCP port:
//! nothing new listens on the network, only root on the node can ask, and `kubectl exec` into
//! the DaemonSet's pod reaches it. It speaks plain HTTP/1.1 so `curl --unix-socket` works too:
//! `GET /services` answers JSON, `GET /services?output=table` the table.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

/// The default socket path, shared by the daemon and the `kproxy services` client.
pub const DEFAULT_SOCKET: &str = "/run/kproxy/kproxy.sock";

/// What the daemon last applied: the build of its last successful sync (its desired state and
/// the objects it skipped), shared with the sync loop rather than copied.
pub type Applied = crate::desired_state::Built;

/// Where the sync loop publishes each applied state.
pub type Publisher = watch::Sender<Option<Arc<Applied>>>;

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

/// A bound admin socket; dropping it stops the server and removes the socket file.
#[derive(Debug)]
pub struct AdminServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (replacing a stale socket left by a killed daemon) and serves the published
/// state until dropped.
pub async fn serve(
    path: &Path,
    rx: watch::Receiver<Option<Arc<Applied>>>,
) -> anyhow::Result<AdminServer> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    let app = Router::new()
        .route("/services", get(services))
        .with_state(rx);
    let task = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "admin socket server stopped");
        }
    });
    Ok(AdminServer {
        path: path.to_path_buf(),
        task,
    })
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
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_the_published_state_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/kproxy.sock");
        let (tx, rx) = watch::channel(None);
        let server = serve(&path, rx).await.expect("serve");
        let p = path.clone();
        let before = tokio::task::spawn_blocking(move || query(&p, "/services"))
            .await
            .expect("join");
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
        let p = path.clone();
        let json = tokio::task::spawn_blocking(move || query(&p, "/services"))
            .await
            .expect("join")
            .expect("answer");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert!(json.contains("10.244.1.10"), "{v:#}");
        let p = path.clone();
        let table = tokio::task::spawn_blocking(move || query(&p, "/services?output=table"))
            .await
            .expect("join")
            .expect("answer");
        assert!(table.contains("ns/web"), "{table}");
        drop(server);
        assert!(!path.exists(), "socket file removed on drop");
    }
}
