//! End-to-end tests: one binary, one module per area.
#![allow(
    clippy::disallowed_methods,
    reason = "end-to-end tests start kproxy and drive ip, nft, iptables and conntrack directly"
)]
#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    unreachable_pub,
    reason = "test binary: support items are pub for the test modules"
)]

#[macro_use]
mod support;

mod api_source;
mod api_watch;
mod behaviour;
mod conntrack;
mod deploy_manifests;
mod docs;
mod dropin;
mod image;
mod installers;
mod iptables;
mod nftables;
mod operability;
mod reliability;
mod trace;
mod userspace;
