//! Wiring: pick the source and the mode, run the sync loop, handle signals and `--cleanup`.

use std::sync::Arc;

use anyhow::Context as _;
use futures::future::LocalBoxFuture;
use kproxy_contract::{IpFamily, Mode};
use kproxy_tracer::Traceable;
use tokio::sync::mpsc;

use crate::config::{Config, SourceConfig};
use crate::listeners::{Kind, Unbound};
use crate::modes::{ModeSpec, NodeSetup, WithMode, cleanup_except};
use crate::sync::{Event, Stopped, SyncLoop, SyncOptions, block, format_chain};

/// How long the first sync waits for this node's Node (with an address) from the API. Long
/// enough for a Node that a cloud controller is still initialising; short enough that a node
/// whose Node cannot be read still gets its services soon. See [`crate::sync::FirstSync`].
const NODE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs kproxy with a validated configuration.
pub async fn run(config: Config) -> anyhow::Result<()> {
    for notice in &config.notices {
        tracing::warn!(field = %notice.field, "{}", notice.message);
    }
    for field in &config.overridden_fields {
        tracing::info!(field, "command-line flag overrides the --config file");
    }
    let config = Arc::new(config);
    if config.cleanup {
        return cleanup(&config);
    }
    // A dry run changes nothing, sysctls and the OOM score included.
    let sysctls = crate::conntrack::sysctl::ProcSys::default();
    if !config.dry_run {
        node_setup(&config, &sysctls);
    }
    if config.init_only {
        tracing::info!("node set up; --init-only: exiting");
        return Ok(());
    }
    if !config.dry_run
        && let Some(value) = config.oom_score_adj
    {
        crate::oom::apply_to_self(value);
    }
    let spec = ModeSpec::from_config(&config, &sysctls);
    if let ModeSpec::Iptables { backend, .. } = &spec {
        tracing::info!(backend = backend.as_str(), "iptables mode");
    }
    // Fail before anything is touched when the kernel lacks the mode (a dry run still prints
    // what it would program).
    if !config.dry_run {
        spec.check_available()?;
    }
    spec.with_mode(
        IpFamily::ALL.to_vec(),
        Daemon {
            config,
            spec: spec.clone(),
        },
    )
    .await
}

/// The privileged set-up of the node, which `--init-only` does alone (upstream runs it as an
/// init container so the proxy itself could run with fewer privileges): the conntrack sysctls,
/// and the mode's own ([`kproxy_contract::Mode::node_setup`]: in ipvs mode IPVS's sysctls,
/// strict ARP and connection timeouts). A running proxy makes the mode's before its first
/// apply.
fn node_setup(config: &Config, sysctls: &crate::conntrack::sysctl::ProcSys) {
    let actions = crate::conntrack::sysctl::apply(&config.conntrack, sysctls);
    crate::conntrack::sysctl::log(&actions);
    if config.init_only {
        ModeSpec::offline(config).with_mode(IpFamily::ALL.to_vec(), NodeSetup);
    }
}

/// The daemon (and `--dry-run`, `--once`) with the selected mode.
struct Daemon {
    config: Arc<Config>,
    spec: ModeSpec,
}

impl WithMode for Daemon {
    type Output = LocalBoxFuture<'static, anyhow::Result<()>>;
    fn with<M: Traceable>(self, mode: M) -> Self::Output {
        Box::pin(run_mode(mode, self.config, self.spec))
    }
}

async fn run_mode<M: Mode>(mode: M, config: Arc<Config>, keep: ModeSpec) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(1024);
    let source = AbortOnDrop(spawn_source(&config, tx).await?);
    let options = SyncOptions {
        min_sync_period: config.min_sync_period,
        sync_period: config.sync_period,
        // Upstream's FullSyncPeriod; between full syncs the canary probe catches flushed tables.
        full_sync_period: std::time::Duration::from_secs(3600),
        dry_run: config.dry_run,
        once: config.once,
        // The kernel modes NAT a flow's first packet; the userspace mode NATs nothing.
        conntrack_cleanup: keep.nats_in_kernel(),
        node_wait: match config.source {
            SourceConfig::Api { .. } => NODE_WAIT,
            // The directory is read whole, its Node first: a directory without one is final.
            SourceConfig::Manifests(_) => std::time::Duration::ZERO,
        },
    };
    let metrics = Arc::new(crate::metrics::Metrics::new(mode.name()));
    let health = crate::health::Health::new(config.sync_period).with_metrics(metrics.clone());
    // A one-shot or dry run is not a node's proxy: it serves no probes and no metrics, and
    // watches no config file.
    let serving = !config.dry_run && !config.once;
    let (stop, mut stop_requests) = crate::stop::channel();
    let mut background = Vec::new();
    if serving {
        if let Some(addr) = config.healthz_bind {
            background.push(AbortOnDrop(crate::listeners::spawn(
                "/healthz",
                Kind::Healthz,
                addr,
                crate::health::router(health.clone()),
                config.bind_address_hard_fail,
                stop.clone(),
                Unbound::new(metrics.unbound_listeners(Kind::Healthz)),
            )));
        }
        if let Some(addr) = config.metrics_bind {
            background.push(AbortOnDrop(crate::listeners::spawn(
                "/metrics",
                Kind::Metrics,
                addr,
                crate::metrics::router(
                    metrics.clone(),
                    config.mode,
                    serde_json::to_value(&config.effective).unwrap_or_default(),
                ),
                config.bind_address_hard_fail,
                stop.clone(),
                Unbound::new(metrics.unbound_listeners(Kind::Metrics)),
            )));
        }
        if let Some(file) = &config.config_file {
            background.push(AbortOnDrop(tokio::spawn(crate::config::watch::run(
                file.clone(),
                stop.clone(),
            ))));
        }
    }
    let clean_conntrack = options.conntrack_cleanup && !options.dry_run;
    let switch_config = config.clone();
    let mut leftovers = LeftoverChecks::new(options.sync_period, options.full_sync_period);
    let admin_socket = config.admin_socket.clone();
    let admin_unbound = Unbound::new(metrics.unbound_listeners(Kind::Admin));
    let health_checks = crate::healthcheck::HealthCheckServers::new(health.clone()).with_unbound(
        Unbound::new(metrics.unbound_listeners(Kind::HealthCheckNodePort)),
    );
    let mut sync = SyncLoop::new(mode, config, options)
        .with_health(health)
        .follow(metrics)
        .follow(health_checks)
        .follow(move |event: &Event<'_>| {
            // Another mode (or backend) may have run before: its rules go once ours are in
            // place, so traffic never finds neither; and again later, because during a
            // rolling update the old kproxy may still be running and restore them.
            if !matches!(event, Event::Applied { .. }) {
                return;
            }
            let now = tokio::time::Instant::now();
            if !leftovers.due(now) {
                return;
            }
            let first = leftovers.is_first();
            leftovers.checked(now);
            if let Err(err) = block(|| cleanup_except(&switch_config, Some(&keep), first)) {
                tracing::warn!(error = %format!("{err:#}"), "could not remove another mode's rules");
            }
        });
    if clean_conntrack {
        // The socket is opened in kproxy's own network namespace: only its table is touched.
        sync = sync.with_conntrack(Box::new(crate::conntrack::netlink::NetlinkConntrack::new()));
    }
    // Dropped (socket file removed, if still ours) when the loop ends.
    let _admin = match &admin_socket {
        Some(path) if serving => {
            let (tx, rx) = tokio::sync::watch::channel(None);
            sync = sync.follow(tx);
            Some(crate::admin::spawn(path, rx, admin_unbound))
        }
        _ => None,
    };
    let mut stop_reason = None;
    let stopping = async {
        tokio::select! {
            () = shutdown_signal() => {}
            Some(reason) = stop_requests.recv() => stop_reason = Some(reason),
        }
    };
    let stopped = sync.run(rx, stopping).await;
    drop(source);
    drop(background);
    if matches!(stopped, Ok(Stopped::Shutdown)) {
        // The userspace mode hands its listeners over and drains its connections here.
        tokio::task::block_in_place(|| sync.mode().stop());
    }
    if let Some(reason) = stop_reason {
        anyhow::bail!("{reason}");
    }
    match stopped? {
        Stopped::Once => tracing::info!("--once: done"),
        Stopped::Shutdown => tracing::info!("stopped"),
    }
    Ok(())
}

async fn spawn_source(
    config: &Config,
    tx: mpsc::Sender<crate::source::Update>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let node = config.hostname.clone();
    match &config.source {
        SourceConfig::Manifests(dir) => {
            let dir = dir.clone();
            // Fail fast on a missing directory instead of waiting forever for a first list.
            std::fs::read_dir(&dir).with_context(|| {
                format!("--manifests {}: cannot read the directory", dir.display())
            })?;
            Ok(tokio::spawn(async move {
                if let Err(err) = crate::source::manifests::run(dir, node, tx).await {
                    tracing::error!(error = %format_chain(&err), "the manifests source stopped");
                }
            }))
        }
        SourceConfig::Api { kubeconfig, master } => {
            let api = crate::source::client::build(
                kubeconfig.as_deref(),
                master.as_deref(),
                config.api_rate_limit,
            )
            .await?;
            tracing::info!(url = %api.url, "watching the Kubernetes API");
            let client = api.client.clone();
            Ok(tokio::spawn(async move {
                // Says within seconds when the API server cannot be reached, while the
                // watches retry on their own.
                let reachability =
                    crate::source::client::report_reachability(api.client, api.url, api.origin);
                tokio::join!(reachability, crate::source::kube::run(client, node, tx));
            }))
        }
    }
}

/// `--cleanup`: every mode's objects, both iptables backends, both families.
fn cleanup(config: &Config) -> anyhow::Result<()> {
    cleanup_except(config, None, true)
}

/// When a running kproxy looks again for the rules other kproxy modes left (a pure schedule;
/// the caller does the removal).
///
/// Once is not enough: in a rolling update with surge that switches modes, the old kproxy (say
/// iptables) keeps running next to the new one (nftables) for a while, finds its rules gone at
/// its next periodic check, writes them all back, and then exits; its rules, some for ports no
/// longer in use, would stay next to the new mode's for good. So the check runs after the first
/// apply, then again `base` (the sync period) later, and at intervals doubling from there up to
/// `cap` (the full-resync period, an hour): an overlap of any length is covered within about
/// its own length after the old kproxy exits, at a cost that fades to one check an hour (a
/// check is a few `iptables-save` runs and netlink queries, about 60 ms in an empty namespace).
///
/// Only time counts, not the kind of sync: a full resync forced by drift must not check. In
/// the same overlap the old kproxy sees its rules removed by the new one, resyncs in full, and
/// would then remove the new mode's tables in turn; going by age alone, the kproxy that started
/// last is the one checking often, and the old one's checks have long thinned out to hourly.
#[derive(Debug, Clone)]
struct LeftoverChecks {
    cap: std::time::Duration,
    interval: std::time::Duration,
    last: Option<tokio::time::Instant>,
}

impl LeftoverChecks {
    fn new(base: std::time::Duration, cap: std::time::Duration) -> Self {
        let base = base.max(std::time::Duration::from_secs(1));
        Self {
            cap: cap.max(base),
            interval: base,
            last: None,
        }
    }

    /// Whether to look after a sync ending at `now`.
    fn due(&self, now: tokio::time::Instant) -> bool {
        self.last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval)
    }

    /// Whether no check has run yet.
    fn is_first(&self) -> bool {
        self.last.is_none()
    }

    /// A check ran at `now`: the next one is due twice as late as this one was.
    fn checked(&mut self, now: tokio::time::Instant) {
        if self.last.is_some() {
            self.interval = (self.interval * 2).min(self.cap);
        }
        self.last = Some(now);
    }
}

/// SIGTERM or SIGINT. The current sync finishes first; rules stay in place so traffic keeps
/// flowing through a rolling update.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Stops a background task when the owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::LeftoverChecks;

    /// The moments (seconds after the first apply) at which a kproxy with a 30 s sync period,
    /// syncing every 30 s, looks for other modes' rules in its first `until` seconds.
    fn checks(until: u64) -> Vec<u64> {
        let start = tokio::time::Instant::now();
        let mut c = LeftoverChecks::new(Duration::from_secs(30), Duration::from_secs(3600));
        let mut at = Vec::new();
        for t in (0..=until).step_by(30) {
            let now = start + Duration::from_secs(t);
            if c.due(now) {
                c.checked(now);
                at.push(t);
            }
        }
        at
    }

    #[test]
    fn leftovers_are_checked_at_doubling_intervals_up_to_an_hour() {
        assert_eq!(
            checks(6 * 3600),
            [
                0, 30, 90, 210, 450, 930, 1890, 3810, 7410, 11010, 14610, 18210
            ]
        );
    }

    #[test]
    fn the_first_apply_checks_and_the_interval_doubles_from_the_sync_period() {
        let start = tokio::time::Instant::now();
        let mut c = LeftoverChecks::new(Duration::from_secs(30), Duration::from_secs(3600));
        assert!(c.is_first());
        assert!(c.due(start), "the first apply always checks");
        c.checked(start);
        assert!(!c.is_first());
        let at = |s| start + Duration::from_secs(s);
        assert!(!c.due(at(29)));
        assert!(c.due(at(30)));
        // A late sync (a long sync period, a backoff) checks late; the next is 60 s after it.
        c.checked(at(45));
        assert!(!c.due(at(104)));
        assert!(c.due(at(105)));
    }

    #[test]
    fn a_tiny_sync_period_still_spaces_the_checks() {
        let start = tokio::time::Instant::now();
        let mut c = LeftoverChecks::new(Duration::from_millis(10), Duration::from_secs(3600));
        c.checked(start);
        assert!(!c.due(start + Duration::from_millis(500)));
        assert!(c.due(start + Duration::from_secs(1)));
    }
}
