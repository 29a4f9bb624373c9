//! The IPVS mode's kernel vocabulary: virtual servers with their real servers, the addresses
//! bound to kproxy's interface, and the netfilter table that does what IPVS cannot.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use kproxy_contract::{IpFamily, Protocol};

/// The interface that carries every service address (upstream: `kube-ipvs0`).
pub const DUMMY: &str = "kproxy-ipvs0";

/// The route protocol number that tags kproxy's local routes on `lo` when the kernel has no
/// `dummy` link type (`ip route ... proto 107`); 107 is unassigned in `rt_protos`.
pub const ROUTE_PROTO: u8 = 107;

/// A virtual server's identity: address, protocol, port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    /// The virtual address (service IP or node address).
    pub addr: IpAddr,
    /// The transport protocol.
    pub protocol: Protocol,
    /// The virtual port.
    pub port: u16,
}

impl VsKey {
    /// The address family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.addr)
    }
}

impl fmt::Display for VsKey {
    /// ipvsadm's spelling: `-t 10.96.0.1:80`, `-u [fd00::1]:53`, `--sctp-service ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = match self.protocol {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
            Protocol::Sctp => "--sctp-service",
        };
        write!(f, "{flag} {}", SockFmt(self.addr, self.port))
    }
}

/// `addr:port` with brackets around IPv6 addresses.
pub struct SockFmt(pub IpAddr, pub u16);

impl fmt::Display for SockFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.1),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.1),
        }
    }
}

/// A real server's identity within its virtual server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RsKey {
    /// The endpoint address.
    pub addr: IpAddr,
    /// The endpoint port.
    pub port: u16,
}

impl fmt::Display for RsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SockFmt(self.addr, self.port).fmt(f)
    }
}

/// A virtual server's settings (what `SET_SERVICE` changes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VsConfig {
    /// The scheduler name (`rr`, `wrr`, ...).
    pub scheduler: String,
    /// ClientIP affinity: the persistence timeout in seconds.
    pub persistence: Option<u32>,
}

/// A virtual server and its real servers (endpoint → weight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualServer {
    /// Its settings.
    pub config: VsConfig,
    /// Its real servers and their weights (0: draining).
    pub dests: BTreeMap<RsKey, u32>,
}

/// Per real server counters read back from the kernel (graceful termination polls them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DestCounters {
    /// The weight the kernel holds.
    pub weight: u32,
    /// Established connections.
    pub active: u32,
    /// Other connections (closing, SYN received, UDP flows).
    pub inactive: u32,
}

/// How service addresses are made local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VipHolder {
    /// Addresses on the dummy interface [`DUMMY`] (upstream's way).
    #[default]
    Dummy,
    /// `local` routes on `lo` tagged [`ROUTE_PROTO`]: kernels without the `dummy` link type.
    LoRoutes,
}

/// One family's netfilter table (`ip kproxy-ipvs` / `ip6 kproxy-ipvs`): static chains that
/// depend only on node settings, and named sets holding the per-service data.
///
/// The sets are persistent (`imbl`) sets: a render after a few changes shares everything else
/// with the rules before it, so copying the believed rules is O(1) and their difference is
/// found without visiting the shared parts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftTable {
    /// The table declaration without set elements; a change rewrites the table.
    pub head: String,
    /// Set name → elements in nft syntax.
    pub sets: BTreeMap<&'static str, OrdSet<String>>,
}

/// How many virtual and real servers one family holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerCount {
    /// Virtual servers.
    pub virtual_servers: usize,
    /// Real servers over all virtual servers.
    pub real_servers: usize,
}

/// Everything the IPVS mode owns.
///
/// Persistent maps (`imbl`) throughout, for the same reason as [`NftTable`]'s sets: the sync
/// loop keeps the applied rules and plans the next render against them, and both share all but
/// what changed, so a sync after one endpoint change costs O(changes), not O(services).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpvsRules {
    /// Virtual servers by key; changed only through [`IpvsRules::insert_server`] and
    /// [`IpvsRules::remove_server`], which keep [`IpvsRules::count`] right.
    services: OrdMap<VsKey, Arc<VirtualServer>>,
    /// Per family (IPv4, IPv6): what `services` holds.
    counts: [ServerCount; 2],
    /// Service addresses made local on this node.
    pub vips: OrdSet<IpAddr>,
    /// The netfilter tables; `None` when read back from the kernel (kproxy does not parse its
    /// table back: a full sync rewrites it in one transaction, see the crate docs).
    pub nft: Option<BTreeMap<IpFamily, NftTable>>,
    /// Which service port each virtual server serves (`ns/name:port`), for the dry-run grouping.
    /// Not part of the kernel state: read-back rules have none.
    pub owners: OrdMap<VsKey, Arc<str>>,
}

fn slot(family: IpFamily) -> usize {
    match family {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

impl IpvsRules {
    /// Rules holding `servers` (a read-back), nothing else.
    pub fn from_servers(servers: impl IntoIterator<Item = (VsKey, VirtualServer)>) -> IpvsRules {
        let mut out = IpvsRules::default();
        for (key, vs) in servers {
            out.insert_server(key, Arc::new(vs));
        }
        out
    }

    /// The virtual servers by key.
    pub fn services(&self) -> &OrdMap<VsKey, Arc<VirtualServer>> {
        &self.services
    }

    /// Adds or replaces the virtual server at `key`.
    pub fn insert_server(&mut self, key: VsKey, vs: Arc<VirtualServer>) {
        let count = &mut self.counts[slot(key.family())];
        count.virtual_servers += 1;
        count.real_servers += vs.dests.len();
        if let Some(old) = self.services.insert(key, vs) {
            count.virtual_servers -= 1;
            count.real_servers -= old.dests.len();
        }
    }

    /// Removes the virtual server at `key`.
    pub fn remove_server(&mut self, key: &VsKey) -> Option<Arc<VirtualServer>> {
        let old = self.services.remove(key)?;
        let count = &mut self.counts[slot(key.family())];
        count.virtual_servers -= 1;
        count.real_servers -= old.dests.len();
        Some(old)
    }

    /// What `family` holds, without walking the servers (metrics read it after every sync).
    pub fn count(&self, family: IpFamily) -> ServerCount {
        self.counts[slot(family)]
    }
}

/// IPVS's own connection timeouts, in seconds (`ipvsadm --set TCP TCPFIN UDP`): how long an
/// idle established TCP connection, a TCP connection after its FIN, and a UDP flow keep their
/// real server. They are per network namespace and apply to every virtual server. Zero means
/// "leave the kernel's value": `IPVS_CMD_SET_CONFIG` only changes the nonzero ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpvsTimeouts {
    /// Established TCP (`--ipvs-tcp-timeout`; the kernel's default is 900).
    pub tcp: u32,
    /// TCP after a FIN (`--ipvs-tcpfin-timeout`; the kernel's default is 120).
    pub tcp_fin: u32,
    /// UDP (`--ipvs-udp-timeout`; the kernel's default is 300).
    pub udp: u32,
}

impl IpvsTimeouts {
    /// From the configured durations: whole seconds (as upstream truncates them), saturating
    /// at `u32::MAX` (the kernel refuses values that large with EINVAL, which is then a
    /// warning like any other refusal).
    pub fn from_durations(
        tcp: std::time::Duration,
        tcp_fin: std::time::Duration,
        udp: std::time::Duration,
    ) -> IpvsTimeouts {
        let secs = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        IpvsTimeouts {
            tcp: secs(tcp),
            tcp_fin: secs(tcp_fin),
            udp: secs(udp),
        }
    }

    /// Whether nothing is configured (upstream then never sends `SET_CONFIG`).
    pub fn is_unset(&self) -> bool {
        self.tcp == 0 && self.tcp_fin == 0 && self.udp == 0
    }

    /// What the kernel holds after `self` is applied over `current` (zero leaves a value).
    pub fn over(&self, current: IpvsTimeouts) -> IpvsTimeouts {
        let pick = |new: u32, old: u32| if new == 0 { old } else { new };
        IpvsTimeouts {
            tcp: pick(self.tcp, current.tcp),
            tcp_fin: pick(self.tcp_fin, current.tcp_fin),
            udp: pick(self.udp, current.udp),
        }
    }
}

impl fmt::Display for IpvsTimeouts {
    /// ipvsadm's order: `tcp tcpfin udp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.tcp, self.tcp_fin, self.udp)
    }
}
