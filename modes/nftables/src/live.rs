//! Reads `nft -j list table` output back into the [`Table`] model.
//!
//! Elements become the same canonical strings the renderer writes; rules are known by the
//! identity in their comment (a rule without one, which kproxy never writes, gets an identity
//! that matches nothing, so its chain is rewritten).

use serde_json::Value;

use crate::model::{BaseChain, Elements, Rule, Set, Table};

/// Why the JSON could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("cannot understand `nft -j` output: {0}")]
pub struct ParseError(pub String);

/// Parses the JSON of `nft -j list table FAMILY kproxy`.
pub fn parse(json: &str) -> Result<Table, ParseError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| ParseError(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| ParseError("no `nftables` array".into()))?;
    let mut table = Table::default();
    for item in items {
        if let Some(c) = item.get("chain") {
            let name = str_field(c, "name")?;
            let base = match (c.get("type"), c.get("hook"), c.get("prio")) {
                (Some(k), Some(h), Some(p)) => Some(BaseChain {
                    kind: static_str(k.as_str().unwrap_or_default(), &["nat", "filter"]),
                    hook: static_str(
                        h.as_str().unwrap_or_default(),
                        &["prerouting", "input", "forward", "output", "postrouting"],
                    ),
                    priority: p
                        .as_i64()
                        .and_then(|p| i32::try_from(p).ok())
                        .unwrap_or_default(),
                }),
                _ => None,
            };
            table.chains.entry(name).or_default().base = base;
        } else if let Some(r) = item.get("rule") {
            let chain = str_field(r, "chain")?;
            let id = r.get("comment").and_then(Value::as_str).unwrap_or("<none>");
            table
                .chains
                .entry(chain)
                .or_default()
                .rules
                .push(Rule::from_id(id));
        } else if let Some((s, is_map)) = item
            .get("set")
            .map(|s| (s, false))
            .or_else(|| item.get("map").map(|m| (m, true)))
        {
            let name = str_field(s, "name")?;
            let mut elements = Elements::default();
            for e in s
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if is_map {
                    let pair = e.as_array().filter(|p| p.len() == 2).ok_or_else(|| {
                        ParseError(format!("map {name}: element is not a pair: {e}"))
                    })?;
                    elements.insert(canon(&pair[0]), Some(canon(&pair[1])));
                } else {
                    elements.insert(canon(e), None);
                }
            }
            table.sets.insert(
                name,
                Set {
                    is_map,
                    decl: String::new(),
                    signature: signature(s, is_map),
                    elements,
                },
            );
        }
    }
    Ok(table)
}

fn str_field(v: &Value, field: &str) -> Result<String, ParseError> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ParseError(format!("object without `{field}`: {v}")))
}

fn static_str(s: &str, known: &[&'static str]) -> &'static str {
    known
        .iter()
        .find(|k| **k == s)
        .copied()
        .unwrap_or("unknown")
}

/// The same signature string the renderer computes from its declaration.
fn signature(s: &Value, is_map: bool) -> String {
    let types = |v: Option<&Value>| -> String {
        match v {
            Some(Value::String(t)) => t.clone(),
            Some(Value::Array(ts)) => ts
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" . "),
            _ => String::new(),
        }
    };
    let mut sig = types(s.get("type"));
    if is_map {
        sig.push_str(" : ");
        sig.push_str(&types(s.get("map")));
    }
    // `dynamic` is implied by how nft lists timeout sets; compare the rest.
    let flags: Vec<&str> = s
        .get("flags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|f| *f != "dynamic")
        .collect();
    if !flags.is_empty() {
        sig.push_str(" flags ");
        sig.push_str(&flags.join(","));
    }
    if let Some(t) = s.get("timeout").and_then(Value::as_u64) {
        sig.push_str(&format!(" timeout {t}"));
    }
    sig
}

/// An element (key or value) as the renderer writes it.
pub fn canon(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(parts) => parts.iter().map(canon).collect::<Vec<_>>().join(" . "),
        Value::Object(o) => {
            if let Some(parts) = o.get("concat").and_then(Value::as_array) {
                return parts.iter().map(canon).collect::<Vec<_>>().join(" . ");
            }
            if let Some(p) = o.get("prefix") {
                let addr = p.get("addr").map(canon).unwrap_or_default();
                let len = p.get("len").map(canon).unwrap_or_default();
                return format!("{addr}/{len}");
            }
            if let Some(r) = o.get("range").and_then(Value::as_array) {
                return r.iter().map(canon).collect::<Vec<_>>().join("-");
            }
            if let Some(e) = o.get("elem") {
                // {"elem": {"val": ..., "timeout": ...}}
                return e.get("val").map(canon).unwrap_or_default();
            }
            for verdict in ["goto", "jump"] {
                if let Some(t) = o
                    .get(verdict)
                    .and_then(|g| g.get("target"))
                    .and_then(Value::as_str)
                {
                    return format!("{verdict} {t}");
                }
            }
            for verdict in ["drop", "accept", "return", "continue"] {
                if o.contains_key(verdict) {
                    return verdict.to_string();
                }
            }
            v.to_string()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `nft -j` output (nft 1.0.6), trimmed.
    const SAMPLE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "ip", "name": "kproxy", "handle": 1}}, {"map": {"family": "ip", "name": "endpoints", "table": "kproxy", "type": ["ipv4_addr", "inet_proto", "inet_service", "integer"], "handle": 3, "map": "ipv4_addr . inet_service", "elem": [[{"concat": ["10.96.0.10", "tcp", 80, 0]}, {"concat": ["10.244.1.1", 8080]}]]}}, {"map": {"family": "ip", "name": "service-ips", "table": "kproxy", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 4, "map": "verdict", "elem": [[{"concat": ["10.96.0.11", "udp", 53]}, {"drop": null}], [{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "pick-2"}}]]}}, {"set": {"family": "ip", "name": "firewall-allow", "table": "kproxy", "type": ["ipv4_addr", "inet_proto", "inet_service", "ipv4_addr"], "handle": 5, "flags": ["interval"], "elem": [{"concat": ["10.96.0.10", "tcp", 80, {"prefix": {"addr": "203.0.113.0", "len": 24}}]}, {"concat": ["1.2.3.4", "tcp", 443, "10.0.0.1"]}]}}, {"set": {"family": "ip", "name": "affinity-x", "table": "kproxy", "type": "ipv4_addr", "handle": 6, "flags": ["timeout"], "timeout": 600}}, {"chain": {"family": "ip", "table": "kproxy", "name": "pick-2", "handle": 1}}, {"chain": {"family": "ip", "table": "kproxy", "name": "services", "handle": 2, "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}}, {"rule": {"family": "ip", "table": "kproxy", "chain": "pick-2", "handle": 8, "comment": "abcd1234", "expr": []}}]}"#;

    #[test]
    fn parses_sets_maps_chains_and_rule_ids() {
        let t = parse(SAMPLE).expect("parses");
        assert_eq!(
            t.sets["endpoints"]
                .elements
                .get("10.96.0.10 . tcp . 80 . 0"),
            Some(&Some("10.244.1.1 . 8080".into()))
        );
        assert_eq!(
            t.sets["endpoints"].signature,
            "ipv4_addr . inet_proto . inet_service . integer : ipv4_addr . inet_service"
        );
        assert_eq!(
            t.sets["service-ips"].elements.get("10.96.0.10 . tcp . 80"),
            Some(&Some("goto pick-2".into()))
        );
        assert_eq!(
            t.sets["service-ips"].elements.get("10.96.0.11 . udp . 53"),
            Some(&Some("drop".into()))
        );
        assert!(
            t.sets["firewall-allow"]
                .elements
                .contains_key("10.96.0.10 . tcp . 80 . 203.0.113.0/24")
        );
        assert!(
            t.sets["firewall-allow"]
                .elements
                .contains_key("1.2.3.4 . tcp . 443 . 10.0.0.1")
        );
        assert_eq!(
            t.sets["affinity-x"].signature,
            "ipv4_addr flags timeout timeout 600"
        );
        assert_eq!(t.chains["pick-2"].rules[0].id, "abcd1234");
        assert_eq!(
            t.chains["services"].base.as_ref().map(|b| b.priority),
            Some(-100)
        );
    }
}
