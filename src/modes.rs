//! The one place that knows the modes: which one the configuration selects, with its settings
//! ([`ModeSpec`]), and how every entry point gets it built ([`ModeSpec::with_mode`]): the
//! daemon (and `--dry-run`, `--once`), `--init-only`, `--cleanup` and a running kproxy's
//! removal of other modes' rules ([`cleanup_except`]), and `kproxy trace`.
//!
//! Everything past this module is generic over [`Traceable`] (a [`kproxy_contract::Mode`] the
//! tracer can walk), so adding a mode means adding a variant here and nothing in the callers.

use kproxy_contract::{Cause, IpFamily, ModeError, ModeName};
use kproxy_iptables::{Backend, IptablesCli, IptablesMode, RenderOptions};
use kproxy_ipvs::{IpvsMode, IpvsOptions, SystemKernel};
use kproxy_nftables::{NftCli, NftablesMode};
use kproxy_tracer::Traceable;
use kproxy_userspace::{IpRoute, UserspaceMode};

use crate::config::{BackendChoice, Config};
use crate::conntrack::sysctl::SysctlFs;
use crate::sync::format_chain;

/// The selected mode with every setting it is built from. Made once from the configuration;
/// the mode's identity is this type (or its [`ModeName`]), never a string.
#[derive(Debug, Clone)]
pub enum ModeSpec {
    /// iptables-restore transactions on one backend.
    Iptables {
        /// The backend (`auto` already resolved).
        backend: Backend,
        /// What the rules depend on besides the cluster.
        options: RenderOptions,
    },
    /// One nft transaction per sync.
    Nftables,
    /// IP Virtual Server.
    Ipvs(IpvsOptions),
    /// A userspace TCP/UDP proxy.
    Userspace(kproxy_userspace::Options),
}

/// Code that runs with whichever mode a spec builds: generic over the mode's type (static
/// dispatch), so one body serves every mode.
pub trait WithMode {
    /// What the code returns.
    type Output;
    /// Runs with the built mode.
    fn with<M: Traceable>(self, mode: M) -> Self::Output;
}

impl ModeSpec {
    /// The mode the configuration selects, with what the node decides read from it: the
    /// iptables backend for `auto`, and `nf_conntrack_tcp_be_liberal` through `sysctls`
    /// (upstream reads it: a node already tracking TCP liberally needs no INVALID-drop rule,
    /// whoever set it).
    pub fn from_config(config: &Config, sysctls: &dyn SysctlFs) -> Self {
        if config.mode != ModeName::Iptables {
            return Self::offline(config);
        }
        let liberal = sysctls
            .read("net/netfilter/nf_conntrack_tcp_be_liberal")
            .is_ok_and(|v| v == 1);
        Self::build(config, iptables_backend(config.iptables_backend), liberal)
    }

    /// The selected mode as the configuration alone says it, reading nothing from the node
    /// (`auto` is taken as the nft backend): for code that only renders and traces, which
    /// runs anywhere and without root (`kproxy trace` without `--live`).
    pub fn offline(config: &Config) -> Self {
        let backend = match config.iptables_backend {
            BackendChoice::Legacy => Backend::Legacy,
            BackendChoice::Nft | BackendChoice::Auto => Backend::Nft,
        };
        Self::build(config, backend, false)
    }

    fn build(config: &Config, backend: Backend, liberal_on_node: bool) -> Self {
        match config.mode {
            ModeName::Iptables => ModeSpec::Iptables {
                backend,
                options: RenderOptions {
                    tcp_be_liberal: config.tcp_be_liberal || liberal_on_node,
                },
            },
            ModeName::Nftables => ModeSpec::Nftables,
            ModeName::Ipvs => ModeSpec::Ipvs(ipvs_options(config)),
            ModeName::Userspace => ModeSpec::Userspace(kproxy_userspace::Options {
                udp_idle_timeout: config.udp_timeout,
                grace_period: config.userspace_grace_period,
                ..kproxy_userspace::Options::default()
            }),
        }
    }

    /// Its name.
    pub fn name(&self) -> ModeName {
        match self {
            ModeSpec::Iptables { .. } => ModeName::Iptables,
            ModeSpec::Nftables => ModeName::Nftables,
            ModeSpec::Ipvs(_) => ModeName::Ipvs,
            ModeSpec::Userspace(_) => ModeName::Userspace,
        }
    }

    /// Whether it NATs in the kernel, leaving conntrack entries that outlive an endpoint (the
    /// sync loop cleans them); the userspace mode NATs nothing.
    pub fn nats_in_kernel(&self) -> bool {
        !matches!(self, ModeSpec::Userspace(_))
    }

    /// Fails when the kernel lacks what the mode needs, before anything is touched.
    pub fn check_available(&self) -> anyhow::Result<()> {
        if let ModeSpec::Ipvs(_) = self {
            anyhow::Context::context(kproxy_ipvs::probe(), "--proxy-mode ipvs")?;
        }
        Ok(())
    }

    /// Builds the mode on this machine's kernel, programming `families` (the userspace mode
    /// serves both always), and runs `f` with it.
    pub fn with_mode<W: WithMode>(&self, families: Vec<IpFamily>, f: W) -> W::Output {
        match self {
            ModeSpec::Iptables { backend, options } => f.with(IptablesMode::new(
                IptablesCli::new(*backend),
                families,
                options.clone(),
            )),
            ModeSpec::Nftables => f.with(NftablesMode::new(NftCli, families)),
            ModeSpec::Ipvs(options) => f.with(IpvsMode::new(
                SystemKernel::new(),
                IpvsOptions {
                    families,
                    ..options.clone()
                },
            )),
            ModeSpec::Userspace(options) => f.with(UserspaceMode::new(IpRoute, options.clone())),
        }
    }

    /// Whether `self` and `other` own the same kernel objects (the same mode; for iptables the
    /// same backend).
    fn owns_same_as(&self, other: &ModeSpec) -> bool {
        match (self, other) {
            (ModeSpec::Iptables { backend: a, .. }, ModeSpec::Iptables { backend: b, .. }) => {
                a == b
            }
            (a, b) => a.name() == b.name(),
        }
    }

    /// What it owns, for the cleanup's log lines.
    fn objects(&self) -> &'static str {
        match self {
            ModeSpec::Iptables { .. } => "iptables rules",
            ModeSpec::Nftables => "nftables tables",
            ModeSpec::Ipvs(_) => "IPVS virtual servers, interface and table",
            ModeSpec::Userspace(_) => "userspace local routes",
        }
    }

    /// Every mode's spec, both iptables backends: everything `--cleanup` removes.
    fn every(config: &Config) -> Vec<ModeSpec> {
        let options = RenderOptions {
            tcp_be_liberal: config.tcp_be_liberal,
        };
        vec![
            ModeSpec::Iptables {
                backend: Backend::Nft,
                options: options.clone(),
            },
            ModeSpec::Iptables {
                backend: Backend::Legacy,
                options,
            },
            ModeSpec::Nftables,
            ModeSpec::Ipvs(ipvs_options(config)),
            ModeSpec::Userspace(kproxy_userspace::Options::default()),
        ]
    }
}

/// The IPVS mode's settings from the configuration.
fn ipvs_options(config: &Config) -> IpvsOptions {
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
fn iptables_backend(choice: BackendChoice) -> Backend {
    match choice {
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Auto => Backend::detect(),
    }
}

/// `--init-only`: the selected mode's node set-up ([`kproxy_contract::Mode::node_setup`]).
pub struct NodeSetup;

impl WithMode for NodeSetup {
    type Output = ();
    fn with<M: Traceable>(self, mut mode: M) {
        mode.node_setup();
    }
}

/// Removes the mode's objects.
struct Cleanup;

impl WithMode for Cleanup {
    type Output = Result<(), ModeError>;
    fn with<M: Traceable>(self, mut mode: M) -> Result<(), ModeError> {
        mode.cleanup()
    }
}

/// Removes every kproxy object except what `keep` (the running mode) owns: on a mode switch the
/// previous mode's rules go, but only after the new mode's first sync is in place; `None` is
/// `--cleanup`. Missing tools are not errors (there is nothing of ours to remove where the tool
/// does not exist). `verbose` logs each removal at info (`--cleanup`, the first check of a
/// running kproxy); later checks log at debug.
pub fn cleanup_except(
    config: &Config,
    keep: Option<&ModeSpec>,
    verbose: bool,
) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for spec in ModeSpec::every(config) {
        if keep.is_some_and(|k| k.owns_same_as(&spec)) {
            continue;
        }
        // iptables: one family at a time, so a host without ip6tables still has its IPv4
        // rules removed.
        let runs: Vec<(Vec<IpFamily>, String)> = match &spec {
            ModeSpec::Iptables { backend, .. } => IpFamily::ALL
                .into_iter()
                .map(|f| (vec![f], format!(" (backend {}, {f})", backend.as_str())))
                .collect(),
            _ => vec![(IpFamily::ALL.to_vec(), String::new())],
        };
        for (families, detail) in runs {
            let what = spec.objects();
            match spec.with_mode(families, Cleanup) {
                Ok(()) if verbose => tracing::info!("{what} removed{detail}"),
                Ok(()) => tracing::debug!("{what} removed{detail}"),
                Err(err) if is_missing_tool(&err) => {
                    tracing::debug!("{what}{detail}: the tools are not installed; nothing to clean")
                }
                Err(err) => failures.push(format!("{what}{detail}: {}", format_chain(&err))),
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cleanup failed: {}", failures.join("; "))
    }
}

fn is_missing_tool(err: &ModeError) -> bool {
    matches!(
        err,
        ModeError::ReadLive {
            cause: Cause::NotFound { .. },
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::cli::Args;

    fn config(mode: &str, extra: impl FnOnce(&mut Args)) -> Config {
        let mut args = Args {
            hostname_override: Some("node-a".into()),
            proxy_mode: Some(mode.parse().unwrap()),
            ..Args::default()
        };
        extra(&mut args);
        crate::config::from_args(&args).unwrap()
    }

    #[test]
    fn each_mode_is_built_from_its_settings() {
        let c = config("ipvs", |a| a.ipvs_scheduler = Some("wrr".into()));
        let ModeSpec::Ipvs(o) = ModeSpec::offline(&c) else {
            panic!("not ipvs")
        };
        assert_eq!(o.scheduler, "wrr");
        let c = config("userspace", |a| {
            a.udp_timeout = Some("7s".parse().unwrap());
        });
        let ModeSpec::Userspace(o) = ModeSpec::offline(&c) else {
            panic!("not userspace")
        };
        assert_eq!(o.udp_idle_timeout, std::time::Duration::from_secs(7));
        for name in ModeName::ALL {
            let spec = ModeSpec::offline(&config(name.as_str(), |_| {}));
            assert_eq!(spec.name(), name);
            assert_eq!(spec.nats_in_kernel(), name != ModeName::Userspace);
        }
    }

    #[test]
    fn offline_iptables_reads_nothing_from_the_node() {
        let c = config("iptables", |a| {
            a.iptables_backend = Some(crate::cli::BackendArg::Legacy)
        });
        let ModeSpec::Iptables { backend, options } = ModeSpec::offline(&c) else {
            panic!("not iptables")
        };
        assert_eq!(backend, Backend::Legacy);
        assert!(!options.tcp_be_liberal);
        // `auto` would run the save tools to detect; offline it is nft.
        let ModeSpec::Iptables { backend, .. } = ModeSpec::offline(&config("iptables", |_| {}))
        else {
            panic!("not iptables")
        };
        assert_eq!(backend, Backend::Nft);
    }

    /// `--cleanup` reaches every mode (a new mode without a cleanup entry fails here), and a
    /// running mode's cleanup of the others spares exactly what it owns: for iptables, its own
    /// backend only.
    #[test]
    fn cleanup_covers_every_mode_and_spares_only_the_running_one() {
        let c = config("iptables", |_| {});
        let every = ModeSpec::every(&c);
        for name in ModeName::ALL {
            assert!(
                every.iter().any(|s| s.name() == name),
                "{name} is not cleaned"
            );
        }
        let nft_backend = ModeSpec::Iptables {
            backend: Backend::Nft,
            options: RenderOptions::default(),
        };
        let spared: Vec<&ModeSpec> = every
            .iter()
            .filter(|s| nft_backend.owns_same_as(s))
            .collect();
        assert!(
            matches!(
                spared[..],
                [ModeSpec::Iptables {
                    backend: Backend::Nft,
                    ..
                }]
            ),
            "{spared:?}"
        );
        for spec in &every {
            let spared = every.iter().filter(|s| spec.owns_same_as(s)).count();
            assert_eq!(spared, 1, "{} spares more than itself", spec.objects());
        }
    }
}
