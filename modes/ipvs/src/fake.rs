//! An in-memory kernel with IPVS's answers (EEXIST for duplicates, ESRCH for unknown services
//! and real servers), for unit tests and the benchmark.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kproxy_contract::{Cause, IpFamily};

use crate::kernel::{IpvsKernel, KernelError};
use crate::model::{DUMMY, DestCounters, IpvsTimeouts, RsKey, VipHolder, VirtualServer, VsKey};
use crate::plan::IpvsOp;
use crate::socket::{EEXIST, ESRCH, GenlError};

/// The fake kernel's state, public for assertions.
#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    /// Whether the kernel has IPVS at all.
    pub no_ipvs: bool,
    /// Whether the kernel has the dummy link type.
    pub no_dummy: bool,
    /// Virtual servers.
    pub services: BTreeMap<VsKey, VirtualServer>,
    /// Connection counters per real server (absent: zero).
    pub conns: BTreeMap<(VsKey, RsKey), (u32, u32)>,
    /// Which holder exists.
    pub holder: Option<VipHolder>,
    /// Bound service addresses.
    pub vips: BTreeSet<IpAddr>,
    /// Other interfaces' addresses.
    pub local: Vec<(String, IpAddr)>,
    /// Every nft script applied, in order.
    pub nft_scripts: Vec<String>,
    /// Which `kproxy-ipvs` tables exist.
    pub tables: BTreeSet<IpFamily>,
    /// Every IPVS change executed, in order.
    pub executed: Vec<IpvsOp>,
    /// Times `prepare` ran.
    pub prepared: usize,
    /// Fail the next `execute` with this errno.
    pub fail_next: Option<i32>,
    /// IPVS's connection timeouts (`FakeKernel::new`: the kernel's defaults 900/120/300).
    pub timeouts: IpvsTimeouts,
    /// Every `SET_CONFIG` sent, in order.
    pub set_configs: Vec<IpvsTimeouts>,
    /// Refuse `SET_CONFIG` with this errno.
    pub refuse_set_config: Option<i32>,
    /// Sysctls by path under `/proc/sys` (absent: unreadable).
    pub sysctls: BTreeMap<String, u64>,
    /// Every sysctl write, in order.
    pub sysctl_writes: Vec<(String, u64)>,
    /// Sysctl writes fail (a read-only `/proc/sys`).
    pub sysctls_read_only: bool,
}

impl FakeKernel {
    /// A kernel with IPVS, dummy interfaces and one node address; its timeouts and ARP
    /// sysctls are the kernel's defaults.
    pub fn new() -> FakeKernel {
        FakeKernel {
            local: vec![
                ("lo".into(), "127.0.0.1".parse().expect("ip")),
                ("eth0".into(), "10.0.1.1".parse().expect("ip")),
            ],
            timeouts: IpvsTimeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300,
            },
            sysctls: [
                ("net/ipv4/conf/all/arp_ignore".to_string(), 0),
                ("net/ipv4/conf/all/arp_announce".to_string(), 0),
            ]
            .into_iter()
            .collect(),
            ..FakeKernel::default()
        }
    }

    fn refuse(what: &IpvsOp, errno: i32) -> KernelError {
        KernelError::Ipvs(GenlError::Refused {
            request: format!("ipvsadm {what}"),
            errno,
        })
    }

    fn one(&mut self, op: &IpvsOp) -> Result<(), KernelError> {
        match op {
            IpvsOp::AddService(k, c) => {
                if self.services.contains_key(k) {
                    return Err(Self::refuse(op, EEXIST));
                }
                self.services.insert(
                    *k,
                    VirtualServer {
                        config: c.clone(),
                        dests: BTreeMap::new(),
                    },
                );
            }
            IpvsOp::UpdateService(k, c) => {
                self.services
                    .get_mut(k)
                    .ok_or_else(|| Self::refuse(op, ESRCH))?
                    .config = c.clone();
            }
            IpvsOp::DelService(k) => {
                self.services.remove(k);
                self.conns.retain(|(vs, _), _| vs != k);
            }
            IpvsOp::AddDest(k, r, w) => {
                let s = self
                    .services
                    .get_mut(k)
                    .ok_or_else(|| Self::refuse(op, ESRCH))?;
                if s.dests.contains_key(r) {
                    return Err(Self::refuse(op, EEXIST));
                }
                s.dests.insert(*r, *w);
            }
            IpvsOp::UpdateDest(k, r, w) => {
                let s = self
                    .services
                    .get_mut(k)
                    .ok_or_else(|| Self::refuse(op, ESRCH))?;
                let d = s
                    .dests
                    .get_mut(r)
                    .ok_or_else(|| Self::refuse(op, ENOENT_DEST))?;
                *d = *w;
            }
            IpvsOp::DelDest(k, r) => {
                if let Some(s) = self.services.get_mut(k) {
                    s.dests.remove(r);
                }
                self.conns.remove(&(*k, *r));
            }
        }
        self.executed.push(op.clone());
        Ok(())
    }
}

/// IPVS answers ENOENT for a SET_DEST on an unknown real server.
const ENOENT_DEST: i32 = 2;

impl IpvsKernel for FakeKernel {
    fn virtual_servers(&mut self) -> Result<BTreeMap<VsKey, VirtualServer>, KernelError> {
        if self.no_ipvs {
            return Err(GenlError::NoIpvs.into());
        }
        Ok(self.services.clone())
    }

    fn dest_counters(&mut self, key: &VsKey) -> Result<Vec<(RsKey, DestCounters)>, KernelError> {
        let s = self.services.get(key).ok_or_else(|| {
            KernelError::Ipvs(GenlError::Refused {
                request: "GET_DEST".into(),
                errno: ESRCH,
            })
        })?;
        Ok(s.dests
            .iter()
            .map(|(rs, w)| {
                let (active, inactive) = self.conns.get(&(*key, *rs)).copied().unwrap_or((0, 0));
                (
                    *rs,
                    DestCounters {
                        weight: *w,
                        active,
                        inactive,
                    },
                )
            })
            .collect())
    }

    fn execute(&mut self, ops: &[IpvsOp]) -> Result<(), KernelError> {
        if self.no_ipvs {
            return Err(GenlError::NoIpvs.into());
        }
        if let Some(errno) = self.fail_next.take()
            && let Some(op) = ops.first()
        {
            return Err(Self::refuse(op, errno));
        }
        for op in ops {
            self.one(op)?;
        }
        Ok(())
    }

    fn local_addresses(&self) -> Vec<(String, IpAddr)> {
        let mut out = self.local.clone();
        if self.holder == Some(VipHolder::Dummy) {
            out.extend(self.vips.iter().map(|a| (DUMMY.to_string(), *a)));
        }
        out
    }

    fn vips(&mut self) -> Result<(Option<VipHolder>, BTreeSet<IpAddr>), KernelError> {
        Ok((self.holder, self.vips.clone()))
    }

    fn ensure_holder(&mut self) -> Result<VipHolder, KernelError> {
        let h = if self.no_dummy {
            VipHolder::LoRoutes
        } else {
            VipHolder::Dummy
        };
        self.holder = Some(h);
        Ok(h)
    }

    fn change_vips(
        &mut self,
        holder: VipHolder,
        add: &[IpAddr],
        del: &[IpAddr],
    ) -> Result<(), KernelError> {
        if self.holder != Some(holder) {
            return Err(Cause::Failed {
                program: "ip".into(),
                status: "exit status: 1".into(),
                stderr: format!("no holder {holder:?}"),
            }
            .into());
        }
        self.vips.extend(add.iter().copied());
        for a in del {
            self.vips.remove(a);
        }
        Ok(())
    }

    fn remove_holder(&mut self) -> Result<(), KernelError> {
        self.holder = None;
        self.vips.clear();
        Ok(())
    }

    fn nft(&mut self, script: &str) -> Result<(), KernelError> {
        // Track table existence from the script's table statements.
        for line in script.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let fam = |w: &str| match w {
                "ip" => Some(IpFamily::V4),
                "ip6" => Some(IpFamily::V6),
                _ => None,
            };
            match words.as_slice() {
                ["table", f, _, ..] => {
                    if let Some(f) = fam(f) {
                        self.tables.insert(f);
                    }
                }
                ["delete", "table", f, _] => {
                    if let Some(f) = fam(f) {
                        self.tables.remove(&f);
                    }
                }
                _ => {}
            }
        }
        // A rewrite re-creates the table after deleting it.
        for line in script.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", f, _, "{"] = words.as_slice() {
                match *f {
                    "ip" => self.tables.insert(IpFamily::V4),
                    _ => self.tables.insert(IpFamily::V6),
                };
            }
        }
        self.nft_scripts.push(script.to_string());
        Ok(())
    }

    fn nft_tables(&mut self) -> Result<BTreeSet<IpFamily>, KernelError> {
        Ok(self.tables.clone())
    }

    fn prepare(&mut self) {
        self.prepared += 1;
    }

    fn timeouts(&mut self) -> Result<IpvsTimeouts, KernelError> {
        if self.no_ipvs {
            return Err(GenlError::NoIpvs.into());
        }
        Ok(self.timeouts)
    }

    fn set_timeouts(&mut self, timeouts: &IpvsTimeouts) -> Result<(), KernelError> {
        if self.no_ipvs {
            return Err(GenlError::NoIpvs.into());
        }
        self.set_configs.push(*timeouts);
        if let Some(errno) = self.refuse_set_config {
            return Err(KernelError::Ipvs(GenlError::Refused {
                request: format!("ipvsadm --set {timeouts}"),
                errno,
            }));
        }
        // ip_vs_set_timeout: zero leaves a value.
        self.timeouts = timeouts.over(self.timeouts);
        Ok(())
    }

    fn sysctl(&self, name: &str) -> std::io::Result<u64> {
        self.sysctls
            .get(name)
            .copied()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    fn set_sysctl(&mut self, name: &str, value: u64) -> std::io::Result<()> {
        if self.sysctls_read_only {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        self.sysctl_writes.push((name.to_string(), value));
        self.sysctls.insert(name.to_string(), value);
        Ok(())
    }
}
