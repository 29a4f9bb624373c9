//! The effective `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1): every field with a
//! value, after upstream's defaulting and kproxy's flags. It is what kproxy runs with, and what
//! `--write-config-to` writes: the same field names, null pointers and Go duration spellings
//! upstream writes, fields in alphabetical order as upstream's YAML encoder prints them, so the
//! file can be read back by kproxy or by upstream kube-proxy and means the same.
//!
//! Written by hand because k8s-openapi does not carry component configs. Pointer fields of the
//! Go type stay `Option` (upstream tells `null` from zero there); every other field is plain.

use std::collections::BTreeMap;

use serde::Serialize;

use super::duration::GoDuration;

/// The API version kproxy reads and writes.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The kind kproxy reads and writes.
pub const KIND: &str = "KubeProxyConfiguration";

/// The whole configuration, field for field as upstream's v1alpha1 type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: String,
    pub bind_address: String,
    pub bind_address_hard_fail: bool,
    pub client_connection: ClientConnection,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    pub config_sync_period: GoDuration,
    pub conntrack: Conntrack,
    pub detect_local: DetectLocal,
    pub detect_local_mode: String,
    pub enable_profiling: bool,
    pub feature_gates: BTreeMap<String, bool>,
    pub healthz_bind_address: String,
    pub hostname_override: String,
    pub iptables: Iptables,
    pub ipvs: Ipvs,
    pub kind: String,
    pub logging: Logging,
    pub metrics_bind_address: String,
    pub mode: String,
    pub nftables: Nftables,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub port_range: String,
    pub show_hidden_metrics_for_version: String,
    pub winkernel: Winkernel,
    pub windows_run_as_service: bool,
}

/// `clientConnection`: how to talk to the API server.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnection {
    pub accept_content_types: String,
    pub burst: i32,
    pub content_type: String,
    pub kubeconfig: String,
    pub qps: f32,
}

/// `conntrack`: the netfilter connection-tracking sysctls kube-proxy sets.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_be_liberal: bool,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub udp_stream_timeout: GoDuration,
    pub udp_timeout: GoDuration,
}

/// `detectLocal`: the interface settings of the interface-based local-traffic detectors.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: String,
    pub interface_name_prefix: String,
}

/// `iptables`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Iptables {
    pub localhost_node_ports: Option<bool>,
    pub masquerade_all: bool,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: GoDuration,
    pub sync_period: GoDuration,
}

/// `ipvs`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Ipvs {
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    pub min_sync_period: GoDuration,
    pub scheduler: String,
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    pub sync_period: GoDuration,
    pub tcp_fin_timeout: GoDuration,
    pub tcp_timeout: GoDuration,
    pub udp_timeout: GoDuration,
}

/// `nftables`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Nftables {
    pub masquerade_all: bool,
    pub masquerade_bit: Option<i32>,
    pub min_sync_period: GoDuration,
    pub sync_period: GoDuration,
}

/// `logging` (component-base's LoggingConfiguration).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Logging {
    pub flush_frequency: GoDuration,
    pub format: String,
    pub options: LoggingOptions,
    pub verbosity: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vmodule: Vec<VModuleItem>,
}

/// `logging.options`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct LoggingOptions {
    pub json: StreamOptions,
    pub text: StreamOptions,
}

/// `logging.options.json` / `logging.options.text`.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamOptions {
    /// A Kubernetes quantity ("0", "64Ki").
    pub info_buffer_size: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub split_stream: bool,
}

/// One `logging.vmodule` entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VModuleItem {
    pub file_pattern: String,
    pub verbosity: u32,
}

/// `winkernel` (Windows only; carried so a file round-trips).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Winkernel {
    #[serde(rename = "enableDSR")]
    pub enable_dsr: bool,
    pub forward_health_check_vip: bool,
    pub network_name: String,
    pub root_hns_endpoint_name: String,
    pub source_vip: String,
}

impl KubeProxyConfiguration {
    /// The configuration as YAML, as `--write-config-to` writes it.
    pub fn to_yaml(&self) -> String {
        // Through a JSON value: its maps are sorted, as upstream's encoder sorts keys.
        let value = match serde_json::to_value(self) {
            Ok(v) => v,
            // Every field is a plain string, number, bool, list or map.
            Err(err) => return format!("# cannot encode the configuration: {err}\n"),
        };
        serde_saphyr::to_string(&value)
            .unwrap_or_else(|err| format!("# cannot encode the configuration: {err}\n"))
    }
}
