//! The IPVS lab: `host` boots a stock Debian kernel in qemu (tests/ipvs-lab/run.sh) and runs
//! this same binary's `guest` tests there, where IPVS exists; it also checks that this host
//! (no IPVS) refuses `--proxy-mode ipvs` with an actionable message.
#![allow(
    clippy::disallowed_methods,
    reason = "the lab starts qemu and drives the tools in its guest directly"
)]
#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    unreachable_pub,
    reason = "test binary: support items are pub for the test modules"
)]

mod guest;
mod host;
mod scale;
#[path = "../e2e/support/mod.rs"]
mod support;
