//! CIDR lists, the service/pod overlap check, NodePort addresses, the host name.

use ipnet::IpNet;
use kproxy_contract::IpFamily;

use super::ConfigError;

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
        let parts: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if parts.is_empty() {
            return Ok(Self::AllLocal);
        }
        if parts == ["primary"] {
            return Ok(Self::Primary);
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
pub(super) fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}
