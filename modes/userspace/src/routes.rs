//! Service addresses made local: `local ADDR dev lo` routes in the `local` table, marked with
//! kproxy's own routing protocol number so `--cleanup` and `read_live` find ours and only ours.
//!
//! Why routes on `lo` and not a dummy interface: some kernels (this project's CI included) lack
//! the `dummy` link type, while a local route works on every Linux kernel and makes the address
//! local exactly like an interface address would (the kernel delivers packets to it and a socket
//! may bind it), without an interface to create or remove.
//!
//! Why `ip -batch` and not rtnetlink in-process: one process per sync that adds or removes
//! addresses (they change only when services come and go), the same error reporting as the other
//! modes' tools ([`kproxy_contract::command`]), and the batch text is exactly what an operator
//! would type to reproduce it. `iproute2` is present on every node that runs Kubernetes.

use std::collections::BTreeSet;
use std::net::IpAddr;

use kproxy_contract::Cause;
use kproxy_contract::command::run;

/// The `proto` number of kproxy's routes (unassigned in iproute2's `rt_protos`).
pub const ROUTE_PROTO: u8 = 201;

/// Where the service addresses live.
pub trait RouteTable: Send + 'static {
    /// The addresses kproxy's routes make local.
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, Cause>;
    /// Adds then removes routes. Returns the addresses of `add` that were already local
    /// through a route that is not ours (an interface address, an operator's route): those are
    /// left alone, never taken over, so removing ours can never remove someone else's. Removing
    /// a missing route is not an error.
    fn change(&mut self, add: &[IpAddr], remove: &[IpAddr]) -> Result<BTreeSet<IpAddr>, Cause>;
}

/// The kernel's routes, through `ip`.
#[derive(Debug, Default, Clone, Copy)]
pub struct IpRoute;

fn prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn batch(verb: &str, ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| {
            format!(
                "route {verb} local {} dev lo table local proto {ROUTE_PROTO}\n",
                prefix(ip)
            )
        })
        .collect()
}

impl RouteTable for IpRoute {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, Cause> {
        let mut out = BTreeSet::new();
        let proto = ROUTE_PROTO.to_string();
        for family in ["-4", "-6"] {
            let json = match run(
                "ip",
                "iproute2",
                &[
                    "-j", family, "route", "show", "table", "local", "proto", &proto,
                ],
                None,
            ) {
                Ok(json) => json,
                // A namespace that never had an address of this family has no local table:
                // no routes of ours either.
                Err(Cause::Failed { stderr, .. })
                    if stderr.contains("FIB table does not exist") =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            out.extend(parse_routes(&json));
        }
        Ok(out)
    }

    fn change(&mut self, add: &[IpAddr], remove: &[IpAddr]) -> Result<BTreeSet<IpAddr>, Cause> {
        let mut foreign = BTreeSet::new();
        if !add.is_empty() {
            // `add`, not `replace`: an address already local (say an externalIP that is the
            // node's own address) keeps its kernel route. `-force`: the other lines still run.
            let failed = batch_tolerating(&batch("add", add), "File exists")?;
            foreign.extend(failed.into_iter().filter_map(|line| add.get(line)));
        }
        if !remove.is_empty() {
            // Deleting with `proto 201` only ever matches our routes.
            batch_tolerating(&batch("del", remove), "No such process")?;
        }
        Ok(foreign)
    }
}

/// Runs an `ip -force -batch` and returns the (0-based) lines that failed with `tolerated`; any
/// other failure is an error.
fn batch_tolerating(input: &str, tolerated: &str) -> Result<Vec<usize>, Cause> {
    match run("ip", "iproute2", &["-force", "-batch", "-"], Some(input)) {
        Ok(_) => Ok(Vec::new()),
        Err(Cause::Failed {
            program,
            status,
            stderr,
        }) => {
            let mut failed = Vec::new();
            let mut last = "";
            for line in stderr.lines() {
                match line.strip_prefix("Command failed -:") {
                    Some(n) if last.contains(tolerated) => {
                        if let Ok(n) = n.trim().parse::<usize>() {
                            failed.push(n.saturating_sub(1));
                        }
                    }
                    Some(_) => {
                        return Err(Cause::Failed {
                            program,
                            status,
                            stderr,
                        });
                    }
                    None => last = line,
                }
            }
            Ok(failed)
        }
        Err(e) => Err(e),
    }
}

/// The destinations of `ip -j route show` output; anything unparsable is skipped with a log
/// line (it cannot be one of ours).
pub fn parse_routes(json: &str) -> Vec<IpAddr> {
    let value: serde_json::Value = match serde_json::from_str(json.trim()) {
        Ok(v) => v,
        Err(_) if json.trim().is_empty() => return Vec::new(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot parse `ip -j route show`; ignoring it");
            return Vec::new();
        }
    };
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let dst = r.get("dst")?.as_str()?;
            // Host routes print without the prefix length; be lenient about a `/32`.
            let ip = dst.split('/').next()?;
            match ip.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    tracing::warn!(dst, "unexpected route destination; ignoring it");
                    None
                }
            }
        })
        .collect()
}

/// An in-memory route table for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default, Clone)]
pub struct FakeRoutes {
    /// The addresses currently local.
    pub routes: std::sync::Arc<std::sync::Mutex<BTreeSet<IpAddr>>>,
    /// The next change is refused (as `ip` refuses one), changing nothing.
    pub refuse_next: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(any(test, feature = "testing"))]
impl RouteTable for FakeRoutes {
    fn list(&mut self) -> Result<BTreeSet<IpAddr>, Cause> {
        Ok(self.routes.lock().map(|r| r.clone()).unwrap_or_default())
    }

    fn change(&mut self, add: &[IpAddr], remove: &[IpAddr]) -> Result<BTreeSet<IpAddr>, Cause> {
        if self
            .refuse_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Cause::Failed {
                program: "ip".into(),
                status: "exit status: 2".into(),
                stderr: "RTNETLINK answers: Operation not permitted".into(),
            });
        }
        if let Ok(mut r) = self.routes.lock() {
            r.extend(add.iter().copied());
            for ip in remove {
                r.remove(ip);
            }
        }
        Ok(BTreeSet::new())
    }
}
