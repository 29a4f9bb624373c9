//! The serde model of `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1), written by
//! hand because k8s-openapi does not carry component configs. Durations stay strings here and
//! are parsed during validation, so an error can name the field and the bad value.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ConfigError;

/// The fields kproxy reads; every other upstream field is accepted (so upstream files load
/// unchanged) and reported as ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub client_connection: ClientConnection,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub config_sync_period: Option<String>,
    pub conntrack: Conntrack,
    pub detect_local_mode: Option<String>,
    pub detect_local: BTreeMap<String, String>,
    pub enable_profiling: Option<bool>,
    pub feature_gates: BTreeMap<String, bool>,
    pub healthz_bind_address: Option<String>,
    pub hostname_override: Option<String>,
    pub iptables: Iptables,
    pub ipvs: Ipvs,
    pub nftables: Nftables,
    pub logging: serde_json::Value,
    pub metrics_bind_address: Option<String>,
    pub mode: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub port_range: Option<String>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub winkernel: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i64>,
    pub content_type: Option<String>,
    pub accept_content_types: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Conntrack {
    pub max_per_core: Option<i64>,
    pub min: Option<i64>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<String>,
    pub udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Iptables {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i64>,
    pub localhost_node_ports: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Ipvs {
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub tcp_timeout: Option<String>,
    pub tcp_fin_timeout: Option<String>,
    pub udp_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Nftables {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i64>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

/// Reads and parses a configuration file (YAML or JSON). Returns the configuration and the
/// paths of fields kproxy does not know (to be warned about, not fatal).
pub fn load(path: &Path) -> Result<(KubeProxyConfiguration, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        field: "--config".into(),
        value: path.display().to_string(),
        reason: format!("cannot read the file: {e}"),
    })?;
    parse(&text).map_err(|(field, reason)| ConfigError {
        field: if field.is_empty() {
            "--config".into()
        } else {
            field
        },
        value: path.display().to_string(),
        reason,
    })
}

/// Parses configuration text. Errors carry the field path (`iptables.syncPeriod`) and reason.
pub fn parse(text: &str) -> Result<(KubeProxyConfiguration, Vec<String>), (String, String)> {
    // YAML is a superset of JSON, so one parser reads both.
    let value: serde_json::Value = serde_saphyr::from_str(text)
        .map_err(|e| (String::new(), format!("not valid YAML: {e}")))?;
    if !value.is_object() {
        return Err((
            String::new(),
            "the file does not hold a KubeProxyConfiguration object".into(),
        ));
    }
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(&value, &mut record);
    let cfg: KubeProxyConfiguration = serde_path_to_error::deserialize(de)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))?;
    if let Some(kind) = &cfg.kind
        && kind != "KubeProxyConfiguration"
    {
        return Err((
            "kind".into(),
            format!("expected KubeProxyConfiguration, found {kind:?}"),
        ));
    }
    if let Some(v) = &cfg.api_version
        && v != "kubeproxy.config.k8s.io/v1alpha1"
    {
        return Err((
            "apiVersion".into(),
            format!("expected kubeproxy.config.k8s.io/v1alpha1, found {v:?}"),
        ));
    }
    Ok((cfg, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_default_config_parses_with_unknown_fields_reported() {
        let text = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clusterCIDR: 10.244.0.0/16
mode: iptables
iptables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
nodePortAddresses: null
someFutureField: 3
conntrack:
  maxPerCore: 32768
  frobnicate: true
"#;
        let (cfg, unknown) = parse(text).expect("parses");
        assert_eq!(cfg.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
        assert_eq!(cfg.iptables.sync_period.as_deref(), Some("30s"));
        let mut unknown = unknown;
        unknown.sort();
        assert_eq!(unknown, vec!["conntrack.frobnicate", "someFutureField"]);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = parse("iptables:\n  masqueradeBit: fourteen\n").expect_err("bad type");
        assert_eq!(err.0, "iptables.masqueradeBit");
        let err = parse("kind: Pod\n").expect_err("bad kind");
        assert_eq!(err.0, "kind");
    }
}
