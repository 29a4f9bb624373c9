//! Stale UDP/SCTP conntrack cleanup for the kernel modes (docs/semantics.md, rule 20).
//!
//! A UDP or SCTP "connection" lives in the kernel's conntrack table for as long as packets keep
//! flowing (a DNS client that reuses its source port refreshes its entry forever). NAT is decided
//! by the first packet only, so after a rules change an existing entry keeps sending the flow to
//! wherever it went before: to an endpoint that no longer exists, or nowhere at all when the first
//! packet arrived before the service had endpoints. kproxy removes such entries after every
//! successful sync, so the next packet goes through the current rules.
//!
//! # Design: a reconciler, not event diffs
//!
//! Upstream had two generations. Up to v1.31 kube-proxy derived deletions from *changes*
//! (endpoint removed, service new, 0 → >0 endpoints). From v1.32 a reconciler dumps the table
//! after each sync and deletes every DNATed UDP/SCTP flow whose (service address:port → endpoint)
//! mapping is not valid any more. kproxy follows the reconciler, because:
//!
//! * it is state-based and idempotent: it needs only the current [`ProxyState`], so a missed
//!   change, a cleanup that failed last time, or flows created while kproxy was down (restart)
//!   are all repaired at the next sync, with nothing to remember;
//! * its correctness is local ("is this flow valid now?"), which table tests cover well, whereas
//!   a diff has to get every transition right (new service, renamed port, family change, policy
//!   change, endpoint moved between slices, …);
//! * upstream's event model left gaps (services scaled to zero and back kept flows that bypassed
//!   the new rules, fixed upstream later), which the rules in [`plan`] cover directly.
//!
//! The cost is one dump per IP family per sync. The dump is filtered by family in the kernel and
//! by protocol here (TCP entries are parsed and skipped, never touched).
//!
//! # Layout
//!
//! * [`plan`]: the pure decision, [`plan::stale_flows`], table-tested without a kernel;
//! * [`ConntrackTable`]: the kernel I/O (dump, delete by original tuple), implemented over
//!   ctnetlink by [`netlink::NetlinkConntrack`] and by a fake in the tests;
//! * [`reconcile`]: dump, decide, delete, count.

pub mod netlink;
pub mod plan;
pub mod sysctl;

use std::net::SocketAddr;
use std::time::Duration;

use kproxy_contract::clock::{Clock as _, SystemClock};
use kproxy_contract::{IpFamily, Protocol, ProxyState};

pub use plan::{StaleReason, stale_flows};

/// One direction of a flow: addresses and ports as the kernel records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
}

/// One conntrack entry, reduced to what cleanup needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The transport protocol (the dump returns only UDP and SCTP; TCP is never touched anyway).
    pub protocol: Protocol,
    /// The original direction: client → service address as the client sent it.
    pub original: Tuple,
    /// The reply direction: after DNAT, its source is the endpoint.
    pub reply: Tuple,
    /// `IPS_DST_NAT`: the first packet was DNATed (to an endpoint, by kproxy's rules).
    pub dnat: bool,
    /// `IPS_SRC_NAT`: the flow was SNATed (masqueraded).
    pub snat: bool,
    /// The conntrack zone, when not the default one (deletion must name it).
    pub zone: Option<u16>,
    /// The entry's id (`CTA_ID`): deleting by tuple and id never removes a newer entry that
    /// happens to have the same tuple.
    pub id: Option<u32>,
}

impl Flow {
    /// The IP family of the flow.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.original.dst.ip())
    }
}

/// How a batch of deletions went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Entries the kernel deleted.
    pub deleted: usize,
    /// Entries already gone (expired or replaced since the dump): not an error.
    pub missing: usize,
    /// Entries the kernel refused to delete.
    pub failed: usize,
    /// The first refusal, for the log.
    pub first_error: Option<String>,
}

/// Why the conntrack table could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// A netlink socket operation failed.
    #[error("conntrack netlink {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel answered something that cannot be decoded.
    #[error("conntrack netlink: {0}")]
    Protocol(String),
}

/// The conntrack table of the namespace kproxy runs in.
pub trait ConntrackTable {
    /// The UDP and SCTP entries of one IP family (other protocols may be left out).
    fn dump(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError>;

    /// Deletes each entry by its original tuple (and zone and id, when known).
    fn delete(&mut self, flows: &[Flow]) -> Result<DeleteOutcome, ConntrackError>;
}

/// What one cleanup did (for the sync report and the reconciler metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// UDP/SCTP entries examined.
    pub examined: usize,
    /// Entries found stale.
    pub stale: usize,
    /// Entries deleted (stale ones that still existed).
    pub deleted: usize,
    /// Stale entries the kernel refused to delete.
    pub failed: usize,
    /// Time spent dumping, deciding and deleting.
    pub duration: Duration,
}

/// Dumps every family in `families`, deletes the flows [`stale_flows`] finds stale against
/// `current` (`previous` is the state of the last sync, if any: it identifies frontends that
/// have just been removed), and counts. A dump failure aborts (nothing is deleted for that
/// family and later ones); per-entry refusals are counted and logged, not errors.
pub fn reconcile(
    table: &mut dyn ConntrackTable,
    families: &[IpFamily],
    current: &ProxyState,
    previous: Option<&ProxyState>,
) -> Result<CleanupReport, ConntrackError> {
    let started = SystemClock.now();
    let mut report = CleanupReport::default();
    for &family in families {
        let flows = table.dump(family)?;
        let stale = stale_flows(current, previous, &flows);
        report.examined += flows.len();
        report.stale += stale.len();
        if stale.is_empty() {
            continue;
        }
        for (flow, reason) in &stale {
            tracing::debug!(
                protocol = %flow.protocol,
                orig_src = %flow.original.src,
                orig_dst = %flow.original.dst,
                reply_src = %flow.reply.src,
                reason = reason.as_str(),
                "deleting stale conntrack entry"
            );
        }
        let batch: Vec<Flow> = stale.into_iter().map(|(f, _)| f.clone()).collect();
        let outcome = table.delete(&batch)?;
        report.deleted += outcome.deleted;
        report.failed += outcome.failed;
        if let Some(err) = outcome.first_error {
            tracing::warn!(
                %family,
                failed = outcome.failed,
                error = %err,
                "some stale conntrack entries could not be deleted"
            );
        }
    }
    report.duration = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests;
