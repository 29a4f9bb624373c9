//! Reading a `--config` file: the `KubeProxyConfiguration` as written, before defaulting.
//!
//! Every field is optional and `null` is accepted wherever upstream's decoder accepts it, because
//! real installers write the whole struct with zero values and nulls (kubeadm writes
//! `syncPeriod: 0s`, `masqueradeBit: null`, `healthzBindAddress: ""`). Unknown fields (fields of
//! older or newer upstream versions, such as EKS's `conntrack.max` or `resourceContainer`) are
//! reported and skipped, as upstream's lenient decoder skips them. A wrong type names the field.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use serde::Deserialize;

use super::ConfigError;
use super::duration::GoDuration;
use super::v1alpha1::{API_VERSION, KIND};

/// The largest configuration file kproxy reads: upstream's files are a few KiB; a bigger one is
/// a mistake (or `/dev/zero`), and reading it whole would hang or exhaust memory.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The file as written. `None` is "absent or null".
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Document {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub client_connection: Option<ClientConnection>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub config_sync_period: Option<GoDuration>,
    pub conntrack: Option<Conntrack>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    pub enable_profiling: Option<bool>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub healthz_bind_address: Option<String>,
    pub hostname_override: Option<String>,
    pub iptables: Option<Iptables>,
    pub ipvs: Option<Ipvs>,
    pub nftables: Option<Nftables>,
    pub logging: Option<Logging>,
    pub metrics_bind_address: Option<String>,
    pub mode: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub port_range: Option<String>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub winkernel: Option<Winkernel>,
    pub windows_run_as_service: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub qps: Option<f32>,
    pub burst: Option<i32>,
    pub content_type: Option<String>,
    pub accept_content_types: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Iptables {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub localhost_node_ports: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Ipvs {
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    pub tcp_timeout: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Nftables {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Logging {
    pub format: Option<String>,
    /// A Go duration string, or a number of nanoseconds (both are accepted upstream).
    pub flush_frequency: Option<serde_json::Value>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<Vec<VModuleItem>>,
    pub options: Option<LoggingOptions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoggingOptions {
    pub text: Option<StreamOptions>,
    pub json: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StreamOptions {
    pub split_stream: Option<bool>,
    /// A Kubernetes quantity: a string ("64Ki") or a number.
    pub info_buffer_size: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VModuleItem {
    pub file_pattern: String,
    pub verbosity: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Winkernel {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

/// A file read from disk: the document, the fields kproxy does not know, and the raw bytes (the
/// config watcher compares later reads with them).
#[derive(Debug)]
pub struct Loaded {
    /// The decoded document.
    pub document: Document,
    /// Paths of fields no upstream version kproxy knows has (warned about, not fatal).
    pub unknown_fields: Vec<String>,
    /// The file's bytes as read.
    pub bytes: Vec<u8>,
}

/// Reads at most [`MAX_FILE_BYTES`] of a file. A larger file is an error, never a hang.
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} KiB; a KubeProxyConfiguration is a few KiB",
            MAX_FILE_BYTES / 1024
        )));
    }
    Ok(bytes)
}

/// Reads and decodes a configuration file (YAML or JSON).
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let bytes = read_bounded(path).map_err(|e| ConfigError {
        field: "--config".into(),
        value: path.display().to_string(),
        reason: format!("cannot read the file: {e}"),
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| ConfigError {
        field: "--config".into(),
        value: path.display().to_string(),
        reason: format!("not UTF-8 text: {e}"),
    })?;
    let (document, unknown_fields) = parse(text).map_err(|(field, reason)| ConfigError {
        field: if field.is_empty() {
            "--config".into()
        } else {
            format!("--config {}: {field}", path.display())
        },
        value: String::new(),
        reason,
    })?;
    Ok(Loaded {
        document,
        unknown_fields,
        bytes,
    })
}

/// Decodes configuration text. Errors carry the field path (`iptables.syncPeriod`) and reason.
pub fn parse(text: &str) -> Result<(Document, Vec<String>), (String, String)> {
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
    // serde_ignored spells an `Option` level as `?`; people know the field path without it.
    let mut record = |path: serde_ignored::Path<'_>| {
        let text = path.to_string();
        let parts: Vec<&str> = text.split('.').filter(|p| *p != "?").collect();
        unknown.push(parts.join("."));
    };
    let de = serde_ignored::Deserializer::new(&value, &mut record);
    let doc: Document = serde_path_to_error::deserialize(de)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))?;
    if let Some(kind) = &doc.kind
        && kind != KIND
    {
        return Err(("kind".into(), format!("expected {KIND}, found {kind:?}")));
    }
    if let Some(v) = &doc.api_version
        && v != API_VERSION
    {
        return Err((
            "apiVersion".into(),
            format!("expected {API_VERSION}, found {v:?}"),
        ));
    }
    Ok((doc, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_values_and_nulls_parse_and_unknown_fields_are_reported() {
        let text = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clusterCIDR: 10.244.0.0/16
mode: ""
iptables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 30s
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
nodePortAddresses: null
detectLocal: null
someFutureField: 3
conntrack:
  maxPerCore: 32768
  frobnicate: true
"#;
        let (doc, unknown) = parse(text).expect("parses");
        assert_eq!(doc.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
        let iptables = doc.iptables.expect("iptables");
        assert_eq!(iptables.sync_period, Some(GoDuration::secs(30)));
        assert_eq!(iptables.min_sync_period, Some(GoDuration::ZERO));
        assert_eq!(iptables.masquerade_bit, None);
        let mut unknown = unknown;
        unknown.sort();
        assert_eq!(unknown, vec!["conntrack.frobnicate", "someFutureField"]);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = parse("iptables:\n  masqueradeBit: fourteen\n").expect_err("bad type");
        assert_eq!(err.0, "iptables.masqueradeBit");
        let err = parse("iptables:\n  syncPeriod: soon\n").expect_err("bad duration");
        assert_eq!(err.0, "iptables.syncPeriod");
        let err = parse("kind: Pod\n").expect_err("bad kind");
        assert_eq!(err.0, "kind");
    }

    #[test]
    fn reads_are_bounded() {
        let err = read_bounded(Path::new("/dev/zero")).expect_err("too big");
        assert!(err.to_string().contains("KiB"), "{err}");
    }
}
