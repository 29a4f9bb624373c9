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
}

/// The label a Service or EndpointSlice carries when another proxy implementation owns it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label on EndpointSlices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
