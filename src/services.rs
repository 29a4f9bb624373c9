//! `kproxy services`: what this node programs, service by service, as a table or JSON: asked of
//! the running daemon over its admin socket ([`crate::admin`]), or computed from `--manifests`
//! with the same desired-state builder the daemon uses.

use std::fmt::Write as _;

use anyhow::Context as _;
use kproxy_contract::{Endpoint, ProxyState, ServicePort, TrafficPolicy};
use serde_json::json;

use crate::cache::ClusterCache;
use crate::config::{Config, SourceConfig};
use crate::desired_state::{self, BuildContext};
use crate::{node, source};

/// The cluster domain used for DNS names.
const CLUSTER_DOMAIN: &str = "cluster.local";

/// Builds the desired state from the configured manifests directory.
pub fn desired(config: &Config) -> anyhow::Result<(ProxyState, Vec<String>)> {
    let SourceConfig::Manifests(dir) = &config.source else {
        anyhow::bail!("computing `kproxy services` locally needs --manifests DIR");
    };
    let mut files = source::manifests::LoadedFiles::new(config.hostname.clone());
    let loaded = source::manifests::load_dir(dir, &mut files)
        .with_context(|| format!("--manifests {}", dir.display()))?;
    let mut cache = ClusterCache::default();
    for update in loaded.into_updates() {
        cache.apply(update);
    }
    Ok(build(config, &cache))
}

/// The desired state of what `cache` holds, built as the daemon builds it.
pub fn build(config: &Config, cache: &ClusterCache) -> (ProxyState, Vec<String>) {
    let node_obj = cache.node().map(|n| n.as_ref());
    let ctx = BuildContext::new(config, node_obj, &node::local_addresses());
    let built = desired_state::build(cache, &ctx, None);
    (
        built.state,
        built.skipped.iter().map(ToString::to_string).collect(),
    )
}

fn policy(p: TrafficPolicy) -> &'static str {
    match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    }
}

fn frontends(sp: &ServicePort) -> Vec<String> {
    let proto = sp.name.protocol;
    let mut out: Vec<String> = Vec::new();
    let mut push = |ip: &std::net::IpAddr, what: &str| {
        let addr = std::net::SocketAddr::new(*ip, sp.port);
        out.push(format!("{addr}/{proto} ({what})"));
    };
    if let Some(ip) = &sp.cluster_ip {
        push(ip, "cluster IP");
    }
    for ip in &sp.external_ips {
        push(ip, "external IP");
    }
    for ip in &sp.load_balancer_ips {
        push(ip, "load balancer");
    }
    if let Some(np) = sp.node_port {
        out.push(format!("*:{np}/{proto} (node port)"));
    }
    out
}

fn endpoint(ep: &Endpoint) -> String {
    let addr = std::net::SocketAddr::new(ep.ip, ep.port);
    if ep.is_local {
        format!("{addr} (local)")
    } else {
        addr.to_string()
    }
}

/// The listing as JSON (one object per service port and family).
pub fn to_json(state: &ProxyState, skipped: &[String]) -> serde_json::Value {
    let services: Vec<_> = state
        .services
        .values()
        .map(|sp| {
            json!({
                "service": format!("{}/{}", sp.name.namespace, sp.name.name),
                "port": sp.name.port,
                "protocol": sp.name.protocol.as_str(),
                "family": sp.family.to_string(),
                "dns": format!("{}.{}.svc.{CLUSTER_DOMAIN}", sp.name.name, sp.name.namespace),
                "frontends": frontends(sp),
                "externalTrafficPolicy": policy(sp.external_policy),
                "internalTrafficPolicy": policy(sp.internal_policy),
                "sessionAffinityTimeoutSeconds": sp.affinity.map(|a| a.timeout.as_secs()),
                "endpoints": {
                    "cluster": sp.endpoints.cluster.iter().map(endpoint).collect::<Vec<_>>(),
                    "local": sp.endpoints.local.iter().map(endpoint).collect::<Vec<_>>(),
                    "internalUsed": sp.internal_endpoints().iter().map(endpoint).collect::<Vec<_>>(),
                    "externalUsed": sp.external_endpoints().iter().map(endpoint).collect::<Vec<_>>(),
                },
                "verdictWithoutEndpoints": if !sp.endpoints.any { Some("REJECT") }
                    else if sp.internal_endpoints().is_empty() { Some("DROP (internal)") }
                    else { None },
            })
        })
        .collect();
    json!({ "node": state.node.node_name, "services": services, "skipped": skipped })
}

/// The listing as a human-readable table.
pub fn to_table(state: &ProxyState, skipped: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:<5} {:<44} {:<9} {:<9} ENDPOINTS (used by ClusterIP traffic)",
        "SERVICE", "FAMILY", "FRONTENDS", "ETP", "ITP"
    );
    for sp in state.services.values() {
        let name = if sp.name.port.is_empty() {
            format!("{}/{}", sp.name.namespace, sp.name.name)
        } else {
            format!("{}/{}:{}", sp.name.namespace, sp.name.name, sp.name.port)
        };
        let used: Vec<String> = sp.internal_endpoints().iter().map(endpoint).collect();
        let used = if used.is_empty() {
            if sp.endpoints.any {
                "none usable: DROP".to_string()
            } else {
                "none: REJECT".to_string()
            }
        } else {
            used.join(", ")
        };
        let fronts = frontends(sp);
        let _ = writeln!(
            out,
            "{:<32} {:<5} {:<44} {:<9} {:<9} {}",
            name,
            match sp.family {
                kproxy_contract::IpFamily::V4 => "v4",
                kproxy_contract::IpFamily::V6 => "v6",
            },
            fronts.first().map_or("", String::as_str),
            policy(sp.external_policy),
            policy(sp.internal_policy),
            used
        );
        for f in fronts.iter().skip(1) {
            let _ = writeln!(out, "{:<32} {:<5} {f}", "", "");
        }
        let _ = writeln!(
            out,
            "{:<32} dns: {}.{}.svc.{CLUSTER_DOMAIN}",
            "", sp.name.name, sp.name.namespace
        );
    }
    for s in skipped {
        let _ = writeln!(out, "skipped: {s}");
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn lists_the_demo_cluster() {
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/demo");
        let args = crate::cli::Args::try_parse_from([
            "kproxy",
            "--manifests",
            demo,
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:244::/56",
        ])
        .expect("flags");
        let config = crate::config::from_args(&args).expect("config");
        let (state, skipped) = desired(&config).expect("demo builds");
        assert!(skipped.is_empty(), "{skipped:?}");
        let table = to_table(&state, &skipped);
        assert!(
            table.contains("default/legacy") && table.contains("none: REJECT"),
            "{table}"
        );
        assert!(table.contains("10.244.1.10:8080 (local)"), "{table}");
        let json = to_json(&state, &skipped);
        let web = json["services"]
            .as_array()
            .expect("services")
            .iter()
            .find(|s| s["service"] == "shop/web")
            .expect("shop/web listed");
        assert_eq!(web["dns"], "web.shop.svc.cluster.local");
        assert_eq!(web["sessionAffinityTimeoutSeconds"], 600);
    }
}
