//! Validation of the effective configuration, rule for rule as upstream's (`must be greater
//! than 0`, `must be within the range [0, 31]`, ...) plus kproxy's own checks, turning each
//! field into the type the rest of kproxy reads. Errors name the flag that set the field, or the
//! field's path in the file.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use kproxy_contract::{IpFamily, ModeName};

use super::defaults::split_host_port;
use super::flags::FlagReport;
use super::v1alpha1::KubeProxyConfiguration;
use super::{ConfigError, LocalDetectMode};
use crate::cli::LogFormat;

/// The fields that validation turns into types.
#[derive(Debug)]
pub(super) struct Checked {
    pub mode: ModeName,
    pub hostname: String,
    pub bind_address: Option<IpAddr>,
    pub cluster_cidrs: Vec<IpNet>,
    pub detect_local: LocalDetectMode,
    pub nodeport_addresses: NodePortSetting,
    pub masquerade_bit: u8,
    pub healthz_bind: Option<SocketAddr>,
    pub metrics_bind: Option<SocketAddr>,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub ipvs_exclude_cidrs: Vec<IpNet>,
    pub log_format: LogFormat,
}

/// Checks `cfg` as upstream's validation does and returns its typed values.
pub(super) fn check(
    cfg: &KubeProxyConfiguration,
    report: &FlagReport,
) -> Result<Checked, ConfigError> {
    let err = |path: &str, value: &dyn std::fmt::Display, reason: &str| ConfigError {
        field: report.origin(path),
        value: value.to_string(),
        reason: reason.into(),
    };
    let mode = match report.mode {
        Some(mode) => mode,
        None => cfg.mode.parse().map_err(|_| {
            err(
                "mode",
                &cfg.mode,
                "must be iptables, ipvs, nftables, userspace or blank (blank means iptables)",
            )
        })?,
    };

    let bit = |path: &str, value: Option<i32>| -> Result<u8, ConfigError> {
        let v = value.unwrap_or(14);
        u8::try_from(v)
            .ok()
            .filter(|b| *b <= 31)
            .ok_or_else(|| err(path, &v, "must be within the range [0, 31]"))
    };
    let iptables_bit = bit("iptables.masqueradeBit", cfg.iptables.masquerade_bit)?;
    let masquerade_bit = match mode {
        ModeName::Nftables => bit("nftables.masqueradeBit", cfg.nftables.masquerade_bit)?,
        _ => iptables_bit,
    };

    for (path, value) in [
        ("conntrack.maxPerCore", cfg.conntrack.max_per_core),
        ("conntrack.min", cfg.conntrack.min),
    ] {
        if let Some(v) = value
            && v < 0
        {
            return Err(err(path, &v, "must be greater than or equal to 0"));
        }
    }
    if let Some(v) = cfg.oom_score_adj
        && !(-1000..=1000).contains(&v)
    {
        return Err(err(
            "oomScoreAdj",
            &v,
            "must be within the range [-1000, 1000]",
        ));
    }
    if cfg.client_connection.burst < 0 {
        return Err(err(
            "clientConnection.burst",
            &cfg.client_connection.burst,
            "must be greater than or equal to 0",
        ));
    }
    if !cfg.client_connection.qps.is_finite() {
        return Err(err(
            "clientConnection.qps",
            &cfg.client_connection.qps,
            "must be a number",
        ));
    }
    if cfg.config_sync_period.is_zero() {
        return Err(err(
            "configSyncPeriod",
            &cfg.config_sync_period,
            "must be greater than 0",
        ));
    }

    let (section, sync, min) = match mode {
        ModeName::Ipvs => ("ipvs", cfg.ipvs.sync_period, cfg.ipvs.min_sync_period),
        ModeName::Nftables => (
            "nftables",
            cfg.nftables.sync_period,
            cfg.nftables.min_sync_period,
        ),
        _ => (
            "iptables",
            cfg.iptables.sync_period,
            cfg.iptables.min_sync_period,
        ),
    };
    let sync_path = format!("{section}.syncPeriod");
    if sync.is_zero() {
        return Err(err(&sync_path, &sync, "must be greater than 0"));
    }
    if min > sync {
        return Err(err(
            &sync_path,
            &sync,
            &format!(
                "must be greater than or equal to {} ({min})",
                report.origin(&format!("{section}.minSyncPeriod"))
            ),
        ));
    }

    let bind_address = match cfg.bind_address.trim().parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => None,
        Ok(ip) => Some(ip),
        Err(_) => {
            return Err(err(
                "bindAddress",
                &cfg.bind_address,
                "not a valid textual representation of an IP address",
            ));
        }
    };
    let healthz_bind = host_port(&cfg.healthz_bind_address)
        .map_err(|r| err("healthzBindAddress", &cfg.healthz_bind_address, r))?;
    let metrics_bind = host_port(&cfg.metrics_bind_address)
        .map_err(|r| err("metricsBindAddress", &cfg.metrics_bind_address, r))?;

    let nodeport_addresses = NodePortSetting::from_list(
        cfg.node_port_addresses.as_deref().unwrap_or_default(),
        &report.origin("nodePortAddresses"),
    )?;

    let cluster_cidrs = parse_cidrs(&cfg.cluster_cidr, &report.origin("clusterCIDR"))?;
    let detect_local = match cfg.detect_local_mode.as_str() {
        "ClusterCIDR" => LocalDetectMode::ClusterCidr,
        "NodeCIDR" => LocalDetectMode::NodeCidr,
        "BridgeInterface" => LocalDetectMode::BridgeInterface(
            interface_name(&cfg.detect_local.bridge_interface).map_err(|r| {
                err(
                    "detectLocal.bridgeInterface",
                    &cfg.detect_local.bridge_interface,
                    &r,
                )
            })?,
        ),
        "InterfaceNamePrefix" => LocalDetectMode::InterfaceNamePrefix(
            interface_name(&cfg.detect_local.interface_name_prefix).map_err(|r| {
                err(
                    "detectLocal.interfaceNamePrefix",
                    &cfg.detect_local.interface_name_prefix,
                    &r,
                )
            })?,
        ),
        other => {
            return Err(err(
                "detectLocalMode",
                &other,
                "must be ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix",
            ));
        }
    };

    let mut ipvs_exclude_cidrs = Vec::new();
    if mode == ModeName::Ipvs {
        for c in cfg.ipvs.exclude_cidrs.iter().flatten() {
            ipvs_exclude_cidrs.push(
                c.trim()
                    .parse::<IpNet>()
                    .map_err(|_| err("ipvs.excludeCIDRs", c, "must be a valid CIDR"))?,
            );
        }
        let scheduler = cfg.ipvs.scheduler.trim();
        if !scheduler.is_empty() && !kproxy_ipvs::SCHEDULERS.contains(&scheduler) {
            return Err(err(
                "ipvs.scheduler",
                &scheduler,
                &format!("expected one of {}", kproxy_ipvs::SCHEDULERS.join(", ")),
            ));
        }
    }

    let log_format = match cfg.logging.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(err("logging.format", &other, "must be text or json")),
    };

    let hostname = match cfg.hostname_override.trim() {
        "" => system_hostname(),
        h => h.to_lowercase(),
    };
    if hostname.is_empty() {
        return Err(err(
            "hostnameOverride",
            &hostname,
            "the node name is empty and the host name could not be read",
        ));
    }

    Ok(Checked {
        mode,
        hostname,
        bind_address,
        cluster_cidrs,
        detect_local,
        nodeport_addresses,
        masquerade_bit,
        healthz_bind,
        metrics_bind,
        sync_period: sync.0,
        min_sync_period: min.0,
        ipvs_exclude_cidrs,
        log_format,
    })
}

/// Upstream's `IP:port` check of the health and metrics addresses; empty is off.
fn host_port(text: &str) -> Result<Option<SocketAddr>, &'static str> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let (host, port) = split_host_port(t).ok_or("must be IP:port")?;
    let ip: IpAddr = host.parse().map_err(|_| "must be a valid IP")?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or("must be a valid port")?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// An interface name (or prefix) both rule syntaxes and the kernel accept, checked by the same
/// function the renderers use, so the configuration refuses exactly what could not be written
/// into a rule. Upstream only asks for non-empty.
fn interface_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    kproxy_contract::check_interface_name(name)
        .map_err(|why| format!("not an interface name: {why}"))?;
    Ok(name.to_string())
}

/// Parses `CIDR[,CIDR]`: at most one CIDR per family (dual-stack pairs), spaces trimmed.
pub fn parse_cidrs(text: &str, field: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut out: Vec<IpNet> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = part.parse().map_err(|_| ConfigError {
            field: field.into(),
            value: part.into(),
            reason: "not a CIDR (expected e.g. 10.96.0.0/12 or fd00::/108)".into(),
        })?;
        if out
            .iter()
            .any(|n| IpFamily::of_net(n) == IpFamily::of_net(&net))
        {
            return Err(ConfigError {
                field: field.into(),
                value: text.into(),
                reason: "at most one CIDR per IP family".into(),
            });
        }
        out.push(net);
    }
    Ok(out)
}

/// Refuses service CIDRs that overlap pod CIDRs of the same family: the node could not tell a
/// service address from a pod address, and traffic to one would be captured as the other.
pub fn check_overlap(services: &[IpNet], pods: &[IpNet]) -> Result<(), ConfigError> {
    for s in services {
        for p in pods {
            if IpFamily::of_net(s) == IpFamily::of_net(p)
                && (s.contains(&p.network()) || p.contains(&s.network()))
            {
                return Err(ConfigError {
                    field: "--service-cluster-ip-range".into(),
                    value: s.to_string(),
                    reason: format!(
                        "service CIDR {s} overlaps cluster CIDR {p} (--cluster-cidr); pod and \
                         service address ranges must not overlap"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// A range of ports, both ends included: `--service-node-port-range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// The first port of the range.
    pub first: u16,
    /// The last port of the range.
    pub last: u16,
}

impl PortRange {
    /// The API server's default NodePort range.
    pub const DEFAULT_NODE_PORTS: PortRange = PortRange {
        first: 30000,
        last: 32767,
    };

    /// Whether `port` lies inside.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Parses the API server's `--service-node-port-range` syntax (`utilnet.PortRange`):
    /// `N-M`, also `N` and `N+OFFSET`, spaces trimmed; ports above 65535 and an end before the
    /// start are refused. Empty is refused too: upstream reads it as "no range", which would
    /// refuse every NodePort.
    pub fn parse(text: &str, field: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError {
            field: field.into(),
            value: text.into(),
            reason: reason.into(),
        };
        let t = text.trim();
        let number = |s: &str| -> Result<u32, ConfigError> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("expected a port range N-M (e.g. 30000-32767)"));
            }
            s.parse::<u32>()
                .map_err(|_| bad("the port range cannot be greater than 65535"))
        };
        let (first, last) = match (t.split_once('-'), t.split_once('+')) {
            (Some(_), Some(_)) => return Err(bad("expected a port range N-M (e.g. 30000-32767)")),
            (Some((a, b)), None) => (number(a)?, number(b)?),
            (None, Some((a, b))) => {
                let a = number(a)?;
                (a, a.saturating_add(number(b)?))
            }
            (None, None) => {
                let a = number(t)?;
                (a, a)
            }
        };
        let (Ok(first), Ok(last)) = (u16::try_from(first), u16::try_from(last)) else {
            return Err(bad("the port range cannot be greater than 65535"));
        };
        if last < first {
            return Err(bad("end port cannot be less than start port"));
        }
        Ok(Self { first, last })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// A repeatable `CIDR[,CIDR]` list flag of any length, both families, spaces trimmed, host bits
/// cleared (`--external-ip-cidrs`). Empty (or only commas) is `None`: the flag is unset.
pub fn parse_cidr_list(values: &[String], field: &str) -> Result<Option<Vec<IpNet>>, ConfigError> {
    let mut out: Vec<IpNet> = Vec::new();
    for part in values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let net: IpNet = part.parse().map_err(|_| ConfigError {
            field: field.into(),
            value: part.into(),
            reason: "not a CIDR (expected e.g. 203.0.113.0/24 or 2001:db8::/64)".into(),
        })?;
        let net = net.trunc();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

/// `--nodeport-addresses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortSetting {
    /// Every local address but loopback (upstream's default for iptables).
    AllLocal,
    /// The node's primary IPs (from the Node object).
    Primary,
    /// Local addresses inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

impl NodePortSetting {
    /// Parses `primary` or a CIDR list (any number per family, as upstream allows).
    pub fn parse(text: &str, field: &str) -> Result<Self, ConfigError> {
        let parts: Vec<String> = text.split(',').map(str::to_string).collect();
        Self::from_list(&parts, field)
    }

    /// The list form (`nodePortAddresses`): `primary` alone, or CIDRs.
    pub fn from_list(items: &[String], field: &str) -> Result<Self, ConfigError> {
        let parts: Vec<&str> = items
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .collect();
        if parts.is_empty() {
            return Ok(Self::AllLocal);
        }
        if parts == ["primary"] {
            return Ok(Self::Primary);
        }
        if parts.contains(&"primary") {
            return Err(ConfigError {
                field: field.into(),
                value: parts.join(","),
                reason: "can't use both 'primary' and CIDRs".into(),
            });
        }
        parts
            .iter()
            .map(|p| {
                p.parse::<IpNet>().map_err(|_| ConfigError {
                    field: field.into(),
                    value: (*p).into(),
                    reason: "expected a list of CIDRs or the single value `primary`".into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::Cidrs)
    }
}

/// The host name, lower-cased as kubelet registers it.
pub(crate) fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}
