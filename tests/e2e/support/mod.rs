//! Shared helpers for the end-to-end tests. Not every test file uses every helper.
#![allow(
    dead_code,
    reason = "each helper is used by some, not all, e2e test files"
)]

pub mod fake_apiserver;
pub(crate) mod http;
pub(crate) mod kproxy;
pub(crate) mod load;
pub(crate) mod manifests;
pub(crate) mod netns;
pub(crate) mod objects;
pub(crate) mod rules;
pub(crate) mod scenario;
pub(crate) mod topology;
pub(crate) mod traffic;

/// True when running as root. Otherwise prints a loud SKIP line: the caller returns early.
pub(crate) fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("########## SKIP {test}: needs root (network namespaces, iptables) ##########");
        false
    }
}
