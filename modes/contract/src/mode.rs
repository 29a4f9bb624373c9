//! The one trait every data plane implements.

use std::fmt;

use crate::{ModeError, ProxyState};

/// The name of a data-plane mode, as `--proxy-mode` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModeName {
    /// iptables-restore transactions (the default).
    Iptables,
    /// One nft transaction per sync.
    Nftables,
    /// IP Virtual Server over generic netlink.
    Ipvs,
    /// A userspace TCP/UDP proxy.
    Userspace,
}

impl ModeName {
    /// The `--proxy-mode` spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ipvs => "ipvs",
            Self::Userspace => "userspace",
        }
    }
}

/// A `--proxy-mode` / `mode:` value that names no mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMode(pub String);

impl fmt::Display for UnknownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a proxy mode", self.0)
    }
}

impl std::error::Error for UnknownMode {}

impl ModeName {
    /// Every mode.
    pub const ALL: [ModeName; 4] = [
        ModeName::Iptables,
        ModeName::Nftables,
        ModeName::Ipvs,
        ModeName::Userspace,
    ];
}

/// The one parser of a mode's name: exactly as `--proxy-mode` spells it (a blank value, which
/// upstream reads as the platform's default, is the caller's to resolve).
impl std::str::FromStr for ModeName {
    type Err = UnknownMode;

    fn from_str(text: &str) -> Result<Self, UnknownMode> {
        ModeName::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .ok_or_else(|| UnknownMode(text.to_string()))
    }
}

impl fmt::Display for ModeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts that describe a plan, for logs, metrics and the dry-run summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanStats {
    /// Kernel objects (rules, elements, virtual servers) the plan adds.
    pub added: usize,
    /// Kernel objects the plan removes.
    pub removed: usize,
    /// Containers (chains, sets, services) the plan rewrites, adds or deletes.
    pub containers_touched: usize,
}

/// How many kernel objects of one kind a mode owns in one family and table, for the
/// `kproxy_kernel_objects` gauge (and upstream's `kubeproxy_sync_proxy_rules_iptables_total`).
/// Operators watch these to see a ruleset grow with the cluster before it hurts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCount {
    /// The family the objects belong to.
    pub family: crate::IpFamily,
    /// The table (`nat`, `filter`, `kproxy`, `ipvs`, ...).
    pub table: &'static str,
    /// What is counted (`rules`, `chains`, `elements`, `virtual_servers`, ...).
    pub kind: &'static str,
    /// How many.
    pub count: usize,
}

/// One atomic change to the kernel. Its `Display` is the dry-run output: exactly what `apply`
/// would send, grouped by service, so the printed diff and the applied change cannot disagree.
pub trait Plan: fmt::Display + fmt::Debug + Send {
    /// Whether applying this plan would change nothing.
    fn is_empty(&self) -> bool;
    /// Counts for logs and metrics.
    fn stats(&self) -> PlanStats;
}

/// A data plane.
///
/// `render` and `plan` are pure: they read no kernel and no clock, and depend only on their
/// arguments (the desired state, the [`Mode::Facts`] read from the node just before, the
/// [`Mode::Memo`] of the previous render) and the mode's settings, so a dry run and a real run
/// compute the same plan and a test can replay any sequence of renders. (One exception is
/// state the kernel holds and the mode tracks: IPVS's `plan` keeps draining the real servers
/// its `apply` started draining.) The other methods are the I/O. The sync loop owns the mode
/// (`&mut self`) and the memo, so no lock guards kernel state or render caches.
pub trait Mode: Send + 'static {
    /// Kernel objects in this mode's vocabulary (chains and rules, tables and elements, ...).
    type Rules: fmt::Debug + Clone + Default + Send + Sync + 'static;
    /// One atomic change from one `Rules` to another.
    type Plan: Plan + 'static;
    /// What one render hands to the next: the fragments of service ports that did not change,
    /// and the previous result, so that a sync after one change formats only that change. The
    /// caller holds it between renders; a fresh (default) memo renders from scratch and gives
    /// the same rules. `()` for a mode that keeps nothing.
    type Memo: Default + Send + 'static;
    /// What rendering needs to know of the node that only I/O can tell (the IPVS mode: the
    /// local addresses that carry NodePorts), read by [`Mode::observe`]. `()` for a mode whose
    /// rules leave such lookups to the kernel.
    type Facts: fmt::Debug + Clone + Default + Send + 'static;

    /// Which mode this is.
    fn name(&self) -> ModeName;

    /// Reads the [`Mode::Facts`] the next render needs from this network namespace.
    fn observe(&self) -> Self::Facts;

    /// Renders the desired state into kernel objects. Pure: the same arguments give the same
    /// rules, and the memo only spares work (its previous render is reused where the desired
    /// state did not change).
    fn render(
        &self,
        desired: &ProxyState,
        facts: &Self::Facts,
        memo: &mut Self::Memo,
    ) -> Self::Rules;

    /// Observes and renders from scratch, with a fresh memo: for one-shot callers (tests,
    /// benchmarks, the fuzzer) that keep no memo between renders.
    fn render_once(&self, desired: &ProxyState) -> Self::Rules {
        self.render(desired, &self.observe(), &mut Self::Memo::default())
    }

    /// Reads what the kernel holds of this mode's objects. Changes nothing.
    fn read_live(&mut self) -> Result<Self::Rules, ModeError>;

    /// The change that turns `live` into `desired`. Pure; an empty plan means nothing to do.
    fn plan(&self, live: &Self::Rules, desired: &Self::Rules) -> Self::Plan;

    /// The change that rewrites everything this mode owns into `desired`, whatever `live` holds:
    /// the escalation after a transaction the kernel keeps rejecting (for example a table left
    /// in a shape the incremental plan cannot patch). Still one atomic transaction. Defaults to
    /// [`Mode::plan`].
    fn plan_rebuild(&self, live: &Self::Rules, desired: &Self::Rules) -> Self::Plan {
        self.plan(live, desired)
    }

    /// A cheap probe between full resyncs: `true` when someone has visibly removed this mode's
    /// objects (upstream's canary chains), so the next sync must read the kernel back. Errors
    /// count as drift. The default never reports drift.
    fn drifted(&mut self) -> bool {
        false
    }

    /// Counts the objects in `rules` (the applied state), by family, table and kind. The default
    /// counts nothing.
    fn count_objects(&self, rules: &Self::Rules) -> Vec<ObjectCount> {
        let _ = rules;
        Vec::new()
    }

    /// Applies a plan atomically: all of it or none of it.
    fn apply(&mut self, plan: &Self::Plan) -> Result<(), ModeError>;

    /// Removes every kernel object this mode owns, and nothing else.
    fn cleanup(&mut self) -> Result<(), ModeError>;

    /// The node set-up this mode needs, done once before its first apply, or alone by
    /// `--init-only` (upstream runs that as a privileged init container). Failures are logged,
    /// not returned: the mode still proxies. Default: nothing to set up.
    fn node_setup(&mut self) {}

    /// The daemon is stopping on a signal (SIGTERM, SIGINT); the rules stay in place for the
    /// next kproxy. A mode that carries traffic in the process (userspace) hands it over and lets
    /// what is in flight finish here, blocking for as long as that takes; the kernel modes have
    /// nothing to do. The default does nothing.
    fn stop(&self) {}
}
