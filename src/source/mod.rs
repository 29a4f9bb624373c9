//! Where Services, EndpointSlices and the Node come from: the Kubernetes API or a directory of
//! manifests. Both produce the same [`Update`]s, so the rest of kproxy cannot tell them apart.

pub mod backoff;
pub mod client;
pub mod kube;
pub mod manifests;
pub mod rate_limit;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// A change to one kind of object.
#[derive(Debug, Clone)]
pub enum Change<K> {
    /// The complete current set of this kind: replace everything held before. Sent after every
    /// (re)list, so objects deleted while a watch was down disappear here.
    Reset(Vec<K>),
    /// An object was added or modified.
    Apply(K),
    /// An object was deleted.
    Delete(K),
}

/// One change from a source.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "one short-lived value per watch event, moved through a channel, never stored in bulk"
)]
pub enum Update {
    /// Services (already filtered by the service-proxy-name label).
    Services(Change<Service>),
    /// EndpointSlices (already filtered by the service-proxy-name and headless labels).
    EndpointSlices(Change<EndpointSlice>),
    /// This node's Node object (only that one).
    Node(Change<Node>),
    /// How the source itself is doing; changes no object.
    Status(SourceStatus),
}

/// What a source reports about itself (the manifests source; the API watchers report nothing
/// here: an API outage keeps /healthz at 200, as upstream's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceStatus {
    /// The source could not be read in full since `since` (the directory is missing, a file
    /// cannot be opened, ...): what was last read stays in effect, and the source retries.
    Unreadable {
        /// When the first failed read of this run happened.
        since: std::time::SystemTime,
        /// The error, one line.
        error: String,
    },
    /// The source was read in full again.
    Readable,
    /// A removal of most of the source's (or a file's) service ports and endpoints was held
    /// back until the source confirms it.
    RemovalHeld,
}

/// The label a Service or EndpointSlice carries when another proxy implementation owns it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label on EndpointSlices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
