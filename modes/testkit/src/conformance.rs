//! What the sync loop relies on from every mode, checked once for all of them against each
//! mode's fake kernel: each mode's tests implement [`OnFakeKernel`] and call [`check`].
//!
//! 1. **Convergence**, through a sequence of states (services added, endpoints changed,
//!    services removed, many services, none): applying the plan to a state's rendering, from
//!    what the kernel holds (a full sync) or from the rules the last apply left (the syncs in
//!    between), leaves the kernel holding exactly that rendering (as far as the mode reads it
//!    back), and planning again from the rules read back changes nothing.
//! 2. **A refused apply**: when one apply is one kernel transaction, the kernel holds exactly
//!    what it held before; in every mode, the next full sync converges (the loop's retry).
//! 3. **Cleanup** leaves nothing of ours where there was something, and cleaning up again is
//!    not an error.

use std::fmt::Debug;

use kproxy_contract::{Mode, Plan as _, ProxyState};

use crate::{ep, many, service, state};

/// A mode on its fake kernel, as [`check`] drives it.
pub trait OnFakeKernel: Mode<Rules: PartialEq + Debug> {
    /// Whether a write the kernel refuses leaves it as it was: the fakes refuse the first
    /// transaction of an apply, which for iptables (one `iptables-restore` per family) and
    /// nftables (one to three transactions, the first and last neutral for traffic) is all
    /// or nothing. Otherwise (IPVS's netlink calls, the userspace mode's routes and listeners)
    /// a refused apply may leave part of the plan. Either way the next full sync converges.
    const TRANSACTIONAL: bool;

    /// Makes the kernel refuse the next write.
    fn refuse_next_write(&mut self);

    /// Completes rules read back with what the mode does not read back (the IPVS mode's nft
    /// table, which a full sync rewrites from the rendering). Default: it reads back
    /// everything.
    fn complete_read_back(live: &mut Self::Rules, rendered: &Self::Rules) {
        let _ = (live, rendered);
    }

    /// Whether the kernel holds nothing of ours.
    fn holds_nothing_of_ours(&mut self) -> bool;

    /// The states to converge through. Default: [`states`].
    fn states() -> Vec<ProxyState> {
        states()
    }
}

/// IPv4 and IPv6 services with and without endpoints, local and remote endpoints; then
/// endpoints changed, a service gone and one added; then 200 services; then none.
pub fn states() -> Vec<ProxyState> {
    vec![
        state(vec![
            service(
                "a",
                "10.96.0.10",
                vec![ep("10.244.1.1", false), ep("10.244.1.2", true)],
            ),
            service("b", "10.96.0.11", vec![]),
            service("c", "fd00:96::1", vec![ep("fd00:244::1", false)]),
        ]),
        state(vec![
            service("a", "10.96.0.10", vec![ep("10.244.1.3", false)]),
            service("b", "10.96.0.11", vec![ep("10.244.1.4", false)]),
            service("d", "fd00:96::2", vec![]),
        ]),
        state(many(200, 3)),
        state(Vec::new()),
    ]
}

/// `s` with every endpoint removed (a mode whose fake cannot hold endpoints: the userspace
/// mode binds a real socket per served frontend).
pub fn without_endpoints(s: &ProxyState) -> ProxyState {
    state(
        s.services
            .values()
            .map(|sp| {
                let mut sp = (**sp).clone();
                sp.endpoints = Default::default();
                sp
            })
            .collect(),
    )
}

/// Renders `s` as the loop does (observe, then render with the memo the last render left), and
/// checks that the memo only spared work: a fresh render gives the same rules.
fn render<M: OnFakeKernel>(mode: &M, memo: &mut M::Memo, s: &ProxyState) -> M::Rules {
    let facts = mode.observe();
    let desired = mode.render(s, &facts, memo);
    let fresh = mode.render(s, &facts, &mut M::Memo::default());
    assert_eq!(
        desired, fresh,
        "a render from the memo differs from a fresh render"
    );
    desired
}

/// One full sync, as the loop makes it: read back, render, plan, apply.
fn full_sync<M: OnFakeKernel>(
    mode: &mut M,
    memo: &mut M::Memo,
    s: &ProxyState,
) -> Result<M::Rules, String> {
    let live = mode.read_live().map_err(|e| format!("read back: {e}"))?;
    let desired = render(mode, memo, s);
    let plan = mode.plan(&live, &desired);
    mode.apply(&plan).map_err(|e| format!("apply: {e}"))?;
    Ok(desired)
}

/// One sync between full syncs, as the loop makes it: planned from the rules the last apply
/// left (`believed`), without reading the kernel.
fn incremental_sync<M: OnFakeKernel>(
    mode: &mut M,
    memo: &mut M::Memo,
    believed: &M::Rules,
    s: &ProxyState,
) -> Result<M::Rules, String> {
    let desired = render(mode, memo, s);
    let plan = mode.plan(believed, &desired);
    mode.apply(&plan).map_err(|e| format!("apply: {e}"))?;
    Ok(desired)
}

/// The kernel holds `desired` (as far as the mode reads it back), and nothing is left to plan.
fn converged<M: OnFakeKernel>(mode: &mut M, desired: &M::Rules, step: &str) {
    let mut live = mode.read_live().unwrap();
    M::complete_read_back(&mut live, desired);
    assert_eq!(&live, desired, "{step}: the kernel holds something else");
    let again = mode.plan(&live, desired);
    assert!(
        again.is_empty(),
        "{step}: re-planning from the kernel:\n{again}"
    );
}

/// Runs every check on modes made by `new` (a fresh mode on an empty fake kernel per check).
pub fn check<M: OnFakeKernel>(mut new: impl FnMut() -> M) {
    let states = M::states();
    assert!(states.len() >= 2, "the checks need a sequence of states");

    // 1. Convergence through the sequence: by full syncs (read back, plan, apply), and by syncs
    // planned from the last apply's rules (the loop's way between full syncs).
    let mut mode = new();
    let mut memo = M::Memo::default();
    for (i, s) in states.iter().enumerate() {
        let desired =
            full_sync(&mut mode, &mut memo, s).unwrap_or_else(|e| panic!("state {i}: {e}"));
        converged(&mut mode, &desired, &format!("state {i}"));
    }
    let mut mode = new();
    let mut memo = M::Memo::default();
    let mut believed = full_sync(&mut mode, &mut memo, &states[0]).unwrap();
    for (i, s) in states.iter().enumerate().skip(1) {
        believed = incremental_sync(&mut mode, &mut memo, &believed, s)
            .unwrap_or_else(|e| panic!("state {i}, planned from the last apply: {e}"));
        converged(
            &mut mode,
            &believed,
            &format!("state {i}, planned from the last apply"),
        );
    }

    // 2. A refused apply, from each state to the next.
    for (i, pair) in states.windows(2).enumerate() {
        let mut mode = new();
        let mut memo = M::Memo::default();
        full_sync(&mut mode, &mut memo, &pair[0]).unwrap();
        let before = mode.read_live().unwrap();
        mode.refuse_next_write();
        let desired = render(&mode, &mut memo, &pair[1]);
        let plan = mode.plan(&before, &desired);
        if plan.is_empty() {
            continue;
        }
        assert!(
            mode.apply(&plan).is_err(),
            "state {i} → {}: the refused write went unnoticed",
            i + 1
        );
        if M::TRANSACTIONAL {
            assert_eq!(
                mode.read_live().unwrap(),
                before,
                "state {i} → {}: a refused transaction changed the kernel",
                i + 1
            );
        }
        let desired = full_sync(&mut mode, &mut memo, &pair[1])
            .unwrap_or_else(|e| panic!("retry after a refused apply: {e}"));
        converged(&mut mode, &desired, &format!("retry of state {}", i + 1));
    }

    // 3. Cleanup.
    let mut mode = new();
    full_sync(&mut mode, &mut M::Memo::default(), &states[0]).unwrap();
    assert!(
        !mode.holds_nothing_of_ours(),
        "the first state programmed nothing to clean up"
    );
    mode.cleanup().unwrap();
    assert!(mode.holds_nothing_of_ours(), "cleanup left objects");
    mode.cleanup().unwrap();
    assert!(
        mode.holds_nothing_of_ours(),
        "a second cleanup left objects"
    );
}
