//! The difference between two [`UserspaceRules`]: addresses to add and remove, listeners to
//! open, close or re-point. Its `Display` is the `--dry-run` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use kproxy_contract::{Plan, PlanStats};

use crate::model::{ListenerKey, Table, UserspaceRules};
use crate::routes::ROUTE_PROTO;

/// One sync's change.
#[derive(Debug, Clone, Default)]
pub struct UserspacePlan {
    /// Local routes on `lo` to add (before listeners bind to them); an address that is already
    /// local through someone else's route keeps that route.
    pub add_addresses: Vec<IpAddr>,
    /// Local routes on `lo` to delete (after their listeners closed).
    pub remove_addresses: Vec<IpAddr>,
    /// Listeners to open, with their tables.
    pub open: Vec<(ListenerKey, Arc<Table>)>,
    /// Listeners whose table changes (new table); their established connections keep running.
    pub update: Vec<(ListenerKey, Arc<Table>)>,
    /// Listeners to close at once (with the table they had, for the output).
    pub close: Vec<(ListenerKey, Arc<Table>)>,
    /// The complete list of service ports this mode cannot serve, when it changed.
    pub unsupported: Option<BTreeMap<String, String>>,
}

/// The change from `live` to `desired`.
pub fn plan(live: &UserspaceRules, desired: &UserspaceRules) -> UserspacePlan {
    let mut p = UserspacePlan {
        add_addresses: desired
            .addresses
            .difference(&live.addresses)
            .copied()
            .collect(),
        remove_addresses: live
            .addresses
            .difference(&desired.addresses)
            .copied()
            .collect(),
        ..UserspacePlan::default()
    };
    for (key, table) in &desired.listeners {
        match live.listeners.get(key) {
            None => p.open.push((*key, table.clone())),
            Some(old) if !Arc::ptr_eq(old, table) && old != table => {
                p.update.push((*key, table.clone()));
            }
            Some(_) => {}
        }
    }
    for (key, table) in &live.listeners {
        if !desired.listeners.contains_key(key) {
            p.close.push((*key, table.clone()));
        }
    }
    if live.unsupported != desired.unsupported {
        p.unsupported = Some(desired.unsupported.clone());
    }
    p
}

impl Plan for UserspacePlan {
    fn is_empty(&self) -> bool {
        self.add_addresses.is_empty()
            && self.remove_addresses.is_empty()
            && self.open.is_empty()
            && self.update.is_empty()
            && self.close.is_empty()
            && self.unsupported.is_none()
    }

    fn stats(&self) -> PlanStats {
        PlanStats {
            added: self.add_addresses.len() + self.open.len(),
            removed: self.remove_addresses.len() + self.close.len(),
            containers_touched: self.update.len(),
        }
    }
}

impl fmt::Display for UserspacePlan {
    /// Addresses first (they are node-wide: two services may share an IP), then listeners
    /// grouped by service port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.add_addresses.is_empty() || !self.remove_addresses.is_empty() {
            writeln!(
                f,
                "# local addresses (routes `local ADDR dev lo proto {ROUTE_PROTO}`)"
            )?;
            for a in &self.add_addresses {
                writeln!(f, "+ address {a}")?;
            }
            for a in &self.remove_addresses {
                writeln!(f, "- address {a}")?;
            }
        }
        let mut by_service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut line = |sign: char, verb: &str, key: &ListenerKey, table: &Table| {
            by_service
                .entry(format!(
                    "{} ({}, {})",
                    table.service, table.service.protocol, table.family
                ))
                .or_default()
                .push(format!("{sign} {verb} {key} {table}"));
        };
        for (key, table) in &self.open {
            line('+', "listen", key, table);
        }
        for (key, table) in &self.update {
            line('~', "endpoints", key, table);
        }
        for (key, table) in &self.close {
            line('-', "close", key, table);
        }
        for (service, lines) in by_service {
            writeln!(f, "# service {service}")?;
            for l in lines {
                writeln!(f, "{l}")?;
            }
        }
        if let Some(unsupported) = &self.unsupported {
            for (what, why) in unsupported {
                writeln!(f, "# not served: {what}: {why}")?;
            }
        }
        Ok(())
    }
}
