//! The Kubernetes API client: built from `--kubeconfig` / `clientConnection.kubeconfig`,
//! `--master`, or the in-cluster environment, rate-limited as configured, and checked at start so
//! that a node which cannot reach its API server says so within seconds, naming the address it
//! tried and how to fix it (instead of waiting silently, as a watch that retries would).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use super::rate_limit::RateLimitLayer;
use crate::config::ApiRateLimit;

/// How long the start-up check waits for the API server's answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the client's address came from, for the advice when it cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A kubeconfig file (`--kubeconfig`, `clientConnection.kubeconfig`).
    Kubeconfig(String),
    /// `--master`.
    Master,
    /// Inferred: `$KUBECONFIG`, `~/.kube/config`, or the in-cluster service account, whose
    /// address is the `kubernetes` Service's ClusterIP (`KUBERNETES_SERVICE_HOST`).
    Inferred,
}

/// A client and what it was built from.
pub struct ApiClient {
    /// The client.
    pub client: kube::Client,
    /// The API server's address.
    pub url: String,
    /// Where the address came from.
    pub origin: Origin,
}

/// Builds the client. Nothing is sent yet.
pub async fn build(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    limit: ApiRateLimit,
) -> anyhow::Result<ApiClient> {
    let (mut cfg, mut origin) = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}: cannot read", path.display()))?;
            let cfg = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("--kubeconfig {}: invalid", path.display()))?;
            (cfg, Origin::Kubeconfig(path.display().to_string()))
        }
        None => match master {
            Some(url) => (
                kube::Config::new(
                    url.parse()
                        .with_context(|| format!("--master {url:?} is not a URL"))?,
                ),
                Origin::Master,
            ),
            None => (
                kube::Config::infer().await.context(
                    "no --kubeconfig or --master, and no in-cluster configuration found",
                )?,
                Origin::Inferred,
            ),
        },
    };
    if let (Some(url), Some(_)) = (master, kubeconfig) {
        cfg.cluster_url = url
            .parse()
            .with_context(|| format!("--master {url:?} is not a URL"))?;
        origin = Origin::Master;
    }
    let url = cfg.cluster_url.to_string();
    let client = kube::client::ClientBuilder::try_from(cfg)
        .context("cannot build the Kubernetes client")?
        .with_layer(&RateLimitLayer::new(limit.qps, limit.burst))
        .build();
    Ok(ApiClient {
        client,
        url,
        origin,
    })
}

/// What to tell an operator whose node cannot reach `url`.
pub fn advice(origin: &Origin, in_cluster_host: Option<&str>) -> String {
    match (origin, in_cluster_host) {
        (Origin::Inferred, Some(host)) => format!(
            "this is the in-cluster address (KUBERNETES_SERVICE_HOST={host}), normally the \
             `kubernetes` Service's ClusterIP, which nothing programs on a node whose proxy has \
             not run yet; give kproxy the control plane's own address: a kubeconfig naming it \
             (--kubeconfig, or clientConnection.kubeconfig in --config; manifests/ ships one), \
             or KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT set to it"
        ),
        (Origin::Kubeconfig(path), _) => format!(
            "check the server address in {path}, and that this node can reach it (firewall, \
             DNS, the API server running)"
        ),
        _ => "check the address, and that this node can reach it (firewall, DNS, the API \
              server running)"
            .into(),
    }
}

/// What the start-up check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The API server answered (any answer but a refusal of kproxy's credentials).
    Answered,
    /// It answered 401 or 403: it is reachable, but does not accept kproxy's credentials.
    Refused(String),
    /// No answer within [`PROBE_TIMEOUT`], or no connection at all.
    Unreachable(String),
}

/// Asks the API server for its version.
pub async fn probe(client: &kube::Client) -> Probe {
    match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Probe::Answered,
        Ok(Err(kube::Error::Api(status))) if matches!(status.code, 401 | 403) => {
            Probe::Refused(format!("{} {}", status.code, status.message))
        }
        // Any other status is an answer: the server is there.
        Ok(Err(kube::Error::Api(_))) => Probe::Answered,
        Ok(Err(err)) => Probe::Unreachable(crate::sync::format_chain(&err)),
        Err(_) => Probe::Unreachable(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
    }
}

/// Checks the API server at start and keeps checking until it answers: an ERROR at once when
/// it does not (with the address and the advice), a WARN every minute while it stays away, an
/// INFO when it answers.
pub async fn report_reachability(client: kube::Client, url: String, origin: Origin) {
    let in_cluster = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    let mut failures: u32 = 0;
    loop {
        match probe(&client).await {
            Probe::Answered => {
                if failures > 0 {
                    tracing::info!(%url, "the API server answers now");
                } else {
                    tracing::debug!(%url, "the API server answers");
                }
                return;
            }
            Probe::Refused(error) => {
                if failures == 0 {
                    tracing::error!(
                        %url,
                        %error,
                        "the Kubernetes API server refuses kproxy's credentials; check the \
                         token or client certificate of its kubeconfig, and that its RBAC \
                         allows listing and watching Services, EndpointSlices and Nodes"
                    );
                }
                failures += 1;
            }
            Probe::Unreachable(error) => {
                if failures == 0 {
                    tracing::error!(
                        %url,
                        %error,
                        advice = %advice(&origin, in_cluster.as_deref()),
                        "cannot reach the Kubernetes API server; the rules already in the \
                         kernel stay as they are, and kproxy keeps trying"
                    );
                } else if failures.is_multiple_of(6) {
                    tracing::warn!(%url, %error, "still cannot reach the Kubernetes API server");
                }
                failures += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods, reason = "these tests time real sockets")]
    use super::*;

    #[test]
    fn the_advice_names_the_fix_for_the_service_vip_deadlock() {
        let a = advice(&Origin::Inferred, Some("10.96.0.1"));
        assert!(a.contains("KUBERNETES_SERVICE_HOST=10.96.0.1"), "{a}");
        assert!(a.contains("kubeconfig"), "{a}");
        let a = advice(&Origin::Kubeconfig("/k.conf".into()), None);
        assert!(a.contains("/k.conf"), "{a}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_reported_within_the_timeout() {
        // A listener that accepts and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let api = build(
            None,
            Some(&format!("http://{addr}")),
            ApiRateLimit {
                qps: 5.0,
                burst: 10,
            },
        )
        .await
        .expect("client");
        assert_eq!(api.origin, Origin::Master);
        let start = std::time::Instant::now();
        let found = probe(&api.client).await;
        assert!(start.elapsed() < PROBE_TIMEOUT + Duration::from_secs(2));
        assert!(
            matches!(&found, Probe::Unreachable(e) if e.contains("no answer")),
            "{found:?}"
        );
        drop(listener);
    }
}
