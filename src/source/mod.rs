//! Where Services, EndpointSlices and the Node come from: the Kubernetes API or a directory of
//! manifests. Both produce the same [`Update`]s, so the rest of kproxy cannot tell them apart.

pub mod backoff;
pub mod client;
pub mod kube;
pub mod manifests;
pub mod rate_limit;
pub mod slim;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;

use self::slim::Service;

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

impl<K> Change<K> {
    /// The same change with `f` applied to every object.
    pub fn map<T>(self, mut f: impl FnMut(K) -> T) -> Change<T> {
        match self {
            Change::Reset(all) => Change::Reset(all.into_iter().map(f).collect()),
            Change::Apply(obj) => Change::Apply(f(obj)),
            Change::Delete(obj) => Change::Delete(f(obj)),
        }
    }

    /// The same change with every object behind an [`Arc`], as [`Update`] carries them.
    pub fn shared(self) -> Change<Arc<K>> {
        self.map(Arc::new)
    }
}

/// One change from a source. Objects are shared ([`Arc`]) and slimmed ([`slim`]): the cache
/// keeps exactly what the source sent, and a source that keeps its objects too (the manifests
/// source does, per file) holds no second copy.
#[derive(Debug, Clone)]
pub enum Update {
    /// Services (already filtered by the service-proxy-name label).
    Services(Change<Arc<Service>>),
    /// EndpointSlices (already filtered by the service-proxy-name and headless labels).
    EndpointSlices(Change<Arc<slim::Slice>>),
    /// This node's Node object (only that one).
    Node(Change<Arc<Node>>),
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
