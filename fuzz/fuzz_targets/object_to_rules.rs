//! Arbitrary manifest text → objects → desired state → iptables and nftables rules → a plan
//! applied to each mode's fake kernel. The path the daemon runs for every object it reads; no
//! input may panic it, and whatever model the builder accepts must render into rules the fake
//! kernels take (the fakes parse what they are given).

#![no_main]

use std::path::Path;
use std::sync::Arc;

use kproxy::cache::ClusterCache;
use kproxy::desired_state::{self, BuildContext};
use kproxy::source::manifests::parse_text;
use kproxy_contract::{IpFamily, LocalTraffic, Mode as _, NodeSettings};
use kproxy_iptables::fake::FakeIptables;
use kproxy_iptables::{IptablesMode, RenderOptions};
use kproxy_nftables::NftablesMode;
use kproxy_nftables::fake::FakeNft;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = if text.trim_start().starts_with('{') {
        Path::new("input.json")
    } else {
        Path::new("input.yaml")
    };
    let loaded = parse_text(path, text, "node-a");
    let mut cache = ClusterCache::default();
    for update in loaded.into_updates() {
        cache.apply(update);
    }
    let node = NodeSettings {
        node_name: "node-a".to_owned(),
        node_ips: vec!["10.0.1.1".parse().unwrap(), "fd00:1::1".parse().unwrap()],
        local_traffic: LocalTraffic::SourceCidrs(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/56".parse().unwrap(),
        ]),
        ..NodeSettings::default()
    };
    let ctx = BuildContext {
        node: Arc::new(node),
        node_zone: Some("zone-a".to_owned()),
        node_labels_known: true,
        // As from --manifests: nothing validated the objects before the builder.
        admission: Arc::new(desired_state::Admission {
            manifests: Some(desired_state::ManifestChecks {
                node_port_range: kproxy::config::PortRange::DEFAULT_NODE_PORTS,
            }),
            external_ip_cidrs: None,
        }),
    };
    let built = desired_state::build(&cache, &ctx, None);

    let mut iptables = IptablesMode::new(
        FakeIptables::new(),
        IpFamily::ALL.to_vec(),
        RenderOptions::default(),
    );
    let rules = iptables.render_once(&built.state);
    let plan = iptables.plan(&Default::default(), &rules);
    let _ = plan.to_string();
    if let Err(e) = iptables.apply(&plan) {
        panic!("iptables rules from an accepted model were refused: {e}");
    }

    let mut nftables = NftablesMode::new(FakeNft::new(), IpFamily::ALL.to_vec());
    let rules = nftables.render_once(&built.state);
    let plan = nftables.plan(&Default::default(), &rules);
    let _ = plan.to_string();
    if let Err(e) = nftables.apply(&plan) {
        panic!("nftables rules from an accepted model were refused: {e}");
    }
});
