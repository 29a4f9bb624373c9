//! The Kubernetes API source: three `kube::runtime::watcher` streams (Services, EndpointSlices,
//! this node's Node) merged into one stream of [`Update`]s.
//!
//! The watcher does list + watch, resumes from the last resourceVersion, relists on 410 Gone and
//! retries errors with client-go's backoff ([`super::backoff`]: growing while the API stays
//! away). When the API goes away we only log: the programmed rules stay as they are until the
//! watch comes back.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::backoff::{ProgressBackoff, mark_progress};
use super::{Change, HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, Update};

/// How many objects one list request asks for. kube's default (client-go's pager's) is 500,
/// and every page is a request under the client's rate limit (`--kube-api-qps`, 5 by default):
/// 10,000 Services and their EndpointSlices took 40 requests and 6.5 s to list that way in the
/// modes benchmark (start to synced 7.3 s, against 0.8 s from manifests). In pages of 5,000 they
/// take 5 requests, inside the burst: start to synced 1.8 s. Listing at any version (`resourceVersion=0`, one
/// response from the API server's cache, as upstream's informers start) took 2.3 s and 11 MiB
/// more at the peak (the whole list at once), and a relist at any version may go back in time
/// behind another API server's lagging cache; consistent lists in larger pages do not.
const PAGE_SIZE: u32 = 5_000;

fn config() -> watcher::Config {
    watcher::Config::default().page_size(PAGE_SIZE)
}

/// Builds the watcher streams and forwards their events to `tx` until `tx` closes.
pub async fn run(client: Client, node_name: String, tx: mpsc::Sender<Update>) {
    let services = watch::<Service, _>(
        Api::all(client.clone()),
        config().labels(&format!("!{SERVICE_PROXY_NAME_LABEL}")),
        "Service",
        super::slim::service,
    )
    .map(Update::Services);
    let slices = watch::<EndpointSlice, _>(
        Api::all(client.clone()),
        config().labels(&format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")),
        "EndpointSlice",
        super::slim::slice,
    )
    .map(Update::EndpointSlices);
    let node = watch::<Node, _>(
        Api::all(client),
        config().fields(&format!("metadata.name={node_name}")),
        "Node",
        super::slim::node,
    )
    .map(Update::Node);

    let mut merged = std::pin::pin!(futures::stream::select(
        futures::stream::select(services, slices),
        node,
    ));
    while let Some(update) = merged.next().await {
        if tx.send(update).await.is_err() {
            return;
        }
    }
}

/// One watcher turned into [`Change`]s of slimmed, shared objects (each object is slimmed as
/// it arrives, so an initial list of 10^5 objects is never held in full). Errors are logged and
/// retried with backoff; they never reach the caller, because a broken watch must not change
/// what is programmed.
fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    slim: fn(K) -> T,
) -> impl Stream<Item = Change<Arc<T>>>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: Send + Sync + 'static,
{
    let keep = move |obj: K| Arc::new(slim(obj));
    let mut buffer: Vec<Arc<T>> = Vec::new();
    let (backoff, progress) = ProgressBackoff::new();
    watcher::watcher(api, config)
        .inspect(move |event| mark_progress(&progress, event))
        .backoff(backoff)
        .filter_map(move |event| {
            let change = match event {
                Ok(Event::Init) => {
                    buffer.clear();
                    None
                }
                Ok(Event::InitApply(obj)) => {
                    buffer.push(keep(obj));
                    None
                }
                Ok(Event::InitDone) => {
                    tracing::debug!(kind, count = buffer.len(), "initial list complete");
                    Some(Change::Reset(std::mem::take(&mut buffer)))
                }
                Ok(Event::Apply(obj)) => Some(Change::Apply(keep(obj))),
                Ok(Event::Delete(obj)) => Some(Change::Delete(keep(obj))),
                Err(err) => {
                    tracing::warn!(kind, error = %err, "watch failed; retrying with backoff, programmed rules stay in place");
                    None
                }
            };
            std::future::ready(change)
        })
}
