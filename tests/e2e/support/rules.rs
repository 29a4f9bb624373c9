//! Comparing other software's netfilter state before and after kproxy ran.

/// iptables-save output without comments, counters, KPROXY lines, and tables that hold nothing
/// but empty built-in chains with their default policy (the nft backend may leave those behind).
pub(crate) fn foreign(save: &str) -> String {
    let mut out = String::new();
    let mut table: Vec<String> = Vec::new();
    let flush = |table: &mut Vec<String>, out: &mut String| {
        let trivial = table.iter().all(|l| {
            l.starts_with('*')
                || l == "COMMIT"
                || (l.starts_with(':') && l.ends_with(" ACCEPT") && is_builtin(l))
        });
        if !trivial {
            for l in table.iter() {
                out.push_str(l);
                out.push('\n');
            }
        }
        table.clear();
    };
    for line in save.lines() {
        if line.starts_with('#') || line.contains("KPROXY") {
            continue;
        }
        let line = if line.starts_with(':') {
            // ":CHAIN POLICY [packets:bytes]" → ":CHAIN POLICY"
            line.split(" [").next().unwrap_or(line).to_string()
        } else {
            line.to_string()
        };
        table.push(line);
        if table.last().is_some_and(|l| l == "COMMIT") {
            flush(&mut table, &mut out);
        }
    }
    flush(&mut table, &mut out);
    out
}

fn is_builtin(header: &str) -> bool {
    let chain = header
        .trim_start_matches(':')
        .split_whitespace()
        .next()
        .unwrap_or("");
    matches!(
        chain,
        "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING"
    )
}

/// Waits until kproxy (in any mode but iptables-legacy) has looked for the legacy iptables
/// backend's leftovers, which it does after its first sync and logs per family (IPv6 last), then
/// asserts that looking created no legacy (x_tables) table in `node`'s namespace: reading a
/// legacy table by name (`iptables-legacy-save -t nat`) creates it, and a legacy nat table brings
/// connection tracking and NAT hooks to every packet of the node.
pub(crate) fn assert_no_legacy_tables(
    kproxy: &crate::support::kproxy::KproxyProcess,
    node: &crate::support::netns::Netns,
) {
    let checked = crate::support::kproxy::wait_until(crate::support::scenario::SYNC, || {
        let log = kproxy.stderr();
        log.contains("iptables rules removed (backend legacy, IPv6)")
            || log.contains("could not remove another mode's rules")
    });
    assert!(
        checked,
        "kproxy never finished its check for other modes' leftovers:\n{}",
        kproxy.stderr()
    );
    let legacy: Vec<String> = ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
        .iter()
        .map(|names| {
            let out = node.exec("cat", &[names]);
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .filter(|listed| !listed.is_empty())
        .collect();
    assert!(
        legacy.is_empty(),
        "kproxy created legacy iptables tables: {}",
        legacy.join(", ")
    );
}
