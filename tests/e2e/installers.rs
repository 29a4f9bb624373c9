//! The installer corpus (`tests/installers/`): the kube-proxy command lines and configuration
//! files that real installers write (kubeadm, kind, minikube, kubespray, k3s, rke2, microk8s,
//! GKE-style static pods, kops, EKS, Talos, kubernetes-the-hard-way, local-up-cluster), each
//! with its source recorded in its `case.toml`, run against the kproxy binary in a network
//! namespace (see `support/installers.rs` for what the runner maps and nothing else).
//!
//! Two checks per case:
//! - the effective configuration (`--write-config-to`) has every value of the case's `[expect]`
//!   table: upstream kube-proxy's effective values for that command line and file;
//! - run as the node's proxy, it serves /healthz and /metrics on exactly the expected addresses,
//!   syncs rules from the API, and runs with the expected OOM score. The ipvs cases need a
//!   kernel with IPVS: the IPVS lab guest runs them (`tests/ipvs-lab/guest.rs`).

use std::time::Duration;

use serde_json::Value;

use crate::support::installers::{at, cases, hostname, map, run_live, same};
use crate::support::kproxy::KproxyProcess;
use crate::support::netns::Netns;
use crate::support::require_root;

#[test]
fn installer_corpus_runs_with_upstreams_effective_values() {
    if !require_root("installer_corpus_runs_with_upstreams_effective_values") {
        return;
    }
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in cases() {
        let mapped = map(&case, None);
        let out = mapped.root.path().join("effective.yaml");
        let ns = Netns::new("inst");
        let mut args: Vec<&str> = mapped.args.iter().map(String::as_str).collect();
        let write = format!("--write-config-to={}", out.display());
        args.push(&write);
        let (p, status) = KproxyProcess::run(&ns, &args, Duration::from_secs(20));
        if !status.success() {
            failures.push(format!("{}: exit {status}\n{}", case.name, p.stderr()));
            continue;
        }
        let text = std::fs::read_to_string(&out).expect("effective configuration");
        let effective: Value = serde_saphyr::from_str(&text).expect("YAML");
        let mut wrong = Vec::new();
        for (path, want) in &case.expect {
            let actual = at(&effective, path);
            if !same(want, actual, &mapped) {
                wrong.push(format!("{path}: want {want}, got {actual:?}"));
            }
        }
        report.push(format!(
            "{:<24} {:>2} values {}",
            case.name,
            case.expect.len(),
            if wrong.is_empty() { "ok" } else { "WRONG" }
        ));
        if !wrong.is_empty() {
            failures.push(format!("{}:\n  {}", case.name, wrong.join("\n  ")));
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn installer_corpus_serves_probes_and_syncs_as_the_nodes_proxy() {
    if !require_root("installer_corpus_serves_probes_and_syncs_as_the_nodes_proxy") {
        return;
    }
    let hostname = hostname();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in cases() {
        if case.mode() == Some("ipvs") {
            report.push(format!("{:<24} ipvs: run in the IPVS lab", case.name));
            continue;
        }
        match run_live(&case, &hostname) {
            Ok(line) => report.push(line),
            Err(why) => {
                report.push(format!("{:<24} WRONG", case.name));
                failures.push(why);
            }
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
