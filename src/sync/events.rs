//! What the sync loop tells the rest of the process, as one stream of events.
//!
//! Every collaborator (the metrics, the admin socket, the health-check node ports, the check
//! for other modes' leftovers) is a [`Follower`] of that stream: the loop knows none of them by
//! name, and a new collaborator is one more follower, not one more field and call site in the
//! loop. What stays inside the loop is what a sync itself does or depends on: the mode, the
//! conntrack table (its cleanup is part of the sync and its report part of the outcome), and
//! `/healthz`'s state, which every sync must keep current.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kproxy_contract::ObjectCount;

use crate::desired_state::Built;

use super::SyncReport;

/// One thing the loop did or saw.
#[derive(Debug)]
pub enum Event<'a> {
    /// Changes arrived that wait for a sync.
    Queued {
        /// When (wall clock: `/metrics` exports it as a timestamp).
        at: SystemTime,
    },
    /// An update from the source was folded into the cache.
    ChangesSeen {
        /// Services the update touched.
        services: usize,
        /// EndpointSlices the update touched.
        endpoints: usize,
        /// Service changes waiting for the next sync, this one included.
        pending_services: usize,
        /// EndpointSlice changes waiting for the next sync, this one included.
        pending_endpoints: usize,
    },
    /// A sync failed; the loop retries it with backoff.
    SyncFailed,
    /// The source held back a removal it could not confirm.
    RemovalHeld,
    /// The kernel took a sync's plan (an empty plan included): sent right after the apply,
    /// before conntrack cleanup, and counted in the apply's time. For what must follow the
    /// rules at once (health-check node ports; another mode's leftovers, removed only once
    /// ours are in place). Never sent by `--dry-run`, which changes nothing.
    Applied {
        /// The state the kernel now holds.
        state: &'a kproxy_contract::ProxyState,
    },
    /// A sync is complete (after [`Event::Applied`] and conntrack cleanup): its figures, for
    /// those who report it. Never sent by `--dry-run`.
    Synced(&'a Outcome<'a>),
}

/// What one applied sync did, published once to every follower.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// The build that was applied (desired state and skipped objects), shared with the next
    /// sync, which starts from it.
    pub built: &'a Arc<Built>,
    /// The sync's figures, as logged.
    pub report: &'a SyncReport,
    /// Time spent applying.
    pub apply: Duration,
    /// The kernel objects this mode now holds, by family, table and kind.
    pub objects: &'a [ObjectCount],
    /// The trigger times of the changes this sync programmed (the annotation the control plane
    /// sets when an endpoint changes): the network programming latency.
    pub trigger_times: &'a [SystemTime],
    /// When the sync finished (wall clock).
    pub at: SystemTime,
}

/// A collaborator of the sync loop. Called on the loop's task, in the order followers were
/// added: the time a follower takes is the sync's time (a follower of [`Event::Applied`] counts
/// in the apply's), so one with slow work hands it to a task of its own, or blocks through
/// [`super::block`] when the sync must wait for it.
pub trait Follower: Send {
    /// Takes note of `event`.
    fn on(&mut self, event: &Event<'_>);
}

/// Followers as a closure, for a collaborator that is a few lines.
impl<F: FnMut(&Event<'_>) + Send> Follower for F {
    fn on(&mut self, event: &Event<'_>) {
        self(event)
    }
}
