//! The only code that runs iptables binaries: `*-save` to read, `*-restore --noflush` to write.

use kproxy_contract::command::Input as _;
use kproxy_contract::{Cause, IpFamily};

use crate::plan::RestoreInput;
use crate::ruleset::Table;

/// Reads and writes iptables tables. The real one runs the binaries; tests use [`crate::fake`].
pub trait IptablesKernel: Send + 'static {
    /// `iptables-save -t TABLE` output.
    fn save(&mut self, family: IpFamily, table: Table) -> Result<String, Cause>;
    /// Runs `iptables-restore --noflush` with `payload` on stdin: one atomic transaction per table.
    fn restore(&mut self, family: IpFamily, payload: &RestoreInput<'_>) -> Result<(), Cause>;
    /// Whether `chain` exists in `table` (one cheap `iptables -S CHAIN`, not a table dump).
    fn chain_exists(&mut self, family: IpFamily, table: Table, chain: &str) -> Result<bool, Cause>;
    /// Whether many new chains are better created in a restore of their own
    /// ([`crate::plan::TablePlan::staged`]): on the nft backend, whose `--noflush` restore
    /// walks a list of the input's chain names for every line. A legacy restore rewrites the
    /// whole table each time, so there one restore is cheaper.
    fn stages_new_chains(&self) -> bool {
        false
    }
}

/// Which iptables backend the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// iptables-nft: rules live in nf_tables.
    Nft,
    /// iptables-legacy: the x_tables kernel API.
    Legacy,
}

impl Backend {
    /// The name users see.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        }
    }

    fn program(&self, family: IpFamily, tool: &str) -> String {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        format!("{base}-{}-{tool}", self.as_str())
    }

    /// Picks the backend the host already uses, as upstream's iptables-wrappers does: kubelet's
    /// hint chains decide if present; otherwise whichever backend holds more rules; nft on a tie
    /// (it is Debian's default, and a fresh node has no rules at all).
    pub fn detect() -> Backend {
        let count = |b: Backend| -> (bool, usize) {
            let mut hint = false;
            let mut rules = 0;
            for family in IpFamily::ALL {
                let Ok(text) = run(&b.program(family, "save"), &[], None) else {
                    continue;
                };
                hint |= text.contains("KUBE-IPTABLES-HINT") || text.contains("KUBE-KUBELET-CANARY");
                rules += text.lines().filter(|l| l.starts_with("-A")).count();
            }
            (hint, rules)
        };
        let (legacy_hint, legacy_rules) = count(Backend::Legacy);
        let (nft_hint, nft_rules) = count(Backend::Nft);
        if legacy_hint && !nft_hint {
            Backend::Legacy
        } else if nft_hint || nft_rules >= legacy_rules {
            Backend::Nft
        } else {
            Backend::Legacy
        }
    }
}

/// Whether the legacy (x_tables) `table` exists in this network namespace, from the kernel's
/// list of instantiated tables. No list (the module is not loaded) means no table; a list that
/// cannot be read otherwise counts as the table existing, so the caller reads it as before.
fn legacy_table_exists(family: IpFamily, table: Table) -> bool {
    let names = match family {
        IpFamily::V4 => "/proc/net/ip_tables_names",
        IpFamily::V6 => "/proc/net/ip6_tables_names",
    };
    match std::fs::read_to_string(names) {
        Ok(text) => lists_table(&text, table),
        Err(err) => err.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Whether a `/proc/net/ip_tables_names` text lists `table` (one name per line).
pub(crate) fn lists_table(names: &str, table: Table) -> bool {
    names.lines().any(|l| l.trim() == table.as_str())
}

/// The real kernel, through the iptables binaries of one backend.
#[derive(Debug, Clone)]
pub struct IptablesCli {
    backend: Backend,
}

impl IptablesCli {
    /// Uses the given backend.
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }
}

impl IptablesKernel for IptablesCli {
    fn stages_new_chains(&self) -> bool {
        self.backend == Backend::Nft
    }

    fn save(&mut self, family: IpFamily, table: Table) -> Result<String, Cause> {
        // Naming a legacy table creates it: the kernel instantiates a legacy table in a network
        // namespace on first use, and a nat table brings connection tracking and NAT hooks to
        // every packet of the node. A legacy table that does not exist holds nothing of ours,
        // so it reads as empty, and reading another mode's leftovers (every mode does, after
        // its first sync) leaves the node's packet path as it was.
        if self.backend == Backend::Legacy && !legacy_table_exists(family, table) {
            return Ok(String::new());
        }
        run(
            &self.backend.program(family, "save"),
            &["-t", table.as_str()],
            None,
        )
    }

    fn chain_exists(&mut self, family: IpFamily, table: Table, chain: &str) -> Result<bool, Cause> {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let program = format!("{base}-{}", self.backend.as_str());
        match run(
            &program,
            &["-w", "5", "-t", table.as_str(), "-S", chain],
            None,
        ) {
            Ok(_) => Ok(true),
            Err(Cause::Failed { stderr, .. }) if stderr.contains("No chain") => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn restore(&mut self, family: IpFamily, payload: &RestoreInput<'_>) -> Result<(), Cause> {
        let program = self.backend.program(family, "restore");
        // --wait: another writer holding the xtables lock delays us instead of failing the sync.
        kproxy_contract::command::run_input(
            &program,
            "iptables",
            &["--noflush", "--wait", "10"],
            Some(payload),
        )
        .map(|_| ())
        // The text again, only to quote the line the tool refused.
        .map_err(|e| with_failing_line(e, &payload.text()))
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Cause> {
    kproxy_contract::command::run(program, "iptables", args, stdin)
}

/// iptables-restore says "line N failed"; add that line's text so the error is actionable.
fn with_failing_line(err: Cause, payload: &str) -> Cause {
    match err {
        Cause::Failed {
            program,
            status,
            stderr,
        } => {
            let line = stderr
                .split("line ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.trim_end_matches(':').parse::<usize>().ok())
                .and_then(|n| payload.lines().nth(n.saturating_sub(1)));
            let stderr = match line {
                Some(text) => format!("{stderr} (the line was: {text})"),
                None => stderr,
            };
            Cause::Failed {
                program,
                status,
                stderr,
            }
        }
        other => other,
    }
}
