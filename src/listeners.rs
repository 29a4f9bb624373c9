//! The /healthz and /metrics listeners, kept bound as upstream keeps them: a listener that cannot
//! bind (its port still held by the previous kproxy during a rolling update, say) is retried every
//! 5 seconds until it binds, and reported while it cannot; one whose server stops is bound again.
//! With `--bind-address-hard-fail` the first failure stops kproxy instead (exit status 1), so the
//! pod restarts.

use std::net::SocketAddr;
use std::time::Duration;

use crate::stop::{StopHandle, StopReason};

/// Upstream's retry period.
pub const RETRY: Duration = Duration::from_secs(5);

/// Serves `app` on `addr` in a background task until the task is aborted.
pub fn spawn(
    what: &'static str,
    addr: SocketAddr,
    app: axum::Router,
    hard_fail: bool,
    stop: StopHandle,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            let error = match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    if failures > 0 {
                        tracing::info!(what, %addr, "serving now");
                    }
                    failures = 0;
                    match axum::serve(listener, app.clone()).await {
                        Ok(()) => "the server stopped".to_string(),
                        Err(err) => err.to_string(),
                    }
                }
                Err(err) => err.to_string(),
            };
            if hard_fail {
                stop.stop(StopReason::ListenerFailed { what, addr, error });
                return;
            }
            if failures == 0 {
                tracing::error!(what, %addr, %error, "cannot serve; retrying every 5s");
            } else if failures.is_multiple_of(12) {
                tracing::warn!(what, %addr, %error, "still cannot serve; retrying every 5s");
            }
            failures += 1;
            tokio::time::sleep(RETRY).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> axum::Router {
        axum::Router::new().route("/x", axum::routing::get(|| async { "ok" }))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_port_is_retried_until_it_is_free() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = holder.local_addr().expect("addr");
        let (stop, mut stopped) = crate::stop::channel();
        let task = spawn("/x", addr, app(), false, stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(holder);
        // Bound within one retry period of the port coming free.
        let deadline = tokio::time::Instant::now() + RETRY + Duration::from_secs(3);
        let served = loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        task.abort();
        assert!(served, "never bound {addr}");
        assert!(
            stopped.try_recv().is_err(),
            "no hard failure without the flag"
        );
    }

    #[tokio::test]
    async fn hard_fail_stops_the_daemon() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = holder.local_addr().expect("addr");
        let (stop, mut stopped) = crate::stop::channel();
        let _task = spawn("/x", addr, app(), true, stop);
        let reason = tokio::time::timeout(Duration::from_secs(5), stopped.recv())
            .await
            .expect("in time")
            .expect("a reason");
        assert!(
            matches!(reason, StopReason::ListenerFailed { what: "/x", .. }),
            "{reason:?}"
        );
        drop(holder);
    }
}
