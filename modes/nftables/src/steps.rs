//! How a plan reaches the kernel: one `nft -f` transaction, or up to three transactions with
//! the element changes in the middle one sent through netlink ([`crate::netlink`]).
//!
//! Element changes are nearly all of a sync (130,000 elements in a first sync at 10,000
//! services; two in a typical endpoint change), and `nft -f` spends most of its time parsing
//! them and, per run, fetching its cache. So when a plan allows it, it is applied as:
//!
//! 1. `nft -f`: new sets, new regular chains with their rules, additions to interval sets.
//!    Neutral: nothing refers to a new set or chain yet (they are only reached through map
//!    elements added in step 2 or base chains added in step 3); an interval set only gains
//!    elements (`service-cidrs` drops traffic to addresses that no service uses yet,
//!    `firewall-allow` admits sources for frontends that will need it).
//! 2. netlink, one batch, one transaction: every element deletion, then every addition, of
//!    the non-interval sets and maps of both families. This is the step that changes
//!    forwarding, atomically. Its `goto` elements need their chains to exist (step 1).
//! 3. `nft -f`: new base chains with their rules (which switch a new table on only now, with
//!    its maps filled), then the deletion of chains and sets no longer referenced (a chain
//!    can only be deleted once no element refers to it: after step 2).
//!
//! Empty steps are skipped, so an element-only plan (the common incremental sync) is one
//! netlink batch. A plan that deletes or re-creates a table, rewrites a chain that exists, or
//! deletes elements from an interval set (rare: upgrades, config and source-range changes)
//! goes through one `nft -f` as a whole, as does a plan with no netlink elements at all; its new
//! sets and regular chains go first in an `nft -f` of their own ([`chains_first`]).
//!
//! If netlink is unavailable (no socket, EPERM) or an element cannot be encoded, the plan
//! falls back to `nft -f` with a warning: the whole plan when nothing was applied yet, else
//! steps 2 and 3 as one script. If the kernel refuses the batch, nothing of step 2 was
//! applied and the error is returned: the sync loop retries with a full read-back.
//!
//! Element deletions are idempotent, so that two kproxies applying the same change (the old
//! and the new pod of a rolling update with surge, in one network namespace) both succeed:
//! `NFT_MSG_DESTROYSETELEM` where the kernel has it (6.3 and later); elsewhere a deletion that
//! finds nothing fails the batch with ENOENT naming the element, and the batch is sent again
//! without it ([`apply_elements`], at most [`MAX_MISSING`] times per batch).
//!
//! The steps are a value, [`Schedule`], computed from the plan alone. `--dry-run` prints it
//! (the plan's `Display`), and [`execute`] runs it step by step through the kernel seam
//! ([`StepKernel`]): the real kernel and the fake run the same order, and the fake checks at
//! every step what the kernel would refuse (a `goto` to a chain that does not exist yet, a chain
//! deleted while an element still leads to it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kproxy_contract::Cause;

use crate::netlink::batch::Deletes;
use crate::netlink::{self, NetlinkError, socket};
use crate::plan::{ElementList, FamilyPlan, NftPlan};

/// How many already-deleted elements one batch may meet on a kernel without
/// `NFT_MSG_DESTROYSETELEM` (each costs a round trip) before the sync fails as a whole.
pub const MAX_MISSING: usize = 64;

/// Which way a plan's element changes may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Via {
    /// Through netlink when the plan allows it (the module documentation).
    #[default]
    Netlink,
    /// Every plan through `nft -f` (`KPROXY_NFT_APPLY=nft`, for comparisons).
    NftOnly,
}

/// One transaction of a [`Schedule`].
#[derive(Debug, Clone)]
pub enum Step {
    /// One `nft -f` transaction of this plan.
    Nft(NftPlan),
    /// One netlink batch: the schedule's plan's element changes of non-interval sets and maps
    /// (deletions, then additions). Not copied out of the plan: a first sync has 130,000 of
    /// them at 10,000 services.
    Elements,
}

/// How one plan reaches the kernel: its transactions in order. See the module documentation.
#[derive(Debug, Clone)]
pub struct Schedule<'a> {
    plan: &'a NftPlan,
    /// The transactions, in order (none for an empty plan).
    pub steps: Vec<Step>,
    /// Why the plan goes through `nft -f` alone, when it does.
    pub whole: Option<&'static str>,
}

impl<'a> Schedule<'a> {
    /// The schedule for `plan`.
    pub fn of(plan: &'a NftPlan, via: Via) -> Schedule<'a> {
        if plan.families.is_empty() {
            return Schedule {
                plan,
                steps: Vec::new(),
                whole: None,
            };
        }
        if via == Via::NftOnly {
            return Schedule::whole(plan, "KPROXY_NFT_APPLY=nft");
        }
        let split = match split(plan) {
            Ok(split) => split,
            Err(reason) => return Schedule::whole(plan, reason),
        };
        if !has_netlink_elements(plan) {
            return Schedule::whole(plan, "no element change goes through netlink");
        }
        let mut steps = Vec::new();
        if !split.prepare.families.is_empty() {
            steps.push(Step::Nft(split.prepare));
        }
        steps.push(Step::Elements);
        if !split.finish.families.is_empty() {
            steps.push(Step::Nft(split.finish));
        }
        Schedule {
            plan,
            steps,
            whole: None,
        }
    }

    /// `plan` through `nft -f` alone: its new sets and regular chains first when the tables
    /// stay ([`chains_first`]), then the rest.
    fn whole(plan: &'a NftPlan, why: &'static str) -> Schedule<'a> {
        let steps = match chains_first(plan) {
            Some((first, rest)) => vec![Step::Nft(first), Step::Nft(rest)],
            None => vec![Step::Nft(plan.clone())],
        };
        Schedule {
            plan,
            steps,
            whole: Some(why),
        }
    }

    /// What `step` carries, as it is sent: an `nft -f` step's script, a netlink batch's
    /// element statements ([`elements_text`]).
    pub fn text(&self, step: &Step) -> String {
        match step {
            Step::Nft(plan) => plan.script(),
            Step::Elements => elements_text(self.plan),
        }
    }
}

/// The element changes one netlink batch of `plan` carries (its non-interval sets and maps),
/// in nft syntax.
pub fn elements_text(plan: &NftPlan) -> String {
    struct Text<'a>(&'a NftPlan);
    impl fmt::Display for Text<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.write_element_changes(f)
        }
    }
    Text(&netlink_elements(plan)).to_string()
}

impl fmt::Display for Schedule<'_> {
    /// Each transaction as it is sent: `nft -f` steps as their scripts, the netlink batch as
    /// the element statements it carries (the same elements, in nft syntax).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            return writeln!(f, "# no changes");
        }
        let n = self.steps.len();
        for (i, step) in self.steps.iter().enumerate() {
            let why = self.whole.map(|w| format!(" ({w})")).unwrap_or_default();
            match step {
                Step::Nft(_) => writeln!(f, "# transaction {} of {n}: nft -f{why}", i + 1)?,
                Step::Elements => writeln!(
                    f,
                    "# transaction {} of {n}: one netlink batch, element deletions then additions",
                    i + 1
                )?,
            }
            f.write_str(&self.text(step))?;
        }
        Ok(())
    }
}

/// The kernel as a schedule drives it: one `nft -f` transaction, or one netlink batch of
/// element changes. The real kernel ([`crate::NftCli`]) and the fake implement it, so both run
/// [`execute`].
pub trait StepKernel {
    /// One `nft -f` transaction of `plan`.
    fn nft(&mut self, plan: &NftPlan) -> Result<(), Cause>;
    /// One netlink batch of `plan`'s element changes of non-interval sets and maps (the
    /// others go with an `nft -f` step). An error for which [`NetlinkError::use_nft_instead`]
    /// holds sent nothing.
    fn elements(&mut self, plan: &NftPlan) -> Result<(), NetlinkError>;
}

/// Runs `plan`'s [`Schedule`] through `kernel`. When netlink turns out to be unusable (no
/// socket, no permission, an element it cannot encode), the plan falls back to `nft -f` with a
/// warning: the whole plan when nothing was applied yet, else the element changes and the rest
/// as one script.
pub fn execute<K: StepKernel + ?Sized>(
    kernel: &mut K,
    plan: &NftPlan,
    via: Via,
) -> Result<(), Cause> {
    run(kernel, plan, &Schedule::of(plan, via))
}

/// Runs `schedule` (of `plan`) through `kernel`, with the fallbacks [`execute`] describes.
fn run<K: StepKernel + ?Sized>(
    kernel: &mut K,
    plan: &NftPlan,
    schedule: &Schedule,
) -> Result<(), Cause> {
    if let Some(reason) = schedule.whole {
        tracing::debug!(reason, "applying the whole plan with nft -f");
    }
    for (i, step) in schedule.steps.iter().enumerate() {
        match step {
            Step::Nft(p) => kernel.nft(p)?,
            Step::Elements => match kernel.elements(plan) {
                Ok(()) => {}
                Err(err) if err.use_nft_instead() => {
                    tracing::warn!(error = %kproxy_contract::Chain(&err), "applying the element changes with nft -f instead of netlink");
                    if i == 0 {
                        return run(kernel, plan, &Schedule::whole(plan, "netlink unavailable"));
                    }
                    let finish = match schedule.steps.get(i + 1) {
                        Some(Step::Nft(finish)) => finish.clone(),
                        _ => NftPlan::default(),
                    };
                    return kernel.nft(&rest(plan, &finish));
                }
                Err(err) => return Err(err.into()),
            },
        }
    }
    Ok(())
}

/// Whether `plan` changes an element of a non-interval set or map.
fn has_netlink_elements(plan: &NftPlan) -> bool {
    plan.families.values().any(|fp| {
        [&fp.delete_elements, &fp.add_elements]
            .into_iter()
            .flatten()
            .any(|(set, elements)| !elements.is_empty() && via_netlink(fp, set))
    })
}

/// The netlink part of `plan` as a plan of its own: the element changes of its non-interval
/// sets and maps, with their signatures (a copy: for printing and the fake kernel).
pub fn netlink_elements(plan: &NftPlan) -> NftPlan {
    let mut out = NftPlan {
        owners: plan.owners.clone(),
        ..NftPlan::default()
    };
    for (family, fp) in &plan.families {
        let part = |changes: &BTreeMap<String, ElementList>| {
            changes
                .iter()
                .filter(|(set, elements)| via_netlink(fp, set) && !elements.is_empty())
                .map(|(set, elements)| (set.clone(), elements.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let (delete_elements, add_elements) = (part(&fp.delete_elements), part(&fp.add_elements));
        if delete_elements.is_empty() && add_elements.is_empty() {
            continue;
        }
        out.families.insert(
            *family,
            FamilyPlan {
                signatures: fp.signatures.clone(),
                delete_elements,
                add_elements,
                ..FamilyPlan::default()
            },
        );
    }
    out
}

/// Steps 1 and 3 of a split plan (step 2 is the plan's netlink elements).
#[derive(Debug, Default)]
pub struct Split {
    /// New sets and regular chains, additions to interval sets.
    pub prepare: NftPlan,
    /// New base chains; stale chains and sets.
    pub finish: NftPlan,
}

/// Why a plan goes through one `nft -f` as a whole, if it does.
pub fn whole_reason(plan: &NftPlan) -> Option<&'static str> {
    for fp in plan.families.values() {
        if fp.recreate || fp.delete_table {
            return Some("a table is deleted or re-created");
        }
        if fp.write_chains.iter().any(|(_, _, existed)| *existed) {
            return Some("an existing chain is rewritten");
        }
        let known = |set: &String| fp.signatures.contains_key(set);
        if !fp.delete_elements.keys().all(known) || !fp.add_elements.keys().all(known) {
            return Some("a set of unknown type has element changes");
        }
        if fp.delete_elements.keys().any(|set| !via_netlink(fp, set)) {
            return Some("elements are deleted from an interval set");
        }
    }
    None
}

/// Steps 1 and 3, when the plan can be split (see [`whole_reason`]).
pub fn split(plan: &NftPlan) -> Result<Split, &'static str> {
    if let Some(reason) = whole_reason(plan) {
        return Err(reason);
    }
    let mut out = Split::default();
    for (family, fp) in &plan.families {
        let mut prepare = FamilyPlan {
            add_sets: fp.add_sets.clone(),
            ..FamilyPlan::default()
        };
        let mut finish = FamilyPlan {
            delete_chains: fp.delete_chains.clone(),
            delete_sets: fp.delete_sets.clone(),
            ..FamilyPlan::default()
        };
        for (name, chain) in &fp.add_chains {
            let step = if chain.base.is_some() {
                &mut finish
            } else {
                &mut prepare
            };
            step.add_chains.push((name.clone(), chain.clone()));
        }
        for (name, chain, existed) in &fp.write_chains {
            let step = if chain.base.is_some() {
                &mut finish
            } else {
                &mut prepare
            };
            step.write_chains
                .push((name.clone(), chain.clone(), *existed));
        }
        for (set, elements) in &fp.add_elements {
            if !via_netlink(fp, set) {
                prepare.add_elements.insert(set.clone(), elements.clone());
            }
        }
        if !is_empty(&prepare) {
            out.prepare.families.insert(*family, prepare);
        }
        if !is_empty(&finish) {
            out.finish.families.insert(*family, finish);
        }
    }
    Ok(out)
}

fn is_empty(fp: &FamilyPlan) -> bool {
    fp.add_sets.is_empty()
        && fp.add_chains.is_empty()
        && fp.write_chains.is_empty()
        && fp.add_elements.is_empty()
        && fp.delete_elements.is_empty()
        && fp.delete_chains.is_empty()
        && fp.delete_sets.is_empty()
}

/// Steps 2 and 3 as one `nft -f` plan: the fallback once step 1 was applied.
fn rest(plan: &NftPlan, finish: &NftPlan) -> NftPlan {
    type Changes = BTreeMap<String, ElementList>;
    let mut out = finish.clone();
    for (family, fp) in &plan.families {
        let netlink_part = |changes: &Changes| -> Changes {
            changes
                .iter()
                .filter(|(set, _)| via_netlink(fp, set))
                .map(|(set, elements)| (set.clone(), elements.clone()))
                .collect()
        };
        let (delete, add) = (
            netlink_part(&fp.delete_elements),
            netlink_part(&fp.add_elements),
        );
        if delete.is_empty() && add.is_empty() {
            continue;
        }
        let target = out.families.entry(*family).or_default();
        target.delete_elements = delete;
        target.add_elements = add;
    }
    out
}

/// Whether a set's element changes go through netlink (step 2).
fn via_netlink(fp: &FamilyPlan, set: &str) -> bool {
    fp.signatures.get(set).is_some_and(|s| netlink::handles(s))
}

/// Applies `plan` through `nft` (a function applying a plan with one `nft -f`) and this
/// namespace's nf_tables netlink: [`execute`] with [`NetlinkElements`].
pub fn apply(plan: &NftPlan, nft: impl FnMut(&NftPlan) -> Result<(), Cause>) -> Result<(), Cause> {
    execute(&mut NetlinkElements(nft), plan, Via::Netlink)
}

/// A [`StepKernel`] of an `nft -f` function and this namespace's nf_tables netlink.
pub struct NetlinkElements<F>(pub F);

impl<F: FnMut(&NftPlan) -> Result<(), Cause>> StepKernel for NetlinkElements<F> {
    fn nft(&mut self, plan: &NftPlan) -> Result<(), Cause> {
        (self.0)(plan)
    }

    fn elements(&mut self, plan: &NftPlan) -> Result<(), NetlinkError> {
        send_elements(plan).map(|(elements, messages)| {
            tracing::debug!(
                elements,
                messages,
                "element changes applied through netlink"
            );
        })
    }
}

/// Sends `plan`'s element changes as one netlink batch (with [`apply_elements`]'s retries).
/// Returns the elements and messages of the batch that was applied.
pub fn send_elements(plan: &NftPlan) -> Result<(usize, usize), NetlinkError> {
    let socket = socket::acquire()?;
    let deletes = socket.deletes();
    let sent = match netlink::encode(plan, deletes, &BTreeSet::new()) {
        Ok(Some(batch)) => apply_elements(&socket, plan, deletes, batch),
        Ok(None) => Ok((0, 0)),
        Err(err) => Err(err),
    };
    // A socket the kernel answered with an error is not kept for the next batch; one that
    // sent nothing (an element this encoder cannot write) is.
    if matches!(sent, Ok(_) | Err(NetlinkError::Encode { .. })) {
        socket::release(socket);
    }
    sent
}

/// Sends `batch` (step 2 of `plan`, encoded with `deletes`); where a deletion finds its element
/// already gone (ENOENT, possible only with [`Deletes::Delete`]), sends the batch again without
/// it. Returns the elements and messages of the batch that was applied.
pub fn apply_elements(
    socket: &socket::NftSocket,
    plan: &NftPlan,
    deletes: Deletes,
    batch: netlink::batch::Batch<'_>,
) -> Result<(usize, usize), NetlinkError> {
    let mut batch = batch;
    let mut missing = BTreeSet::new();
    loop {
        match socket.apply(&batch) {
            Ok(()) => {
                if !missing.is_empty() {
                    tracing::debug!(
                        missing = missing.len(),
                        "element deletions found nothing (another kproxy applied them?); \
                         applied without them"
                    );
                }
                return Ok((batch.elements, batch.messages.len()));
            }
            Err(NetlinkError::Rejected {
                missing: Some(gone),
                ..
            }) if missing.len() < MAX_MISSING && !missing.contains(&gone) => {
                missing.insert(gone);
                match netlink::encode(plan, deletes, &missing)? {
                    Some(b) => batch = b,
                    None => return Ok((0, 0)),
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// Splits a whole plan into its new sets and new regular chains, then the rest; `None` when
/// there are none, or when a table is deleted or re-created (nothing old to keep consistent).
///
/// Why: a chain created in the same transaction as the map element that leads to it is seen
/// empty by a packet that straddles the commit. The kernel walks chains in the generation it
/// read when the hook started, but each set lookup reads the generation anew; a packet that
/// started before the flip and looked `service-ips` up after it follows the new
/// `goto pick-3` into a chain that has no rules in the old generation, falls through without
/// DNAT and is rejected by `cluster-ips-check` (measured on 6.18: README, "One packet, two
/// generations"). A chain that already exists when the element's transaction commits has its
/// rules in both generations. The netlink path has the same order by construction (step 1).
pub fn chains_first(plan: &NftPlan) -> Option<(NftPlan, NftPlan)> {
    if plan
        .families
        .values()
        .any(|fp| fp.recreate || fp.delete_table)
    {
        return None;
    }
    let mut first = NftPlan::default();
    let mut rest = plan.clone();
    for (family, fp) in &mut rest.families {
        let is_new_regular =
            |chain: &crate::model::Chain, existed: bool| chain.base.is_none() && !existed;
        let mut step = FamilyPlan {
            add_sets: std::mem::take(&mut fp.add_sets),
            ..FamilyPlan::default()
        };
        let (new, keep) = std::mem::take(&mut fp.add_chains)
            .into_iter()
            .partition(|(_, chain)| is_new_regular(chain, false));
        step.add_chains = new;
        fp.add_chains = keep;
        let (new, keep) = std::mem::take(&mut fp.write_chains)
            .into_iter()
            .partition(|(_, chain, existed)| is_new_regular(chain, *existed));
        step.write_chains = new;
        fp.write_chains = keep;
        if !is_empty(&step) {
            first.families.insert(*family, step);
        }
    }
    (!first.families.is_empty()).then_some((first, rest))
}
