//! kproxy's nftables mode: one private table per family (`ip kproxy`, `ip6 kproxy`) whose
//! chains are static and whose per-service data lives in a few named sets and maps, so the
//! first-packet cost does not grow with the number of services and a change is a handful of
//! element updates. The layout is described in this crate's README and in [`render`].

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod kernel;
pub mod live;
pub mod model;
pub mod netlink;
pub mod plan;
pub mod render;
pub mod steps;
pub mod trace;

use kproxy_contract::{IpFamily, Mode, ModeError, ModeName, ObjectCount, ProxyState};

pub use kernel::{NftCli, NftKernel};
pub use model::NftRuleset;
pub use plan::NftPlan;

/// The nftables data plane.
#[derive(Debug)]
pub struct NftablesMode<K: NftKernel = NftCli> {
    kernel: K,
    families: Vec<IpFamily>,
    /// Which way element changes go ([`kernel::APPLY_ENV`], read once).
    via: steps::Via,
}

impl<K: NftKernel> NftablesMode<K> {
    /// A mode programming `families` through `kernel`.
    pub fn new(kernel: K, families: Vec<IpFamily>) -> Self {
        Self {
            kernel,
            families,
            via: kernel::via_from_env(),
        }
    }

    /// The kernel seam (tests inspect the fake through it).
    pub fn kernel(&self) -> &K {
        &self.kernel
    }
}

impl<K: NftKernel> Mode for NftablesMode<K> {
    type Rules = NftRuleset;
    type Plan = NftPlan;
    type Memo = render::RenderCache;
    /// Local addresses are the kernel's business here (`fib daddr type local`).
    type Facts = ();

    fn name(&self) -> ModeName {
        ModeName::Nftables
    }

    fn observe(&self) {}

    fn render(&self, desired: &ProxyState, (): &(), memo: &mut render::RenderCache) -> NftRuleset {
        render::render_cached(desired, &self.families, memo)
    }

    fn read_live(&mut self) -> Result<NftRuleset, ModeError> {
        let mut out = NftRuleset::default();
        for &family in &self.families {
            let table = self
                .kernel
                .list(family)
                .map_err(|cause| ModeError::ReadLive {
                    mode: ModeName::Nftables,
                    cause,
                })?;
            if let Some(t) = table {
                out.families.insert(family, t);
            }
        }
        Ok(out)
    }

    fn plan(&self, live: &NftRuleset, desired: &NftRuleset) -> NftPlan {
        NftPlan {
            via: self.via,
            ..plan::plan(live, desired)
        }
    }

    /// A family's table is gone (for example `nft flush ruleset`): the next sync reads back.
    fn drifted(&mut self) -> bool {
        self.families.clone().into_iter().any(|family| match self.kernel.table_exists(family) {
            Ok(exists) => !exists,
            Err(err) => {
                tracing::warn!(%family, error = %kproxy_contract::Chain(&err), "cannot check the kproxy table; full resync");
                true
            }
        })
    }

    fn plan_rebuild(&self, live: &NftRuleset, desired: &NftRuleset) -> NftPlan {
        NftPlan {
            via: self.via,
            ..plan::rebuild(live, desired)
        }
    }

    fn apply(&mut self, plan: &NftPlan) -> Result<(), ModeError> {
        if plan.families.is_empty() {
            return Ok(());
        }
        steps::execute(&mut self.kernel, plan, self.via).map_err(|cause| ModeError::Rejected {
            mode: ModeName::Nftables,
            cause,
        })
    }

    fn count_objects(&self, rules: &NftRuleset) -> Vec<ObjectCount> {
        let mut out = Vec::new();
        for (family, table) in &rules.families {
            let count = |kind, count| ObjectCount {
                family: *family,
                table: "kproxy",
                kind,
                count,
            };
            out.push(count("chains", table.chains.len()));
            out.push(count(
                "rules",
                table.chains.values().map(|c| c.rules.len()).sum(),
            ));
            out.push(count("sets", table.sets.len()));
            out.push(count(
                "elements",
                table.sets.values().map(|s| s.elements.len()).sum(),
            ));
        }
        out
    }

    /// Deletes kproxy's tables, without reading them back first (seconds at 10,000 services).
    fn cleanup(&mut self) -> Result<(), ModeError> {
        let mut plan = NftPlan::default();
        for family in self.families.clone() {
            let exists = self
                .kernel
                .table_exists(family)
                .map_err(|cause| ModeError::ReadLive {
                    mode: ModeName::Nftables,
                    cause,
                })?;
            if exists {
                plan.families.insert(
                    family,
                    plan::FamilyPlan {
                        delete_table: true,
                        ..plan::FamilyPlan::default()
                    },
                );
            }
        }
        self.apply(&plan)
    }
}

#[cfg(test)]
mod tests;
