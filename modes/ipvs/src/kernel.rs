//! The kernel seam: IPVS over generic netlink, service addresses on the dummy interface (or
//! `lo` routes), the nft table, and the IPVS sysctls. [`crate::fake`] implements the same trait
//! in memory for the unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kproxy_contract::{Cause, IpFamily};

use crate::genl;
use crate::model::{
    DUMMY, DestCounters, IpvsTimeouts, ROUTE_PROTO, RsKey, VipHolder, VirtualServer, VsKey,
};
use crate::plan::{IpvsOp, host};
use crate::render::{TABLE, family_name};
use crate::socket::{EEXIST, ENOENT, ESRCH, GenlError, IpvsSocket, Request};

/// Why the kernel could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// IPVS itself.
    #[error(transparent)]
    Ipvs(#[from] GenlError),
    /// `ip` or `nft`.
    #[error(transparent)]
    Command(#[from] Cause),
}

/// Everything the IPVS mode reads and writes.
pub trait IpvsKernel: Send + 'static {
    /// Every address/protocol/port virtual server with its real servers and weights.
    fn virtual_servers(&mut self) -> Result<BTreeMap<VsKey, VirtualServer>, KernelError>;
    /// One virtual server's real servers with their connection counters.
    fn dest_counters(&mut self, key: &VsKey) -> Result<Vec<(RsKey, DestCounters)>, KernelError>;
    /// Applies IPVS changes in order.
    fn execute(&mut self, ops: &[IpvsOp]) -> Result<(), KernelError>;
    /// This namespace's addresses with their interface names.
    fn local_addresses(&self) -> Vec<(String, IpAddr)>;
    /// The service addresses kproxy holds, and how (`None`: neither holder exists yet).
    fn vips(&mut self) -> Result<(Option<VipHolder>, BTreeSet<IpAddr>), KernelError>;
    /// Creates the dummy interface, or falls back to `lo` routes when the kernel has no
    /// `dummy` link type.
    fn ensure_holder(&mut self) -> Result<VipHolder, KernelError>;
    /// Binds and unbinds service addresses.
    fn change_vips(
        &mut self,
        holder: VipHolder,
        add: &[IpAddr],
        del: &[IpAddr],
    ) -> Result<(), KernelError>;
    /// Removes the dummy interface and kproxy's `lo` routes.
    fn remove_holder(&mut self) -> Result<(), KernelError>;
    /// Runs an nft script as one transaction.
    fn nft(&mut self, script: &str) -> Result<(), KernelError>;
    /// The families whose `kproxy-ipvs` table exists.
    fn nft_tables(&mut self) -> Result<BTreeSet<IpFamily>, KernelError>;
    /// Sets the IPVS sysctls (`net.ipv4.vs.conntrack` and friends). Best effort.
    fn prepare(&mut self);
    /// IPVS's connection timeouts in this namespace (`IPVS_CMD_GET_CONFIG`).
    fn timeouts(&mut self) -> Result<IpvsTimeouts, KernelError>;
    /// Sets them (`IPVS_CMD_SET_CONFIG`); a zero leaves that timeout as it is.
    fn set_timeouts(&mut self, timeouts: &IpvsTimeouts) -> Result<(), KernelError>;
    /// Reads an integer sysctl of this network namespace, by its path under `/proc/sys`
    /// (`net/ipv4/conf/all/arp_ignore`).
    fn sysctl(&self, name: &str) -> std::io::Result<u64>;
    /// Writes one.
    fn set_sysctl(&mut self, name: &str, value: u64) -> std::io::Result<()>;
}

/// Whether IPVS is present: opens a socket and resolves the family.
pub fn probe() -> Result<(), GenlError> {
    IpvsSocket::open().map(|_| ())
}

/// The real kernel.
#[derive(Debug, Default)]
pub struct SystemKernel {
    socket: Option<IpvsSocket>,
}

impl SystemKernel {
    /// A handle; the socket opens on first use.
    pub fn new() -> SystemKernel {
        SystemKernel::default()
    }

    fn socket(&mut self) -> Result<&mut IpvsSocket, GenlError> {
        if self.socket.is_none() {
            self.socket = Some(IpvsSocket::open()?);
        }
        self.socket
            .as_mut()
            .ok_or_else(|| GenlError::Protocol("socket".into()))
    }
}

fn ip(args: &[&str], stdin: Option<&str>) -> Result<String, Cause> {
    kproxy_contract::command::run("ip", "iproute2", args, stdin)
}

impl IpvsKernel for SystemKernel {
    fn virtual_servers(&mut self) -> Result<BTreeMap<VsKey, VirtualServer>, KernelError> {
        let sock = self.socket()?;
        let mut out = BTreeMap::new();
        for svc in sock.services()? {
            let Some(key) = svc.key else { continue };
            let dests = sock
                .dests(&key)?
                .into_iter()
                .map(|(rs, c)| (rs, c.weight))
                .collect();
            out.insert(
                key,
                VirtualServer {
                    config: svc.config,
                    dests,
                },
            );
        }
        Ok(out)
    }

    fn dest_counters(&mut self, key: &VsKey) -> Result<Vec<(RsKey, DestCounters)>, KernelError> {
        Ok(self.socket()?.dests(key)?)
    }

    fn execute(&mut self, ops: &[IpvsOp]) -> Result<(), KernelError> {
        let requests = ops.iter().map(|op| request(op, false)).collect();
        match self.socket()?.execute(requests) {
            // Something we believed absent exists (a real server still draining, or a virtual
            // server left by an earlier run): run the batch again with adds as updates, which
            // is idempotent for what already succeeded.
            Err(GenlError::Refused { errno, .. }) if errno == EEXIST => {
                let retry = ops.iter().map(|op| request(op, true)).collect();
                Ok(self.socket()?.execute(retry)?)
            }
            other => Ok(other?),
        }
    }

    fn local_addresses(&self) -> Vec<(String, IpAddr)> {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for ifa in addrs {
            let Some(addr) = ifa.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                out.push((ifa.interface_name, IpAddr::V4(v4.ip())));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                out.push((ifa.interface_name, IpAddr::V6(v6.ip())));
            }
        }
        out
    }

    fn vips(&mut self) -> Result<(Option<VipHolder>, BTreeSet<IpAddr>), KernelError> {
        let dummy_exists = nix::ifaddrs::getifaddrs()
            .map(|mut it| it.any(|i| i.interface_name == DUMMY))
            .unwrap_or(false);
        if dummy_exists {
            return Ok((Some(VipHolder::Dummy), dummy_service_addresses()));
        }
        let routes = lo_routes()?;
        Ok(((!routes.is_empty()).then_some(VipHolder::LoRoutes), routes))
    }

    fn ensure_holder(&mut self) -> Result<VipHolder, KernelError> {
        if let (Some(VipHolder::Dummy), _) = self.vips()? {
            return Ok(VipHolder::Dummy);
        }
        match ip(&["link", "add", DUMMY, "type", "dummy"], None) {
            Ok(_) => {
                ip(&["link", "set", DUMMY, "up"], None)?;
                tracing::info!(
                    interface = DUMMY,
                    "created the dummy interface for service addresses"
                );
                Ok(VipHolder::Dummy)
            }
            Err(Cause::Failed { stderr, .. })
                if stderr.contains("Unknown device type")
                    || stderr.contains("not supported")
                    || stderr.contains("Operation not supported") =>
            {
                tracing::info!(
                    "this kernel has no dummy interfaces; service addresses become local routes on lo (proto {ROUTE_PROTO})"
                );
                Ok(VipHolder::LoRoutes)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn change_vips(
        &mut self,
        holder: VipHolder,
        add: &[IpAddr],
        del: &[IpAddr],
    ) -> Result<(), KernelError> {
        if add.is_empty() && del.is_empty() {
            return Ok(());
        }
        let mut batch = String::new();
        for (verb, addrs) in [("replace", add), ("del", del)] {
            for a in addrs {
                let line = match holder {
                    VipHolder::Dummy => {
                        let nodad = if a.is_ipv6() { " nodad" } else { "" };
                        format!("address {verb} {} dev {DUMMY}{nodad}\n", host(a))
                    }
                    VipHolder::LoRoutes => format!(
                        "route {verb} local {} dev lo table local proto {ROUTE_PROTO}\n",
                        host(a)
                    ),
                };
                batch.push_str(&line);
            }
        }
        ip(&["-batch", "-"], Some(&batch))?;
        Ok(())
    }

    fn remove_holder(&mut self) -> Result<(), KernelError> {
        let (holder, routes) = self.vips()?;
        if holder == Some(VipHolder::Dummy) {
            ip(&["link", "del", DUMMY], None)?;
        }
        let routes = if holder == Some(VipHolder::LoRoutes) {
            routes
        } else {
            lo_routes()?
        };
        let list: Vec<IpAddr> = routes.into_iter().collect();
        self.change_vips(VipHolder::LoRoutes, &[], &list)
    }

    fn nft(&mut self, script: &str) -> Result<(), KernelError> {
        kproxy_contract::command::run("nft", "nftables", &["-f", "-"], Some(script)).map_err(
            |e| match e {
                Cause::Failed {
                    program,
                    status,
                    stderr,
                } => Cause::Failed {
                    program,
                    status,
                    stderr: stderr.lines().take(3).collect::<Vec<_>>().join(" | "),
                },
                other => other,
            },
        )?;
        Ok(())
    }

    fn nft_tables(&mut self) -> Result<BTreeSet<IpFamily>, KernelError> {
        // One table at a time: `nft list tables` reads every set element of every table first
        // (seconds next to the nftables mode's table at 10,000 services).
        let mut out = BTreeSet::new();
        for family in IpFamily::ALL {
            let args = ["-t", "list", "table", family_name(family), TABLE];
            match kproxy_contract::command::run("nft", "nftables", &args, None) {
                Ok(_) => {
                    out.insert(family);
                }
                Err(Cause::Failed { stderr, .. })
                    if stderr.contains("No such file or directory") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn prepare(&mut self) {
        // Upstream's settings: conntrack for IPVS connections (masquerade needs it), drop
        // connections whose real server is gone, expire persistence templates of quiesced
        // (weight 0) servers so affinity does not pin clients to a draining endpoint.
        for (key, value) in [
            ("conntrack", "1"),
            ("expire_nodest_conn", "1"),
            ("expire_quiescent_template", "1"),
        ] {
            let path = format!("/proc/sys/net/ipv4/vs/{key}");
            if let Err(err) = std::fs::write(&path, value) {
                tracing::warn!(%path, error = %err, "cannot set an IPVS sysctl");
            }
        }
    }

    fn timeouts(&mut self) -> Result<IpvsTimeouts, KernelError> {
        Ok(self.socket()?.timeouts()?)
    }

    fn set_timeouts(&mut self, timeouts: &IpvsTimeouts) -> Result<(), KernelError> {
        let request = Request {
            msg: genl::set_config(timeouts),
            what: format!("ipvsadm --set {timeouts}"),
            tolerate: &[],
        };
        Ok(self.socket()?.execute(vec![request])?)
    }

    fn sysctl(&self, name: &str) -> std::io::Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/sys/{name}"))?;
        text.trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    fn set_sysctl(&mut self, name: &str, value: u64) -> std::io::Result<()> {
        // /proc/sys/net follows the writing thread's network namespace: kproxy's own.
        std::fs::write(format!("/proc/sys/{name}"), value.to_string())
    }
}

/// The service addresses on the dummy interface: those bound as host addresses (/32, /128),
/// as kproxy binds them. Anything else there is not a service address and must never be
/// planned for deletion: the IPv6 link-local address (`fe80::…/64`) the kernel gives the
/// interface when it comes up, or an address someone added by hand. (Deleting it as a host
/// address fails with EADDRNOTAVAIL, which failed every sync that read the kernel back: each
/// one after a restart.)
fn dummy_service_addresses() -> BTreeSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    let mut out = BTreeSet::new();
    for ifa in addrs.filter(|i| i.interface_name == DUMMY) {
        let Some(addr) = ifa.address else { continue };
        let (ip, mask) = if let Some(v4) = addr.as_sockaddr_in() {
            let mask = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in().map(|m| m.ip().to_bits().count_ones()));
            (IpAddr::V4(v4.ip()), mask)
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let mask = ifa
                .netmask
                .and_then(|m| m.as_sockaddr_in6().map(|m| m.ip().to_bits().count_ones()));
            (IpAddr::V6(v6.ip()), mask)
        } else {
            continue;
        };
        if is_bound_service_address(&ip, mask) {
            out.insert(ip);
        }
    }
    out
}

/// Whether an address on the dummy interface, with its prefix length when known, is one kproxy
/// bound: a host address, never link-local.
fn is_bound_service_address(ip: &IpAddr, prefix: Option<u32>) -> bool {
    let (host, link_local) = match ip {
        IpAddr::V4(a) => (32, a.is_link_local()),
        IpAddr::V6(a) => (128, (a.segments()[0] & 0xffc0) == 0xfe80),
    };
    !link_local && prefix.is_none_or(|p| p == host)
}

/// The netlink request for one change; `upsert` turns adds into updates.
fn request(op: &IpvsOp, upsert: bool) -> Request {
    let (msg, tolerate): (_, &'static [i32]) = match op {
        IpvsOp::AddService(k, c) if upsert => (genl::set_service(k, c), &[]),
        IpvsOp::AddService(k, c) => (genl::new_service(k, c), &[]),
        IpvsOp::UpdateService(k, c) => (genl::set_service(k, c), &[]),
        // Already gone is what we want.
        IpvsOp::DelService(k) => (genl::del_service(k), &[ESRCH, ENOENT]),
        IpvsOp::AddDest(k, r, w) => (genl::put_dest(upsert, k, r, *w), &[]),
        IpvsOp::UpdateDest(k, r, w) => (genl::put_dest(true, k, r, *w), &[]),
        IpvsOp::DelDest(k, r) => (genl::del_dest(k, r), &[ESRCH, ENOENT]),
    };
    Request {
        msg,
        what: format!("ipvsadm {op}"),
        tolerate,
    }
}

/// kproxy's local routes on `lo` (the fallback holder), both families.
fn lo_routes() -> Result<BTreeSet<IpAddr>, KernelError> {
    let mut out = BTreeSet::new();
    for fam in ["-4", "-6"] {
        let proto = ROUTE_PROTO.to_string();
        let text = match ip(
            &[fam, "route", "show", "table", "local", "proto", &proto],
            None,
        ) {
            Ok(t) => t,
            // No local table yet (a namespace whose interfaces are all down), or no IPv6:
            // nothing of ours there.
            Err(Cause::Failed { stderr, .. })
                if fam == "-6" || stderr.contains("FIB table does not exist") =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("local") {
                continue;
            }
            if let Some(a) = words
                .next()
                .and_then(|w| w.split('/').next())
                .and_then(|w| w.parse::<IpAddr>().ok())
            {
                out.insert(a);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::is_bound_service_address;

    #[test]
    fn only_host_addresses_on_the_dummy_are_service_addresses() {
        let ok = |a: &str, p| is_bound_service_address(&a.parse().unwrap(), p);
        assert!(ok("10.96.0.10", Some(32)));
        assert!(ok("fd00:96::1", Some(128)));
        assert!(ok("10.96.0.10", None));
        // The link-local address the kernel adds when the interface comes up.
        assert!(!ok("fe80::7046:91ff:feca:ac8f", Some(64)));
        assert!(!ok("fe80::1", Some(128)));
        // An address added by hand with a real prefix.
        assert!(!ok("192.0.2.1", Some(24)));
    }
}
