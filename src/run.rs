//! Wiring: pick the source and the mode, run the sync loop, handle signals and `--cleanup`.

use std::sync::Arc;

use anyhow::Context as _;
use kproxy_contract::{IpFamily, Mode, ModeName};
use kproxy_iptables::{Backend, IptablesCli, IptablesMode, RenderOptions};
use kproxy_ipvs::{IpvsMode, IpvsOptions, SystemKernel};
use kproxy_nftables::{NftCli, NftablesMode};
use kproxy_userspace::{IpRoute, UserspaceMode};
use tokio::sync::mpsc;

use crate::config::{BackendChoice, Config, SourceConfig};
use crate::sync::{Stopped, SyncLoop, SyncOptions, format_chain};

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
    match config.mode {
        ModeName::Iptables => {
            let backend = iptables_backend(config.iptables_backend);
            tracing::info!(backend = backend.as_str(), "iptables mode");
            // Upstream reads the sysctl: a node already running liberal TCP tracking needs no
            // INVALID-drop rule, whoever set it.
            let tcp_be_liberal = config.tcp_be_liberal
                || crate::conntrack::sysctl::SysctlFs::read(
                    &sysctls,
                    "net/netfilter/nf_conntrack_tcp_be_liberal",
                )
                .is_ok_and(|v| v == 1);
            let mode = IptablesMode::new(
                IptablesCli::new(backend),
                vec![IpFamily::V4, IpFamily::V6],
                RenderOptions { tcp_be_liberal },
            );
            run_mode(mode, config, Keep::Iptables(backend)).await
        }
        ModeName::Nftables => {
            let mode = NftablesMode::new(NftCli, vec![IpFamily::V4, IpFamily::V6]);
            run_mode(mode, config, Keep::Nftables).await
        }
        ModeName::Ipvs => {
            // Fail before anything is touched when the kernel has no IPVS (a dry run still
            // prints what it would program).
            if !config.dry_run {
                kproxy_ipvs::probe().context("--proxy-mode ipvs")?;
            }
            let mode = IpvsMode::new(SystemKernel::new(), ipvs_options(&config));
            run_mode(mode, config, Keep::Ipvs).await
        }
        ModeName::Userspace => {
            let options = kproxy_userspace::Options {
                udp_idle_timeout: config.udp_timeout,
                grace_period: config.userspace_grace_period,
                ..kproxy_userspace::Options::default()
            };
            let mode = UserspaceMode::new(IpRoute, options);
            run_mode(mode, config, Keep::Userspace).await
        }
    }
}

/// The privileged set-up of the node, which `--init-only` does alone (upstream runs it as an
/// init container so the proxy itself could run with fewer privileges): the conntrack sysctls,
/// and in ipvs mode IPVS's sysctls, strict ARP and connection timeouts.
fn node_setup(config: &Config, sysctls: &crate::conntrack::sysctl::ProcSys) {
    let actions = crate::conntrack::sysctl::apply(&config.conntrack, sysctls);
    crate::conntrack::sysctl::log(&actions);
    if config.init_only && config.mode == ModeName::Ipvs {
        IpvsMode::new(SystemKernel::new(), ipvs_options(config)).node_setup();
    }
}

/// The IPVS mode's settings from the configuration (the daemon, `--cleanup` and `kproxy trace`).
pub(crate) fn ipvs_options(config: &Config) -> IpvsOptions {
    let ipvs = &config.ipvs;
    IpvsOptions {
        scheduler: ipvs.scheduler.clone(),
        strict_arp: ipvs.strict_arp,
        exclude_cidrs: ipvs.exclude_cidrs.clone(),
        timeouts: kproxy_ipvs::IpvsTimeouts::from_durations(
            ipvs.tcp_timeout,
            ipvs.tcp_fin_timeout,
            ipvs.udp_timeout,
        ),
        ..IpvsOptions::default()
    }
}

/// The iptables backend a choice resolves to (`auto` detects what the host uses).
pub(crate) fn iptables_backend(choice: BackendChoice) -> Backend {
    match choice {
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Auto => Backend::detect(),
    }
}

async fn run_mode<M: Mode>(mode: M, config: Arc<Config>, keep: Keep) -> anyhow::Result<()> {
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
        conntrack_cleanup: keep != Keep::Userspace,
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
                addr,
                crate::health::router(health.clone()),
                config.bind_address_hard_fail,
                stop.clone(),
            )));
        }
        if let Some(addr) = config.metrics_bind {
            background.push(AbortOnDrop(crate::listeners::spawn(
                "/metrics",
                addr,
                crate::metrics::router(
                    metrics.clone(),
                    config.mode,
                    serde_json::to_value(&config.effective).unwrap_or_default(),
                ),
                config.bind_address_hard_fail,
                stop.clone(),
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
    let admin_socket = config.admin_socket.clone();
    let hc_health = health.clone();
    let mut sync = SyncLoop::new(mode, config, options)
        .with_health(health)
        .with_metrics(metrics)
        .with_health_checks(crate::healthcheck::HealthCheckServers::new(hc_health))
        .after_first_apply(Box::new(move || {
            // Another mode (or backend) may have run before: its rules go now that ours are in
            // place, so traffic never finds neither.
            if let Err(err) = cleanup_except(&switch_config, Some(keep)) {
                tracing::warn!(error = %format!("{err:#}"), "could not remove another mode's rules");
            }
        }));
    if clean_conntrack {
        // The socket is opened in kproxy's own network namespace: only its table is touched.
        sync = sync.with_conntrack(Box::new(crate::conntrack::netlink::NetlinkConntrack::new()));
    }
    // Dropped (socket file removed) when the loop ends.
    let _admin = match &admin_socket {
        Some(path) if serving => {
            let (tx, rx) = tokio::sync::watch::channel(None);
            match crate::admin::serve(path, rx).await {
                Ok(server) => {
                    sync = sync.with_admin(tx);
                    Some(server)
                }
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), "cannot serve the admin socket; continuing without it");
                    None
                }
            }
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

/// `--cleanup`: every mode's objects, both iptables backends, both families. Missing tools are
/// not errors (there is nothing of ours to remove where the tool does not exist).
fn cleanup(config: &Config) -> anyhow::Result<()> {
    cleanup_except(config, None)
}

/// What a running mode owns, so a mode switch cleans up everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Iptables(Backend),
    Nftables,
    Ipvs,
    Userspace,
}

/// Removes every kproxy object except what `keep` (the running mode) owns: on a mode switch the
/// previous mode's rules go, but only after the new mode's first sync is in place.
fn cleanup_except(config: &Config, keep: Option<Keep>) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for backend in [Backend::Nft, Backend::Legacy] {
        if keep == Some(Keep::Iptables(backend)) {
            continue;
        }
        for family in IpFamily::ALL {
            let mut mode = IptablesMode::new(
                IptablesCli::new(backend),
                vec![family],
                RenderOptions {
                    tcp_be_liberal: config.tcp_be_liberal,
                },
            );
            match mode.cleanup() {
                Ok(()) => {
                    tracing::info!(backend = backend.as_str(), %family, "iptables rules removed")
                }
                Err(err) if is_missing_tool(&err) => {
                    tracing::debug!(backend = backend.as_str(), %family, "iptables tools not installed; nothing to clean")
                }
                Err(err) => failures.push(format!(
                    "iptables ({}, {family}): {}",
                    backend.as_str(),
                    format_chain(&err)
                )),
            }
        }
    }
    if keep != Some(Keep::Nftables) {
        let mut nft = NftablesMode::new(NftCli, IpFamily::ALL.to_vec());
        match nft.cleanup() {
            Ok(()) => tracing::info!("nftables tables removed"),
            Err(err) if is_missing_tool(&err) => {
                tracing::debug!("nft not installed; nothing to clean")
            }
            Err(err) => failures.push(format!("nftables: {}", format_chain(&err))),
        }
    }
    if keep != Some(Keep::Ipvs) {
        let mut ipvs = IpvsMode::new(SystemKernel::new(), ipvs_options(config));
        match ipvs.cleanup() {
            Ok(()) => tracing::info!("IPVS virtual servers, interface and table removed"),
            Err(err) if is_missing_tool(&err) => {
                tracing::debug!("ip or nft not installed; no IPVS-mode objects to clean")
            }
            Err(err) => failures.push(format!("ipvs: {}", format_chain(&err))),
        }
    }
    if keep != Some(Keep::Userspace) {
        let mut userspace = UserspaceMode::new(IpRoute, kproxy_userspace::Options::default());
        match userspace.cleanup() {
            Ok(()) => tracing::info!("userspace local routes removed"),
            Err(err) if is_missing_tool(&err) => {
                tracing::debug!("ip not installed; no userspace routes to clean")
            }
            Err(err) => failures.push(format!("userspace: {}", format_chain(&err))),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cleanup failed: {}", failures.join("; "))
    }
}

fn is_missing_tool(err: &kproxy_contract::ModeError) -> bool {
    matches!(
        err,
        kproxy_contract::ModeError::ReadLive {
            cause: kproxy_contract::CommandError::NotFound { .. },
            ..
        }
    )
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
