//! Shared helpers for the end-to-end tests. Not every test file uses every helper.
#![allow(
    dead_code,
    reason = "each helper is used by some, not all, e2e test files"
)]

/// `both_families!(NAME)` declares `mod NAME` with four tests, `iptables`, `nftables`,
/// `iptables_ipv6` and `nftables_ipv6`, each running the function `NAME(Mode, Fam)`: every
/// behaviour is proven in both families, through ip6tables and `ip6 kproxy` for IPv6.
/// `both_families!(NAME, #[ignore = "why"])` puts the attributes on all four.
#[allow(
    unused_macros,
    reason = "the IPVS lab includes this module and runs no family-parametric test"
)]
macro_rules! both_families {
    ($name:ident $(, #[$attr:meta])*) => {
        mod $name {
            use crate::support::family::Fam;
            use crate::support::scenario::Mode;

            fn run(test: &str, mode: Mode, f: Fam) {
                if crate::support::require_root(test) {
                    super::$name(mode, f);
                }
            }

            #[test]
            $(#[$attr])*
            fn iptables() {
                run(
                    concat!(stringify!($name), "::iptables"),
                    Mode::Iptables,
                    Fam::V4,
                );
            }

            #[test]
            $(#[$attr])*
            fn nftables() {
                run(
                    concat!(stringify!($name), "::nftables"),
                    Mode::Nftables,
                    Fam::V4,
                );
            }

            #[test]
            $(#[$attr])*
            fn iptables_ipv6() {
                run(
                    concat!(stringify!($name), "::iptables_ipv6"),
                    Mode::Iptables,
                    Fam::V6,
                );
            }

            #[test]
            $(#[$attr])*
            fn nftables_ipv6() {
                run(
                    concat!(stringify!($name), "::nftables_ipv6"),
                    Mode::Nftables,
                    Fam::V6,
                );
            }
        }
    };
}

pub mod fake_apiserver;
pub(crate) mod family;
pub(crate) mod http;
pub(crate) mod installers;
pub(crate) mod kproxy;
pub(crate) mod load;
pub(crate) mod manifests;
pub(crate) mod netns;
pub(crate) mod objects;
pub(crate) mod rules;
pub(crate) mod scenario;
pub(crate) mod sctp;
pub(crate) mod topology;
pub(crate) mod traffic;

/// True when running as root; otherwise the test fails, saying why. A test that cannot run here
/// must not pass: the README's test command runs as root.
pub(crate) fn require_root(test: &str) -> bool {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root (network namespaces, iptables): run the suite as root"
    );
    true
}
