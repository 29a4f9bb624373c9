//! kproxy's IPVS mode: the kernel's IP Virtual Server does the load balancing, as in upstream's
//! `ipvs` mode. The packet path and the layout of the kernel objects are in this crate's README
//! (`modes/ipvs/README.md`).
//!
//! - Every service address (ClusterIP, externalIP, LB IP) is bound to the dummy interface
//!   `kproxy-ipvs0` so the node accepts packets for it; on a kernel without the `dummy` link type
//!   the addresses become `local` routes on `lo` tagged with route protocol 107 instead.
//! - One virtual server per service address:port/protocol and per NodePort address:NodePort;
//!   endpoints are real servers (NAT forwarding, weight 1); `--ipvs-scheduler` picks the
//!   scheduler; ClientIP affinity is persistence.
//! - Graceful termination: a TCP real server that leaves gets weight 0 and is deleted once its
//!   active and inactive connection counts reach zero (polled on every sync) or after
//!   [`IpvsOptions::drain_bound`]. UDP and SCTP real servers go at once, as upstream.
//! - What IPVS cannot do lives in one nftables table per family, `kproxy-ipvs`, with static
//!   chains and named sets ([`render`]): masquerade marks, hairpin, source ranges, DROP for Local
//!   policies without local endpoints, REJECT of unserved ports on service addresses.
//! - Incremental, O(changes): a render starts from the last one and re-renders only the service
//!   ports that changed ([`render::render_cached`]); the rules are persistent maps, so the plan
//!   walks only what differs from the believed (or read-back) state; the nft sets change
//!   element by element. The nft table is not parsed back: a full sync rewrites it in one
//!   transaction.
//! - IPVS has no transactions: a sync's changes are sent in order (addresses, services, real
//!   servers, deletions) in batches; a failure leaves part applied and the next sync reads the
//!   kernel back and finishes the job.
//! - Ownership: only virtual servers on kproxy's service addresses and on this node's own
//!   addresses are read back and diffed; others are never seen, so never deleted. Inside that
//!   scope, [`IpvsOptions::exclude_cidrs`] (`--ipvs-exclude-cidrs`) protects more: a virtual
//!   server there is never deleted by a sync (a load balancer another program runs on a node
//!   address survives).
//! - Start-up, once, before the first change (so never in `--dry-run`, `--cleanup` or
//!   `kproxy trace`, which make none): the IPVS sysctls, strict ARP
//!   ([`IpvsOptions::strict_arp`]) and IPVS's connection timeouts ([`IpvsOptions::timeouts`]).
//!   Each failure there is a warning: the proxy still works without them.
//!
//! The kernel is behind [`IpvsKernel`]; [`fake::FakeKernel`] implements it in memory.

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod genl;
pub mod kernel;
pub mod model;
pub mod plan;
pub mod render;
pub mod socket;
pub mod trace;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use kproxy_contract::clock::{Clock, SystemClock};
use kproxy_contract::{Cause, IpFamily, Mode, ModeError, ModeName, ObjectCount, ProxyState};

pub use kernel::{IpvsKernel, KernelError, SystemKernel, probe};
pub use model::{DUMMY, IpvsRules, IpvsTimeouts, RsKey, VipHolder, VsKey};
pub use plan::{IpvsOp, IpvsPlan};
pub use socket::GenlError;

/// The schedulers `--ipvs-scheduler` accepts (upstream's list plus the kernel's newer ones).
pub const SCHEDULERS: [&str; 14] = [
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos",
];

/// Settings of the IPVS mode.
#[derive(Debug, Clone)]
pub struct IpvsOptions {
    /// The scheduler of every virtual server.
    pub scheduler: String,
    /// The families to program.
    pub families: Vec<IpFamily>,
    /// A draining real server is deleted after this even if connections remain.
    pub drain_bound: Duration,
    /// `--ipvs-strict-arp`: at start, `arp_ignore` 1 and `arp_announce` 2 for all interfaces
    /// of kproxy's network namespace ([`STRICT_ARP`]). Every service address is a local
    /// address of the node (on `kproxy-ipvs0`), and by default Linux answers ARP for any local
    /// address on any interface: the node would claim every ClusterIP and LoadBalancer IP on
    /// its links, which breaks L2 load-balancer announcements (MetalLB and the like) that
    /// require this setting.
    pub strict_arp: bool,
    /// `--ipvs-exclude-cidrs`: virtual servers inside these ranges are never deleted by a
    /// sync, even on a node address (which kproxy otherwise owns for NodePorts), so IPVS
    /// services of other software on the node survive. Desired ones are still created and
    /// updated there. `--cleanup` does not consult it.
    pub exclude_cidrs: Vec<IpNet>,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`: set once at start
    /// when any is nonzero; a zero leaves that kernel timeout as it is.
    pub timeouts: IpvsTimeouts,
}

/// Strict ARP's sysctls and values (upstream's): reply to ARP only for addresses of the
/// interface the request came in on (`arp_ignore` 1), and announce only the best local
/// address for the target (`arp_announce` 2), so addresses on `kproxy-ipvs0` are neither
/// answered for nor used as ARP sources on the node's links.
pub const STRICT_ARP: [(&str, u64); 2] = [
    ("net/ipv4/conf/all/arp_ignore", 1),
    ("net/ipv4/conf/all/arp_announce", 2),
];

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            scheduler: "rr".into(),
            families: IpFamily::ALL.to_vec(),
            drain_bound: Duration::from_secs(15 * 60),
            strict_arp: false,
            exclude_cidrs: Vec::new(),
            timeouts: IpvsTimeouts::default(),
        }
    }
}

/// The local addresses that may carry NodePorts, sorted: not loopback, not link-local, not on
/// kproxy's dummy interface (those are service addresses). Every one gets a virtual server per
/// NodePort, as upstream's IPVS mode does; [`Mode::observe`] reads them before each render.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddresses(pub Vec<IpAddr>);

/// The IPVS data plane.
#[derive(Debug)]
pub struct IpvsMode<K: IpvsKernel = SystemKernel> {
    kernel: K,
    options: IpvsOptions,
    holder: Option<VipHolder>,
    /// Real servers at weight 0 waiting for their connections to end, since when.
    draining: BTreeMap<(VsKey, RsKey), Instant>,
    /// When a real server started draining, and whether its bound has passed.
    clock: Arc<dyn Clock>,
    prepared: bool,
}

impl<K: IpvsKernel> IpvsMode<K> {
    /// A mode programming through `kernel`.
    pub fn new(kernel: K, options: IpvsOptions) -> Self {
        Self {
            kernel,
            options,
            holder: None,
            draining: BTreeMap::new(),
            clock: Arc::new(SystemClock),
            prepared: false,
        }
    }

    /// The same mode reading time from `clock` (tests move it past the drain bound).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The kernel seam (tests inspect the fake through it).
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The kernel seam, mutably (tests change the fake's counters).
    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    /// Real servers currently draining.
    pub fn draining(&self) -> Vec<(VsKey, RsKey)> {
        self.draining.keys().copied().collect()
    }

    /// Local addresses that may carry NodePorts: not loopback, not link-local, not kproxy's.
    fn node_port_candidates(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .kernel
            .local_addresses()
            .into_iter()
            .filter(|(iface, a)| iface != DUMMY && usable_local(a))
            .map(|(_, a)| a)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The node settings upstream's proxier makes when it starts, made once before the first
    /// change: strict ARP and IPVS's connection timeouts. They are not re-checked on every
    /// sync, as upstream: another program changing them later wins. Failures are warnings
    /// (upstream fails on a strict-ARP write; kproxy keeps proxying, as it does for every
    /// sysctl it cannot write).
    fn start_up(&mut self) {
        if self.options.strict_arp {
            for (name, value) in STRICT_ARP {
                // Written only when different, so a read-only /proc/sys that already holds
                // the right values is no warning.
                if self.kernel.sysctl(name).is_ok_and(|cur| cur == value) {
                    continue;
                }
                match self.kernel.set_sysctl(name, value) {
                    Ok(()) => {
                        tracing::info!(sysctl = name, value, "set sysctl for --ipvs-strict-arp")
                    }
                    Err(err) => tracing::warn!(
                        sysctl = name,
                        value,
                        error = %kproxy_contract::Chain(&err),
                        "could not set a sysctl for --ipvs-strict-arp; the node may answer ARP for service addresses"
                    ),
                }
            }
        }
        let wanted = self.options.timeouts;
        if wanted.is_unset() {
            return;
        }
        match self.kernel.set_timeouts(&wanted) {
            Ok(()) => match self.kernel.timeouts() {
                Ok(now) => tracing::info!(
                    tcp = now.tcp,
                    tcpfin = now.tcp_fin,
                    udp = now.udp,
                    "IPVS connection timeouts set (seconds; a zero flag left the kernel's)"
                ),
                Err(err) => tracing::info!(
                    requested = %wanted,
                    error = %kproxy_contract::Chain(&err),
                    "IPVS connection timeouts set; reading them back failed"
                ),
            },
            Err(err) => tracing::warn!(
                tcp = wanted.tcp,
                tcpfin = wanted.tcp_fin,
                udp = wanted.udp,
                error = %kproxy_contract::Chain(&err),
                "could not set the IPVS connection timeouts; the kernel's stay"
            ),
        }
    }

    /// Deletes draining real servers whose connections have ended (or that hit the bound).
    /// Failures are warnings: the next sync tries again.
    fn reap(&mut self) {
        let mut by_vs: BTreeMap<VsKey, Vec<(RsKey, Instant)>> = BTreeMap::new();
        for ((vs, rs), since) in &self.draining {
            by_vs.entry(*vs).or_default().push((*rs, *since));
        }
        let mut ops = Vec::new();
        let mut forget = Vec::new();
        let now = self.clock.now();
        for (vs, members) in by_vs {
            let counters = match self.kernel.dest_counters(&vs) {
                Ok(c) => c,
                Err(KernelError::Ipvs(GenlError::Refused { errno, .. }))
                    if errno == socket::ESRCH || errno == socket::ENOENT =>
                {
                    // The virtual server is gone, and its real servers with it.
                    forget.extend(members.iter().map(|(rs, _)| (vs, *rs)));
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%vs, error = %kproxy_contract::Chain(&err), "cannot read draining real servers");
                    continue;
                }
            };
            for (rs, since) in members {
                match counters.iter().find(|(r, _)| *r == rs) {
                    None => forget.push((vs, rs)),
                    Some((_, c)) if c.weight > 0 => forget.push((vs, rs)),
                    Some((_, c)) => {
                        let idle = c.active == 0 && c.inactive == 0;
                        let expired = now.duration_since(since) >= self.options.drain_bound;
                        if idle || expired {
                            tracing::debug!(%vs, %rs, idle, "draining real server removed");
                            ops.push(IpvsOp::DelDest(vs, rs));
                        }
                    }
                }
            }
        }
        if !ops.is_empty() {
            match self.kernel.execute(&ops) {
                Ok(()) => {
                    for op in &ops {
                        if let IpvsOp::DelDest(vs, rs) = op {
                            forget.push((*vs, *rs));
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %kproxy_contract::Chain(&err), "cannot remove drained real servers")
                }
            }
        }
        for k in forget {
            self.draining.remove(&k);
        }
    }
}

/// Loopback and link-local addresses never carry NodePorts (upstream's IPVS mode has no
/// localhost NodePorts).
fn usable_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

fn mode_error(read: bool) -> impl FnOnce(KernelError) -> ModeError {
    move |err| {
        let cause = match err {
            KernelError::Ipvs(GenlError::NoIpvs) => {
                return ModeError::Unsupported(
                    "IPVS (CONFIG_IP_VS); use --proxy-mode nftables or iptables",
                );
            }
            KernelError::Ipvs(e) => Cause::Netlink {
                interface: "IPVS netlink",
                cause: Box::new(e),
            },
            KernelError::Command(c) => c,
        };
        if read {
            ModeError::ReadLive {
                mode: ModeName::Ipvs,
                cause,
            }
        } else {
            ModeError::Rejected {
                mode: ModeName::Ipvs,
                cause,
            }
        }
    }
}

impl<K: IpvsKernel> Mode for IpvsMode<K> {
    type Rules = IpvsRules;
    type Plan = IpvsPlan;
    /// Every service port's fragment and the last result: a render after a few changes is
    /// O(changes) ([`render::render_cached`]).
    type Memo = render::RenderCache;
    type Facts = LocalAddresses;

    fn name(&self) -> ModeName {
        ModeName::Ipvs
    }

    /// The local addresses that carry NodePorts (read from this network namespace).
    fn observe(&self) -> LocalAddresses {
        LocalAddresses(self.node_port_candidates())
    }

    fn render(
        &self,
        desired: &ProxyState,
        local: &LocalAddresses,
        memo: &mut render::RenderCache,
    ) -> IpvsRules {
        render::render_cached(
            desired,
            &render::RenderInput {
                scheduler: &self.options.scheduler,
                local_addresses: &local.0,
                families: &self.options.families,
            },
            memo,
        )
    }

    fn read_live(&mut self) -> Result<IpvsRules, ModeError> {
        let (holder, vips) = self.kernel.vips().map_err(mode_error(true))?;
        if holder.is_some() {
            self.holder = holder;
        }
        // Ours: virtual servers on the service addresses we hold and on this node's own
        // addresses (NodePorts). Virtual servers on any other address are never touched.
        let local: BTreeSet<IpAddr> = self.node_port_candidates().into_iter().collect();
        let services = self
            .kernel
            .virtual_servers()
            .map_err(mode_error(true))?
            .into_iter()
            .filter(|(k, _)| {
                self.options.families.contains(&k.family())
                    && (vips.contains(&k.addr) || local.contains(&k.addr))
            });
        let mut rules = IpvsRules::from_servers(services);
        rules.vips = vips
            .into_iter()
            .filter(|a| self.options.families.contains(&IpFamily::of(a)))
            .collect();
        Ok(rules)
    }

    fn plan(&self, live: &IpvsRules, desired: &IpvsRules) -> IpvsPlan {
        let draining: BTreeSet<(VsKey, RsKey)> = self.draining.keys().copied().collect();
        plan::plan(live, desired, &draining, false, &self.options.exclude_cidrs)
    }

    fn plan_rebuild(&self, live: &IpvsRules, desired: &IpvsRules) -> IpvsPlan {
        let draining: BTreeSet<(VsKey, RsKey)> = self.draining.keys().copied().collect();
        plan::plan(live, desired, &draining, true, &self.options.exclude_cidrs)
    }

    /// A `kproxy-ipvs` table is gone: the next sync reads back and rewrites it.
    fn drifted(&mut self) -> bool {
        match self.kernel.nft_tables() {
            Ok(have) => self.options.families.iter().any(|f| !have.contains(f)),
            Err(err) => {
                tracing::warn!(error = %kproxy_contract::Chain(&err), "cannot list nft tables; full resync");
                true
            }
        }
    }

    fn apply(&mut self, plan: &IpvsPlan) -> Result<(), ModeError> {
        self.node_setup();
        if let Some(script) = plan.nft_script() {
            self.kernel.nft(&script).map_err(mode_error(false))?;
        }
        if !plan.vips_add.is_empty() || !plan.vips_del.is_empty() {
            let holder = match self.holder {
                Some(h) => h,
                None => {
                    let h = self.kernel.ensure_holder().map_err(mode_error(false))?;
                    self.holder = Some(h);
                    h
                }
            };
            self.kernel
                .change_vips(holder, &plan.vips_add, &[])
                .map_err(mode_error(false))?;
            self.kernel.execute(&plan.ops).map_err(mode_error(false))?;
            self.kernel
                .change_vips(holder, &[], &plan.vips_del)
                .map_err(mode_error(false))?;
        } else {
            self.kernel.execute(&plan.ops).map_err(mode_error(false))?;
        }
        let now = self.clock.now();
        for op in &plan.ops {
            match op {
                IpvsOp::AddDest(vs, rs, w) | IpvsOp::UpdateDest(vs, rs, w) if *w > 0 => {
                    self.draining.remove(&(*vs, *rs));
                }
                IpvsOp::DelDest(vs, rs) => {
                    self.draining.remove(&(*vs, *rs));
                }
                IpvsOp::DelService(vs) => self.draining.retain(|(k, _), _| k != vs),
                _ => {}
            }
        }
        for d in &plan.draining {
            self.draining.entry(*d).or_insert(now);
        }
        self.reap();
        Ok(())
    }

    fn count_objects(&self, rules: &IpvsRules) -> Vec<ObjectCount> {
        let mut out = Vec::new();
        for family in IpFamily::ALL {
            let servers = rules.count(family);
            let count = |kind, count| ObjectCount {
                family,
                table: "ipvs",
                kind,
                count,
            };
            out.push(count("virtual_servers", servers.virtual_servers));
            out.push(count("real_servers", servers.real_servers));
        }
        out
    }

    /// IPVS's sysctls, strict ARP and the connection timeouts, done once.
    fn node_setup(&mut self) {
        if !self.prepared {
            self.kernel.prepare();
            self.start_up();
            self.prepared = true;
        }
    }

    /// Every virtual server on kproxy's addresses (its service addresses and this node's own
    /// addresses, as [`Mode::read_live`] scopes them), the `kproxy-ipvs` tables, the dummy
    /// interface and kproxy's `lo` routes. [`IpvsOptions::exclude_cidrs`] is not consulted:
    /// upstream's cleanup ignores it too (and flushes all of IPVS, which kproxy never does).
    /// On a kernel without IPVS there are no virtual servers to remove; the rest is still
    /// cleaned.
    fn cleanup(&mut self) -> Result<(), ModeError> {
        match self.read_live() {
            Ok(live) => {
                let ops: Vec<IpvsOp> = live
                    .services()
                    .keys()
                    .map(|k| IpvsOp::DelService(*k))
                    .collect();
                self.kernel.execute(&ops).map_err(mode_error(false))?;
            }
            Err(ModeError::Unsupported(_)) => {}
            Err(e) => return Err(e),
        }
        let tables = self.kernel.nft_tables().map_err(mode_error(true))?;
        let script: String = tables
            .iter()
            .map(|f| {
                format!(
                    "delete table {} {}\n",
                    render::family_name(*f),
                    render::TABLE
                )
            })
            .collect();
        if !script.is_empty() {
            self.kernel.nft(&script).map_err(mode_error(false))?;
        }
        self.kernel.remove_holder().map_err(mode_error(false))?;
        self.holder = None;
        self.draining.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
