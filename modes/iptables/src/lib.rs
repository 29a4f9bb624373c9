//! kproxy's iptables mode: upstream kube-proxy's iptables behaviour under `KPROXY-` chains,
//! programmed with one `iptables-restore --noflush` transaction per family.
//!
//! The packet path and chain layout are in this crate's README (`modes/iptables/README.md`).
//! Start with [`IptablesMode`]: [`render`] turns the desired state into a [`Ruleset`], [`plan`]
//! diffs two rulesets into an [`IptablesPlan`] (only chains whose rules changed), and the
//! [`IptablesKernel`] seam is the one place binaries run.

pub mod dispatch;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod kernel;
pub mod names;
pub mod plan;
pub mod render;
pub mod rule;
pub mod ruleset;
pub mod trace;

use kproxy_contract::{IpFamily, Mode, ModeError, ModeName, ObjectCount, ProxyState};

pub use kernel::{Backend, IptablesCli, IptablesKernel};
pub use plan::IptablesPlan;
pub use render::{RenderCache, RenderOptions};
pub use ruleset::{Ruleset, Table};

/// The iptables data plane.
#[derive(Debug)]
pub struct IptablesMode<K: IptablesKernel = IptablesCli> {
    kernel: K,
    families: Vec<IpFamily>,
    options: RenderOptions,
}

impl<K: IptablesKernel> IptablesMode<K> {
    /// A mode programming `families` through `kernel`.
    pub fn new(kernel: K, families: Vec<IpFamily>, options: RenderOptions) -> Self {
        Self {
            kernel,
            families,
            options,
        }
    }

    /// The kernel seam (tests inspect the fake through it).
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The families this mode programs.
    pub fn families(&self) -> &[IpFamily] {
        &self.families
    }
}

impl<K: IptablesKernel> Mode for IptablesMode<K> {
    type Rules = Ruleset;
    type Plan = IptablesPlan;
    /// The fragments of the last render: they spare re-formatting unchanged service ports.
    type Memo = RenderCache;
    /// Local addresses are the kernel's business here (`-m addrtype --dst-type LOCAL`).
    type Facts = ();

    fn name(&self) -> ModeName {
        ModeName::Iptables
    }

    fn observe(&self) {}

    fn render(&self, desired: &ProxyState, (): &(), memo: &mut RenderCache) -> Ruleset {
        render::render_cached(desired, &self.options, &self.families, memo)
    }

    fn read_live(&mut self) -> Result<Ruleset, ModeError> {
        let mut out = Ruleset::default();
        for &family in &self.families {
            for table in Table::ALL {
                let text =
                    self.kernel
                        .save(family, table)
                        .map_err(|cause| ModeError::ReadLive {
                            mode: ModeName::Iptables,
                            cause,
                        })?;
                *out.table_mut(family, table) = ruleset::parse_save(&text);
            }
        }
        Ok(out)
    }

    fn plan(&self, live: &Ruleset, desired: &Ruleset) -> IptablesPlan {
        plan::plan(live, desired, self.kernel.stages_new_chains())
    }

    /// The canary chains (`KPROXY-CANARY` in nat and filter of every family) are gone: someone
    /// flushed the tables, so the next sync must read the kernel back.
    fn drifted(&mut self) -> bool {
        for &family in &self.families {
            for table in Table::ALL {
                match self.kernel.chain_exists(family, table, names::CANARY) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(%family, %table, "canary chain missing: the table was flushed; full resync");
                        return true;
                    }
                    Err(err) => {
                        tracing::warn!(%family, %table, error = %err, "cannot check the canary chain; full resync");
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Rewrites every kproxy chain (declaring a chain flushes it), deleting stale ones.
    fn plan_rebuild(&self, live: &Ruleset, desired: &Ruleset) -> IptablesPlan {
        let mut stale = live.clone();
        for table in stale
            .families
            .values_mut()
            .flat_map(|f| f.tables.values_mut())
        {
            for rules in table.chains.values_mut() {
                // Differs from any real rule list, so every desired chain is written again.
                *rules = std::sync::Arc::new(vec![String::from("<rewrite>")]);
            }
        }
        plan::plan(&stale, desired, self.kernel.stages_new_chains())
    }

    fn apply(&mut self, plan: &IptablesPlan) -> Result<(), ModeError> {
        for family in plan.families() {
            for input in plan.restore_inputs(family) {
                if tracing::enabled!(tracing::Level::TRACE) {
                    let payload = kproxy_contract::command::Input::text(&input);
                    tracing::trace!(%family, part = ?input.part(), payload, "iptables-restore");
                }
                self.kernel
                    .restore(family, &input)
                    .map_err(|cause| ModeError::Rejected {
                        mode: ModeName::Iptables,
                        cause,
                    })?;
            }
        }
        Ok(())
    }

    fn count_objects(&self, rules: &Ruleset) -> Vec<ObjectCount> {
        let mut out = Vec::new();
        for (family, fr) in &rules.families {
            for (table, tr) in &fr.tables {
                let count = |kind, count| ObjectCount {
                    family: *family,
                    table: table.as_str(),
                    kind,
                    count,
                };
                out.push(count(
                    "rules",
                    tr.chains.values().map(|c| c.len()).sum::<usize>() + tr.jumps.len(),
                ));
                out.push(count("chains", tr.chains.len()));
            }
        }
        out
    }

    fn cleanup(&mut self) -> Result<(), ModeError> {
        let live = self.read_live()?;
        let plan = self.plan(&live, &Ruleset::default());
        self.apply(&plan)
    }
}

#[cfg(test)]
mod tests;
