//! Running the kernel userland tools (`iptables-restore`, `nft`, ...): the one place the modes
//! spawn processes, so every failure is a [`Cause`] naming the program and its stderr.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use wait_timeout::ChildExt as _;

use crate::Cause;

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

/// How long a program may run before it is killed: 30 s, plus 1 s per 256 KiB of input (a
/// full iptables-restore of 10,000 services is about 20 MiB and takes up to 10 s on the
/// iptables-nft backend). The bound is there for a tool that hangs (a stuck lock, a wedged
/// kernel call), which would otherwise stall the sync loop for ever; it is far above any run
/// measured, so it never cuts a slow but working one.
pub fn time_limit(input_bytes: usize) -> Duration {
    const BASE: Duration = Duration::from_secs(30);
    const PER_SECOND: usize = 256 * 1024;
    BASE + Duration::from_secs(u64::try_from(input_bytes / PER_SECOND).unwrap_or(u64::MAX / 2))
}

/// What a program reads on its standard input: its length (for [`time_limit`]) and how to
/// write it. A large input (an `iptables-restore` of 10,000 services is 16 MiB) is written to
/// the pipe as it is produced, so it is never held whole.
pub trait Input: Sync {
    /// Its length in bytes.
    fn len(&self) -> usize;

    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes it to `out`.
    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()>;

    /// The whole input as text (for a fake program, or an error message).
    fn text(&self) -> String {
        let mut buf = Vec::with_capacity(self.len());
        // Writing to a vector cannot fail.
        let _ = self.write_to(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Input for &str {
    fn len(&self) -> usize {
        str::len(self)
    }

    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        out.write_all(self.as_bytes())
    }

    fn text(&self) -> String {
        self.to_string()
    }
}

impl Input for String {
    fn len(&self) -> usize {
        String::len(self)
    }

    fn write_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        self.as_str().write_to(out)
    }
}

/// Runs `program args`, feeding `stdin`, and returns its stdout. `package` names the Debian
/// package to install when the program is missing. The program is killed after
/// [`time_limit`].
pub fn run(
    program: &str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, Cause> {
    run_input(
        program,
        package,
        args,
        stdin.as_ref().map(|s| s as &dyn Input),
    )
}

/// [`run`] with an [`Input`] written as it is produced.
pub fn run_input(
    program: &str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&dyn Input>,
) -> Result<String, Cause> {
    if !PROGRAMS.iter().any(|(p, _)| *p == program) {
        return Err(Cause::Io {
            program: program.to_string(),
            cause: std::io::Error::other(
                "not one of the programs kproxy may run (command::PROGRAMS), so the image may lack it",
            ),
        });
    }
    let limit = time_limit(stdin.map_or(0, Input::len));
    run_path(&resolve(program), program, package, args, stdin, limit)
}

/// [`run`] for the program at `path`, killed after `limit`. Standard input is written and
/// standard output and error read on threads of their own, so a program that writes much
/// before reading all its input cannot deadlock with us, and the time limit holds whatever
/// the program does with its pipes.
#[expect(
    clippy::disallowed_methods,
    reason = "the one place kproxy spawns a process"
)]
fn run_path(
    path: &Path,
    program: &str,
    package: &'static str,
    args: &[&str],
    stdin: Option<&dyn Input>,
    limit: Duration,
) -> Result<String, Cause> {
    let io = |cause| Cause::Io {
        program: program.to_string(),
        cause,
    };
    let mut child = Command::new(path)
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
            std::io::ErrorKind::NotFound => Cause::NotFound {
                program: program.to_string(),
                package,
            },
            _ => io(cause),
        })?;
    let input = child.stdin.take();
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io(std::io::Error::other("no pipes to the child")));
    };
    let (status, written, out, err) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || match (stdin, input) {
            (Some(text), Some(pipe)) => match write_all(text, pipe) {
                // A program that exits before reading all its input (a syntax error on line
                // 1) closes the pipe; its exit status says why.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => other,
            },
            _ => Ok(()),
        });
        let out = scope.spawn(move || {
            let mut buf = Vec::new();
            stdout.read_to_end(&mut buf).map(|_| buf)
        });
        let err = scope.spawn(move || {
            let mut buf = Vec::new();
            stderr.read_to_end(&mut buf).map(|_| buf)
        });
        let status = match child.wait_timeout(limit) {
            Ok(Some(status)) => Ok(Some(status)),
            Ok(None) => {
                // Our own child, by its handle: killing it closes its pipes, which ends the
                // threads above.
                let _ = child.kill();
                child.wait().map(|_| None)
            }
            Err(e) => Err(e),
        };
        (status, joined(writer), joined(out), joined(err))
    });
    let Some(status) = status.map_err(io)? else {
        return Err(Cause::TimedOut {
            program: program.to_string(),
            limit,
        });
    };
    written.map_err(io)?;
    let (out, err) = (out.map_err(io)?, err.map_err(io)?);
    if status.success() {
        Ok(String::from_utf8_lossy(&out).into_owned())
    } else {
        Err(Cause::Failed {
            program: program.to_string(),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&err).trim().to_string(),
        })
    }
}

/// Writes `input` to `pipe` through a buffer (an input writes many small pieces).
fn write_all(input: &dyn Input, pipe: std::process::ChildStdin) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, pipe);
    input.write_to(&mut out)?;
    out.flush()
}

/// A pipe thread's result; a panic in it (there is no code that panics) becomes an error.
fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, std::io::Result<T>>) -> std::io::Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("pipe thread panicked")))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::disallowed_methods,
        reason = "these tests time real child processes"
    )]
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Instant;

    use super::*;

    /// A fake tool: a shell script in a temporary directory.
    fn tool(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("tool");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write tool");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kproxy-command-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_hung_tool_is_killed_at_its_time_limit() {
        let dir = temp_dir("hung");
        // Prints its pid, then hangs without reading its input.
        let path = tool(&dir, "echo $$ >\"$0.pid\"; exec sleep 600");
        let start = Instant::now();
        let input = "x".repeat(1 << 20); // more than a pipe holds: the writer blocks too
        let err = run_path(
            &path,
            "nft",
            "nftables",
            &[],
            Some(&input),
            Duration::from_millis(300),
        )
        .expect_err("a hung tool must fail");
        let took = start.elapsed();
        assert!(
            matches!(&err, Cause::TimedOut { program, limit } if program == "nft" && *limit == Duration::from_millis(300)),
            "{err:?}"
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_eq!(
            err.to_string(),
            "`nft` did not finish within 300ms and was killed"
        );
        let pid = std::fs::read_to_string(dir.join("tool.pid")).expect("pid file");
        let alive = Path::new("/proc").join(pid.trim()).exists();
        assert!(
            !alive,
            "the hung tool (pid {}) is still running",
            pid.trim()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn output_input_and_failures_pass_through() {
        let dir = temp_dir("io");
        // Echoes its input and writes a lot to stderr before reading (a pipe's worth and more).
        let cat = tool(&dir, "head -c 200000 /dev/zero | tr '\\0' e >&2; cat");
        let input = "line\n".repeat(100_000);
        let out = run_path(
            &cat,
            "nft",
            "nftables",
            &[],
            Some(&input),
            Duration::from_secs(30),
        )
        .expect("cat");
        assert_eq!(out, input);
        let fail = tool(&dir, "echo 'Error: no such table' >&2; exit 1");
        let err = run_path(
            &fail,
            "nft",
            "nftables",
            &[],
            Some(&"x"),
            Duration::from_secs(30),
        )
        .expect_err("exit 1");
        assert!(
            matches!(&err, Cause::Failed { stderr, status, .. } if stderr == "Error: no such table" && status == "exit status: 1"),
            "{err:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_time_limit_grows_with_the_input() {
        assert_eq!(time_limit(0), Duration::from_secs(30));
        assert_eq!(time_limit(20 << 20), Duration::from_secs(110));
    }
}
