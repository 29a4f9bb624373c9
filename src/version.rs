//! The version `kproxy --version` prints: the crate version and the git commit it was built
//! from (recorded by `build.rs`).

/// `0.1.0 (git 0123456789ab)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("KPROXY_GIT_COMMIT"),
    ")"
);
