//! The only code that runs `nft`: `nft -j list table` to read, `nft -f -` to write, and the
//! netlink batches of element changes: the transactions a [`crate::steps::Schedule`] is made
//! of. Setting `KPROXY_NFT_APPLY=nft` applies every plan with `nft -f` only (for comparisons).

use kproxy_contract::{Cause, IpFamily};

use crate::live;
use crate::model::{TABLE, Table, family_name};
use crate::netlink::NetlinkError;
use crate::plan::NftPlan;
use crate::steps::{StepKernel, Via};

/// Reads and writes kproxy's nftables tables; a plan is written as the transactions of its
/// schedule ([`StepKernel`]).
pub trait NftKernel: StepKernel + Send + 'static {
    /// The family's kproxy table, or `None` if it does not exist.
    fn list(&mut self, family: IpFamily) -> Result<Option<Table>, Cause>;
    /// Whether the family's kproxy table exists (`nft list tables`: no elements are read).
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, Cause>;
}

/// The real kernel, through the `nft` binary.
#[derive(Debug, Clone, Default)]
pub struct NftCli;

const PROGRAM: &str = "nft";

impl NftKernel for NftCli {
    fn list(&mut self, family: IpFamily) -> Result<Option<Table>, Cause> {
        match run(&["-j", "list", "table", family_name(family), TABLE], None) {
            Ok(json) => live::parse(&json).map(Some).map_err(|e| Cause::Unreadable {
                program: PROGRAM.into(),
                cause: e.into(),
            }),
            Err(Cause::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn table_exists(&mut self, family: IpFamily) -> Result<bool, Cause> {
        // One netlink query for this table; `nft list tables` reads every element first.
        let asked = crate::netlink::socket::acquire().and_then(|socket| {
            let exists = socket.table_exists(family, TABLE)?;
            crate::netlink::socket::release(socket);
            Ok(exists)
        });
        match asked {
            Ok(exists) => return Ok(exists),
            Err(err) => {
                tracing::debug!(error = %kproxy_contract::Chain(&err), "table query through netlink failed; asking nft")
            }
        }
        let want = format!("table {} {TABLE}", family_name(family));
        Ok(run(&["list", "tables"], None)?
            .lines()
            .any(|l| l.trim() == want))
    }
}

impl StepKernel for NftCli {
    fn nft(&mut self, plan: &NftPlan) -> Result<(), Cause> {
        apply_with_nft(plan)
    }

    fn elements(&mut self, plan: &NftPlan) -> Result<(), NetlinkError> {
        crate::steps::NetlinkElements(apply_with_nft).elements(plan)
    }
}

/// The name of the environment variable that selects how plans are applied.
pub const APPLY_ENV: &str = "KPROXY_NFT_APPLY";

/// `KPROXY_NFT_APPLY=nft`: every plan through `nft -f`, never netlink. Read when a mode is
/// made, not on every apply.
pub fn via_from_env() -> Via {
    if std::env::var(APPLY_ENV).is_ok_and(|v| v == "nft") {
        Via::NftOnly
    } else {
        Via::Netlink
    }
}

/// One `nft -f -` transaction for the whole plan.
pub(crate) fn apply_with_nft(plan: &NftPlan) -> Result<(), Cause> {
    let script = plan.script();
    run(&["-f", "-"], Some(&script))
        .map(|_| ())
        .map_err(|e| with_failing_line(e, &script))
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, Cause> {
    kproxy_contract::command::run(PROGRAM, "nftables", args, stdin)
}

/// nft reports `/dev/stdin:LINE:COL-COL: Error: ...`; keep the first error line short and
/// readable (the script can be megabytes long).
fn with_failing_line(err: Cause, _script: &str) -> Cause {
    match err {
        Cause::Failed {
            program,
            status,
            stderr,
        } => {
            let mut lines: Vec<&str> = stderr.lines().take(3).collect();
            if let Some(first) = lines.first_mut() {
                *first = first.trim_start_matches("/dev/stdin:");
            }
            let short: String = lines.join(" | ").chars().take(600).collect();
            Cause::Failed {
                program,
                status,
                stderr: short,
            }
        }
        other => other,
    }
}
