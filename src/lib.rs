//! kproxy: a kube-proxy replacement.
//!
//! Data flow: a source (`source::kube` or `source::manifests`) emits [`source::Update`]s; the
//! [`cache::ClusterCache`] keeps the last-seen objects and says which services each update
//! touched; the sync loop debounces those changes, builds one immutable
//! [`kproxy_contract::ProxyState`] with [`desired_state::build`] (every Kubernetes rule decided
//! there), and hands it to the selected [`kproxy_contract::Mode`], which renders, plans and
//! applies it atomically, or prints the plan for `--dry-run`.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod desired_state;
pub mod health;
pub mod healthcheck;
pub mod listeners;
pub mod metrics;
pub mod modes;
pub mod node;
pub mod oom;
pub mod retry;
pub mod run;
pub mod services;
pub mod source;
pub mod stop;
pub mod sync;
pub mod trace;
pub mod version;
