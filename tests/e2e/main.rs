//! End-to-end tests: the real kproxy binary, real kernels (inside network namespaces), real packets.
#![allow(clippy::unwrap_used, reason = "tests")]

mod iptables;
mod support;
