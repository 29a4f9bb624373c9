//! Running the kernel userland tools (`iptables-restore`, `nft`, ...): the one place the modes
//! spawn processes, so every failure is a [`CommandError`] naming the program and its stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::CommandError;

/// Every program kproxy may run, with the Debian package that provides it. [`run`] refuses any
/// other, so this list is complete by construction, and the runtime image installs exactly
/// these packages (a test compares the Dockerfile with it).
pub const PROGRAMS: &[(&str, &str)] = &[
    ("iptables-nft", "iptables"),
    ("iptables-nft-save", "iptables"),
    ("iptables-nft-restore", "iptables"),
    ("ip6tables-nft", "iptables"),
    ("ip6tables-nft-save", "iptables"),
    ("ip6tables-nft-restore", "iptables"),
    ("iptables-legacy", "iptables"),
    ("iptables-legacy-save", "iptables"),
    ("iptables-legacy-restore", "iptables"),
    ("ip6tables-legacy", "iptables"),
    ("ip6tables-legacy-save", "iptables"),
    ("ip6tables-legacy-restore", "iptables"),
    ("nft", "nftables"),
    ("ip", "iproute2"),
];

/// Finds `program` on PATH, then in the sbin directories a non-root user's PATH often lacks
/// (so `--dry-run` as a normal user reports "permission denied", not "not installed").
pub fn resolve(program: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file());
    in_path
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| program.into())
}

/// Runs `program args`, feeding `stdin`, and returns its stdout. `package` names the Debian
/// package to install when the program is missing.
pub fn run(
    program: &str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CommandError> {
    let io = |cause| CommandError::Io {
        program: program.to_string(),
        cause,
    };
    if !PROGRAMS.iter().any(|(p, _)| *p == program) {
        return Err(io(std::io::Error::other(
            "not one of the programs kproxy may run (command::PROGRAMS), so the image may lack it",
        )));
    }
    let mut child = Command::new(resolve(program))
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
                program: program.to_string(),
                package,
            },
            _ => io(cause),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(io)?;
    }
    let out = child.wait_with_output().map_err(io)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CommandError::Failed {
            program: program.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
