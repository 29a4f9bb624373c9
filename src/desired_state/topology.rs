//! Topology hints (docs/semantics.md, rule 16): which ready endpoints the Cluster list keeps.
//!
//! Follows upstream `pkg/proxy/topology.go` (`topologyModeFromHints`, `availableForTopology`):
//!
//! * hints are honoured whenever they are present; upstream no longer looks at the Service's
//!   `trafficDistribution` or the topology-mode annotation here (the EndpointSlice controller
//!   only writes hints when those ask for it);
//! * only **ready** endpoints are looked at, and only the Cluster list is filtered: Local
//!   traffic is already node-local, and the serving-terminating fallback ignores hints;
//! * PreferSameNode wins if every ready endpoint has a node hint and at least one names this
//!   node (upstream gates this on `PreferSameTrafficDistribution`, beta and on by default since
//!   v1.34; kproxy always honours it);
//! * otherwise PreferSameZone if every ready endpoint has a zone hint and at least one names this
//!   node's zone. A node without a zone label (or whose Node object was not seen yet) ignores
//!   zone hints, since no endpoint could be "in its zone";
//! * otherwise no filtering. Because a mode is only chosen when at least one ready endpoint
//!   matches, filtering never empties the list.

use super::endpoints::Candidate;

/// How the Cluster list is narrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopologyMode {
    /// Every ready endpoint.
    All,
    /// Ready endpoints hinted for this node.
    SameNode,
    /// Ready endpoints hinted for this node's zone.
    SameZone,
}

/// Where this node is, as far as hints are concerned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Location<'a> {
    /// This node's name (empty: node hints can never match).
    pub node: &'a str,
    /// This node's zone, `None` when unknown.
    pub zone: Option<&'a str>,
}

/// Chooses the topology mode from the hints of the ready endpoints.
pub(crate) fn mode<'c>(
    candidates: impl IntoIterator<Item = &'c Candidate>,
    here: Location<'_>,
) -> TopologyMode {
    let mut any_ready = false;
    let (mut all_node_hints, mut node_match) = (true, false);
    let (mut all_zone_hints, mut zone_match) = (true, false);
    for c in candidates.into_iter().filter(|c| c.ready) {
        any_ready = true;
        if c.node_hints.is_empty() {
            all_node_hints = false;
        } else if !here.node.is_empty() && c.node_hints.iter().any(|n| n == here.node) {
            node_match = true;
        }
        if c.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if let Some(zone) = here.zone
            && c.zone_hints.iter().any(|z| z == zone)
        {
            zone_match = true;
        }
    }
    if !any_ready {
        TopologyMode::All
    } else if all_node_hints && node_match {
        TopologyMode::SameNode
    } else if all_zone_hints && zone_match {
        TopologyMode::SameZone
    } else {
        TopologyMode::All
    }
}

/// Whether a ready endpoint stays in the Cluster list under `mode`.
pub(crate) fn available(c: &Candidate, mode: TopologyMode, here: Location<'_>) -> bool {
    match mode {
        TopologyMode::All => true,
        TopologyMode::SameNode => c.node_hints.iter().any(|n| n == here.node),
        TopologyMode::SameZone => here
            .zone
            .is_some_and(|zone| c.zone_hints.iter().any(|z| z == zone)),
    }
}
