//! The only code that runs `nft`: `nft -j list table` to read, `nft -f -` to write (one atomic
//! transaction for the whole script).

use std::io::Write as _;
use std::process::{Command, Stdio};

use kproxy_contract::{CommandError, IpFamily};

use crate::live;
use crate::model::{TABLE, Table, family_name};
use crate::plan::NftPlan;

/// Reads and writes kproxy's nftables tables.
pub trait NftKernel: Send + 'static {
    /// The family's kproxy table, or `None` if it does not exist.
    fn list(&mut self, family: IpFamily) -> Result<Option<Table>, CommandError>;
    /// Applies a plan as one transaction.
    fn apply(&mut self, plan: &NftPlan) -> Result<(), CommandError>;
}

/// The real kernel, through the `nft` binary.
#[derive(Debug, Clone, Default)]
pub struct NftCli;

const PROGRAM: &str = "nft";

impl NftKernel for NftCli {
    fn list(&mut self, family: IpFamily) -> Result<Option<Table>, CommandError> {
        match run(&["-j", "list", "table", family_name(family), TABLE], None) {
            Ok(json) => live::parse(&json)
                .map(Some)
                .map_err(|e| CommandError::Failed {
                    program: PROGRAM.into(),
                    status: "exit status: 0".into(),
                    stderr: e.to_string(),
                }),
            Err(CommandError::Failed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn apply(&mut self, plan: &NftPlan) -> Result<(), CommandError> {
        let script = plan.script();
        run(&["-f", "-"], Some(&script))
            .map(|_| ())
            .map_err(|e| with_failing_line(e, &script))
    }
}

fn resolve() -> std::path::PathBuf {
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(PROGRAM))
        .find(|p| p.is_file());
    in_path
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| std::path::Path::new(d).join(PROGRAM))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PROGRAM.into())
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, CommandError> {
    let mut child = Command::new(resolve())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|cause| match cause.kind() {
            std::io::ErrorKind::NotFound => CommandError::NotFound {
                program: PROGRAM.into(),
                package: "nftables",
            },
            _ => CommandError::Io {
                program: PROGRAM.into(),
                cause,
            },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|cause| CommandError::Io {
                program: PROGRAM.into(),
                cause,
            })?;
    }
    let out = child.wait_with_output().map_err(|cause| CommandError::Io {
        program: PROGRAM.into(),
        cause,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CommandError::Failed {
            program: PROGRAM.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// nft reports `/dev/stdin:LINE:COL-COL: Error: ...`; keep the first error line short and
/// readable (the script can be megabytes long).
fn with_failing_line(err: CommandError, _script: &str) -> CommandError {
    match err {
        CommandError::Failed {
            program,
            status,
            stderr,
        } => {
            let mut lines: Vec<&str> = stderr.lines().take(3).collect();
            if let Some(first) = lines.first_mut() {
                *first = first.trim_start_matches("/dev/stdin:");
            }
            let short: String = lines.join(" | ").chars().take(600).collect();
            CommandError::Failed {
                program,
                status,
                stderr: short,
            }
        }
        other => other,
    }
}
