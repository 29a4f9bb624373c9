//! The difference between two [`IpvsRules`]: virtual and real servers to add, change, drain or
//! delete, addresses to bind and unbind, and the netfilter script. Its `Display` is the
//! `--dry-run` output, in `ipvsadm`'s command syntax.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use imbl::ordset::DiffItem as SetDiff;
use imbl::{OrdMap, OrdSet};
use ipnet::IpNet;
use kproxy_contract::{IpFamily, Plan, PlanStats, Protocol};

use crate::model::{IpvsRules, NftTable, RsKey, VsConfig, VsKey};
use crate::render::{TABLE, family_name};

/// One IPVS change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsOp {
    /// `ipvsadm -A`.
    AddService(VsKey, VsConfig),
    /// `ipvsadm -E`.
    UpdateService(VsKey, VsConfig),
    /// `ipvsadm -D`.
    DelService(VsKey),
    /// `ipvsadm -a`.
    AddDest(VsKey, RsKey, u32),
    /// `ipvsadm -e`.
    UpdateDest(VsKey, RsKey, u32),
    /// `ipvsadm -d`.
    DelDest(VsKey, RsKey),
}

impl IpvsOp {
    /// The virtual server it concerns.
    pub fn key(&self) -> &VsKey {
        match self {
            IpvsOp::AddService(k, _)
            | IpvsOp::UpdateService(k, _)
            | IpvsOp::DelService(k)
            | IpvsOp::AddDest(k, _, _)
            | IpvsOp::UpdateDest(k, _, _)
            | IpvsOp::DelDest(k, _) => k,
        }
    }
}

fn config_args(c: &VsConfig) -> String {
    match c.persistence {
        Some(p) => format!("-s {} -p {p}", c.scheduler),
        None => format!("-s {}", c.scheduler),
    }
}

impl fmt::Display for IpvsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpvsOp::AddService(k, c) => write!(f, "-A {k} {}", config_args(c)),
            IpvsOp::UpdateService(k, c) => write!(f, "-E {k} {}", config_args(c)),
            IpvsOp::DelService(k) => write!(f, "-D {k}"),
            IpvsOp::AddDest(k, r, w) => write!(f, "-a {k} -r {r} -m -w {w}"),
            IpvsOp::UpdateDest(k, r, w) => write!(f, "-e {k} -r {r} -m -w {w}"),
            IpvsOp::DelDest(k, r) => write!(f, "-d {k} -r {r}"),
        }
    }
}

/// How a family's netfilter table changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftChange {
    /// Rewrite the whole table (first sync, a read-back, or new node settings).
    Rewrite(String),
    /// Element updates only.
    Elements(String),
}

impl NftChange {
    /// The nft script.
    pub fn script(&self) -> &str {
        match self {
            NftChange::Rewrite(s) | NftChange::Elements(s) => s,
        }
    }
}

/// One sync's change.
#[derive(Debug, Clone, Default)]
pub struct IpvsPlan {
    /// Service addresses to bind, before the virtual servers that use them.
    pub vips_add: Vec<IpAddr>,
    /// Service addresses to unbind, after their virtual servers are gone.
    pub vips_del: Vec<IpAddr>,
    /// IPVS changes in order: services added or updated, real servers added, updated, drained
    /// and deleted, services deleted.
    pub ops: Vec<IpvsOp>,
    /// Real servers that leave gracefully (weight 0, deleted once their connections end).
    pub draining: Vec<(VsKey, RsKey)>,
    /// Real servers already draining that this apply re-checks.
    pub reap: usize,
    /// The netfilter changes, per family (one nft transaction for all of them).
    pub nft: BTreeMap<IpFamily, NftChange>,
    /// Virtual servers this plan would have deleted, kept because their address is inside
    /// `--ipvs-exclude-cidrs`. Shown by `--dry-run`; nothing is done with them.
    pub kept: Vec<VsKey>,
    /// Owner names for the grouping in `Display` (the desired rules' map, shared).
    owners: OrdMap<VsKey, Arc<str>>,
}

impl IpvsPlan {
    /// The whole nft script, or `None` when nothing changes.
    pub fn nft_script(&self) -> Option<String> {
        if self.nft.is_empty() {
            return None;
        }
        Some(self.nft.values().map(NftChange::script).collect())
    }
}

impl Plan for IpvsPlan {
    fn is_empty(&self) -> bool {
        self.vips_add.is_empty()
            && self.vips_del.is_empty()
            && self.ops.is_empty()
            && self.draining.is_empty()
            && self.reap == 0
            && self.nft.is_empty()
    }

    fn stats(&self) -> PlanStats {
        let mut s = PlanStats::default();
        for op in &self.ops {
            match op {
                IpvsOp::AddService(..) | IpvsOp::AddDest(..) => s.added += 1,
                IpvsOp::DelService(..) | IpvsOp::DelDest(..) => s.removed += 1,
                IpvsOp::UpdateService(..) | IpvsOp::UpdateDest(..) => {}
            }
        }
        s.added += self.vips_add.len();
        s.removed += self.vips_del.len();
        let touched: BTreeSet<&VsKey> = self.ops.iter().map(IpvsOp::key).collect();
        s.containers_touched = touched.len() + self.nft.len();
        s
    }
}

impl fmt::Display for IpvsPlan {
    /// `ipvsadm`-style lines grouped by service port, then the address and netfilter changes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut groups: BTreeMap<&str, Vec<&IpvsOp>> = BTreeMap::new();
        for op in &self.ops {
            let owner = self
                .owners
                .get(op.key())
                .map_or("(no longer a service)", |o| &**o);
            groups.entry(owner).or_default().push(op);
        }
        for (owner, ops) in groups {
            writeln!(f, "# {owner}")?;
            for op in ops {
                writeln!(f, "ipvsadm {op}")?;
            }
        }
        if !self.draining.is_empty() {
            writeln!(
                f,
                "# {} real server(s) leave gracefully: weight 0 now, deleted once their connections end",
                self.draining.len()
            )?;
        }
        if !self.kept.is_empty() {
            writeln!(
                f,
                "# kept: inside --ipvs-exclude-cidrs, so never deleted by kproxy"
            )?;
            for k in &self.kept {
                writeln!(f, "# (not run) ipvsadm -D {k}")?;
            }
        }
        if self.reap > 0 {
            writeln!(
                f,
                "# {} draining real server(s): deleted if their connections have ended",
                self.reap
            )?;
        }
        for a in &self.vips_add {
            writeln!(f, "ip address add {} ({})", host(a), crate::model::DUMMY)?;
        }
        for a in &self.vips_del {
            writeln!(f, "ip address del {} ({})", host(a), crate::model::DUMMY)?;
        }
        for (family, change) in &self.nft {
            match change {
                NftChange::Rewrite(_) => {
                    writeln!(f, "# nft: rewrite table {} {TABLE}", family_name(*family))?
                }
                NftChange::Elements(_) => writeln!(
                    f,
                    "# nft: element changes in table {} {TABLE}",
                    family_name(*family)
                )?,
            }
            f.write_str(change.script())?;
        }
        Ok(())
    }
}

/// `addr/32` or `addr/128`.
pub fn host(a: &IpAddr) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}/32"),
        IpAddr::V6(_) => format!("{a}/128"),
    }
}

/// Whether real servers of this protocol leave gracefully. Upstream deletes UDP and SCTP
/// real servers at once: they have no connection end to wait for, and stale flows are cut by
/// `expire_nodest_conn`.
pub fn graceful(protocol: Protocol) -> bool {
    protocol == Protocol::Tcp
}

/// Plans `live` → `desired`. `draining` holds the real servers the mode is already draining
/// (so a returning endpoint is re-weighted instead of re-added). `rebuild` rewrites the
/// netfilter tables whatever `live` says (the virtual servers are always diffed: rewriting
/// them would cut every connection). A virtual server of `live` that is not desired is
/// deleted unless its address is inside one of `protected` (`--ipvs-exclude-cidrs`): those
/// are left to whoever made them, as upstream does, and listed in [`IpvsPlan::kept`].
///
/// The comparison walks the persistent maps' difference, which skips what the two share: after
/// an incremental render from the believed rules, that is all but the changed service ports.
pub fn plan(
    live: &IpvsRules,
    desired: &IpvsRules,
    draining: &BTreeSet<(VsKey, RsKey)>,
    rebuild: bool,
    protected: &[IpNet],
) -> IpvsPlan {
    let mut p = IpvsPlan {
        owners: desired.owners.clone(),
        reap: draining.len(),
        ..IpvsPlan::default()
    };
    let mut dest_adds = Vec::new();
    let mut dest_updates = Vec::new();
    let mut dest_dels = Vec::new();
    let mut svc_dels = Vec::new();
    for item in live.services().diff(desired.services()) {
        match item {
            DiffItem::Add(key, want) => {
                p.ops.push(IpvsOp::AddService(*key, want.config.clone()));
                for (rs, w) in &want.dests {
                    if draining.contains(&(*key, *rs)) {
                        // Still in the kernel at weight 0 (we believed it gone).
                        dest_updates.push(IpvsOp::UpdateDest(*key, *rs, *w));
                    } else {
                        dest_adds.push(IpvsOp::AddDest(*key, *rs, *w));
                    }
                }
            }
            DiffItem::Update {
                old: (_, have),
                new: (key, want),
            } => {
                if have.config != want.config {
                    p.ops.push(IpvsOp::UpdateService(*key, want.config.clone()));
                }
                for (rs, w) in &want.dests {
                    match have.dests.get(rs) {
                        None if draining.contains(&(*key, *rs)) => {
                            dest_updates.push(IpvsOp::UpdateDest(*key, *rs, *w))
                        }
                        None => dest_adds.push(IpvsOp::AddDest(*key, *rs, *w)),
                        Some(hw) if hw != w => dest_updates.push(IpvsOp::UpdateDest(*key, *rs, *w)),
                        Some(_) => {}
                    }
                }
                for (rs, hw) in &have.dests {
                    if want.dests.contains_key(rs) {
                        continue;
                    }
                    if graceful(key.protocol) {
                        if *hw != 0 {
                            dest_updates.push(IpvsOp::UpdateDest(*key, *rs, 0));
                        }
                        p.draining.push((*key, *rs));
                    } else {
                        dest_dels.push(IpvsOp::DelDest(*key, *rs));
                    }
                }
            }
            DiffItem::Remove(key, _) => {
                if protected.iter().any(|net| net.contains(&key.addr)) {
                    p.kept.push(*key);
                } else {
                    svc_dels.push(IpvsOp::DelService(*key));
                }
            }
        }
    }
    p.ops.extend(dest_adds);
    p.ops.extend(dest_updates);
    p.ops.extend(dest_dels);
    p.ops.extend(svc_dels);
    for item in live.vips.diff(&desired.vips) {
        match item {
            SetDiff::Add(a) => p.vips_add.push(*a),
            SetDiff::Remove(a) => p.vips_del.push(*a),
        }
    }
    if let Some(want) = &desired.nft {
        for (family, table) in want {
            let have = live.nft.as_ref().and_then(|t| t.get(family));
            match have {
                Some(h) if h.head == table.head && !rebuild => {
                    let s = element_script(*family, h, table);
                    if !s.is_empty() {
                        p.nft.insert(*family, NftChange::Elements(s));
                    }
                }
                _ => {
                    p.nft
                        .insert(*family, NftChange::Rewrite(rewrite_script(*family, table)));
                }
            }
        }
        // A family no longer programmed: its table goes.
        if let Some(have) = &live.nft {
            for family in have.keys().filter(|f| !want.contains_key(f)) {
                p.nft.insert(
                    *family,
                    NftChange::Rewrite(format!(
                        "table {f} {TABLE}\ndelete table {f} {TABLE}\n",
                        f = family_name(*family)
                    )),
                );
            }
        }
    }
    p
}

fn rewrite_script(family: IpFamily, t: &NftTable) -> String {
    let f = family_name(family);
    let mut s = format!("table {f} {TABLE}\ndelete table {f} {TABLE}\n{}", t.head);
    for (name, elems) in &t.sets {
        write_elements(&mut s, "add", f, name, elems.iter());
    }
    s
}

fn element_script(family: IpFamily, have: &NftTable, want: &NftTable) -> String {
    let f = family_name(family);
    let mut s = String::new();
    let empty = OrdSet::new();
    for (name, elems) in &want.sets {
        let old = have.sets.get(name).unwrap_or(&empty);
        let (mut add, mut del) = (Vec::new(), Vec::new());
        for item in old.diff(elems) {
            match item {
                SetDiff::Add(e) => add.push(e),
                SetDiff::Remove(e) => del.push(e),
            }
        }
        write_elements(&mut s, "delete", f, name, del.into_iter());
        write_elements(&mut s, "add", f, name, add.into_iter());
    }
    s
}

/// `add|delete element FAMILY TABLE SET { a, b, ... }`, in chunks so no line is huge.
fn write_elements<'a>(
    s: &mut String,
    verb: &str,
    family: &str,
    set: &str,
    elems: impl Iterator<Item = &'a String>,
) {
    let elems: Vec<&String> = elems.collect();
    for chunk in elems.chunks(1000) {
        let _ = writeln!(
            s,
            "{verb} element {family} {TABLE} {set} {{ {} }}",
            chunk
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
