//! Micro-benchmarks (divan) of the pure parts of a sync, at 1,000 and 10,000 services x 2
//! endpoints: the desired-state build from Service and EndpointSlice objects, each mode's
//! rendering of that state from scratch and after one endpoint change (the per-service
//! fragment caches at work), and the plan (diff) for one endpoint change.
//!
//! `cargo bench --bench micro` measures; `cargo test --benches` runs every benchmark once
//! (divan's test mode when `--bench` is absent), so this target cannot rot and costs CI little.
#![allow(
    clippy::disallowed_methods,
    reason = "benchmarks start kproxy, proxies and ip/nft in their namespaces directly"
)]
#![allow(
    clippy::unwrap_used,
    reason = "benchmark harness: a failure should stop it loudly"
)]

mod common;

use std::sync::Arc;

use divan::Bencher;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy::cache::ClusterCache;
use kproxy::desired_state::{BuildContext, build, build_incremental};
use kproxy::source::slim::Service;
use kproxy::source::{Change, Update};
use kproxy_contract::{Endpoint, IpFamily, Mode, ProxyState, ServicePortKey};
use kproxy_iptables::{Backend, IptablesCli, IptablesMode, RenderOptions};
use kproxy_ipvs::fake::FakeKernel;
use kproxy_ipvs::{IpvsMode, IpvsOptions};
use kproxy_nftables::{NftCli, NftablesMode};
use kproxy_testkit::{many, state};
use kproxy_userspace::{IpRoute, Options, UserspaceMode};

/// The same allocator as the `kproxy` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SIZES: [usize; 2] = [1_000, 10_000];
const ENDPOINTS: usize = 2;

fn main() {
    divan::main();
}

/// A cache holding `n` services and their slices, as after the initial lists.
fn cache(n: usize) -> ClusterCache {
    let services: Vec<Service> = (0..n)
        .map(|i| serde_json::from_value(common::objects::service(i)).unwrap())
        .collect();
    let slices: Vec<EndpointSlice> = (0..n)
        .map(|i| serde_json::from_value(common::objects::slice(i, ENDPOINTS, 0)).unwrap())
        .collect();
    let mut cache = ClusterCache::default();
    cache.apply(Update::Services(Change::Reset(services).shared()));
    cache.apply(Update::EndpointSlices(
        Change::Reset(slices)
            .map(kproxy::source::slim::slice)
            .shared(),
    ));
    cache
}

fn context() -> BuildContext {
    BuildContext {
        node: Arc::new(kproxy_testkit::node()),
        node_zone: None,
        node_labels_known: true,
        admission: Arc::default(),
    }
}

/// Services and EndpointSlices → `ProxyState`, from scratch.
#[divan::bench(args = SIZES, sample_count = 20)]
fn desired_state_build(bencher: Bencher, n: usize) {
    let cache = cache(n);
    let ctx = context();
    let built = build(&cache, &ctx, None);
    // Every service's TCP port, and the first one's UDP port.
    assert_eq!(built.state.services.len(), n + 1);
    bencher.bench_local(|| build(&cache, &ctx, None));
}

/// The incremental build after one change: the middle service's EndpointSlice gets other
/// endpoints (what the daemon's sync after one endpoint change builds).
#[divan::bench(args = SIZES, sample_count = 20)]
fn desired_state_build_one_change(bencher: Bencher, n: usize) {
    let mut cache = cache(n);
    let ctx = context();
    let before = build(&cache, &ctx, None);
    let slice: EndpointSlice =
        serde_json::from_value(common::objects::slice(n / 2, ENDPOINTS, 1)).unwrap();
    let touched = cache.apply(Update::EndpointSlices(
        Change::Apply(slice)
            .map(kproxy::source::slim::slice)
            .shared(),
    ));
    assert_eq!(touched.services.len(), 1);
    bencher.bench_local(|| build_incremental(&cache, &ctx, &before, &touched.services));
}

/// The generated state and the same state with one endpoint of the middle service replaced,
/// sharing every other service port's `Arc` (as the daemon's incremental build does).
fn states(n: usize) -> (ProxyState, ProxyState) {
    let services = many(n, ENDPOINTS);
    let before = state(services.clone());
    let mut changed = services[n / 2].clone();
    std::sync::Arc::make_mut(&mut changed.endpoints.cluster)[0] = Endpoint {
        ip: "10.250.0.1".parse().unwrap(),
        port: 8080,
        is_local: false,
    };
    let mut after = before.clone();
    after.services.insert(
        ServicePortKey {
            family: changed.family,
            name: changed.name.clone(),
        },
        Arc::new(changed),
    );
    (before, after)
}

fn iptables() -> IptablesMode<IptablesCli> {
    IptablesMode::new(
        IptablesCli::new(Backend::Nft),
        vec![IpFamily::V4],
        RenderOptions::default(),
    )
}

fn nftables() -> NftablesMode<NftCli> {
    NftablesMode::new(NftCli, vec![IpFamily::V4])
}

/// IPVS on the in-memory kernel (rendering and planning never touch the kernel; `observe`
/// reads the fake's one node address).
fn ipvs() -> IpvsMode<FakeKernel> {
    let kernel = FakeKernel {
        local: vec![("eth0".into(), "192.168.0.2".parse().unwrap())],
        ..FakeKernel::default()
    };
    IpvsMode::new(
        kernel,
        IpvsOptions {
            families: vec![IpFamily::V4],
            ..IpvsOptions::default()
        },
    )
}

fn userspace() -> UserspaceMode<IpRoute> {
    UserspaceMode::new(IpRoute, Options::default())
}

/// A full render by a fresh mode (an empty memo).
fn render_full<M: Mode>(bencher: Bencher, n: usize, new: fn() -> M) {
    let (before, _) = states(n);
    bencher
        .with_inputs(|| {
            let mode = new();
            let facts = mode.observe();
            (mode, facts)
        })
        .bench_local_values(|(mode, facts)| {
            let rules = mode.render(&before, &facts, &mut M::Memo::default());
            (rules, mode)
        });
}

/// The render after one endpoint change, with the memo of the render of the state before.
fn render_one_change<M: Mode>(bencher: Bencher, n: usize, new: fn() -> M) {
    let (before, after) = states(n);
    bencher
        .with_inputs(|| {
            let mode = new();
            let facts = mode.observe();
            let mut memo = M::Memo::default();
            let rules = mode.render(&before, &facts, &mut memo);
            (mode, facts, memo, rules)
        })
        .bench_local_values(|(mode, facts, mut memo, rules)| {
            (mode.render(&after, &facts, &mut memo), mode, memo, rules)
        });
}

/// The plan (diff) between the rules before and after one endpoint change.
fn plan_one_change<M: Mode>(bencher: Bencher, n: usize, new: fn() -> M) {
    let (before, after) = states(n);
    let mode = new();
    let facts = mode.observe();
    let mut memo = M::Memo::default();
    let a = mode.render(&before, &facts, &mut memo);
    let b = mode.render(&after, &facts, &mut memo);
    bencher.bench_local(|| mode.plan(&a, &b));
}

#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn iptables_render_full(bencher: Bencher, n: usize) {
    render_full(bencher, n, iptables);
}

#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn iptables_render_one_change(bencher: Bencher, n: usize) {
    render_one_change(bencher, n, iptables);
}

#[divan::bench(args = SIZES, sample_count = 20)]
fn iptables_plan_one_change(bencher: Bencher, n: usize) {
    plan_one_change(bencher, n, iptables);
}

#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn nftables_render_full(bencher: Bencher, n: usize) {
    render_full(bencher, n, nftables);
}

#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn nftables_render_one_change(bencher: Bencher, n: usize) {
    render_one_change(bencher, n, nftables);
}

#[divan::bench(args = SIZES, sample_count = 20)]
fn nftables_plan_one_change(bencher: Bencher, n: usize) {
    plan_one_change(bencher, n, nftables);
}

#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn userspace_render_full(bencher: Bencher, n: usize) {
    render_full(bencher, n, userspace);
}

#[divan::bench(args = SIZES, sample_count = 20)]
fn userspace_plan_one_change(bencher: Bencher, n: usize) {
    plan_one_change(bencher, n, userspace);
}

#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn ipvs_render_full(bencher: Bencher, n: usize) {
    render_full(bencher, n, ipvs);
}

#[divan::bench(args = SIZES, sample_count = 10, sample_size = 1)]
fn ipvs_render_one_change(bencher: Bencher, n: usize) {
    render_one_change(bencher, n, ipvs);
}

#[divan::bench(args = SIZES, sample_count = 20)]
fn ipvs_plan_one_change(bencher: Bencher, n: usize) {
    plan_one_change(bencher, n, ipvs);
}
