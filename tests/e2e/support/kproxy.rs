//! The kproxy binary under test, run inside a namespace, and a bounded polling helper.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::netns::Netns;

/// The binary cargo built for this test run.
pub(crate) const KPROXY: &str = env!("CARGO_BIN_EXE_kproxy");

/// A kproxy process inside a namespace. Its stdout and stderr go to files (printed when the test
/// panics); drop kills it by pid.
#[derive(Debug)]
pub(crate) struct KproxyProcess {
    child: Child,
    logs: TempDir,
    label: String,
    status: Option<ExitStatus>,
}

impl KproxyProcess {
    /// Starts `kproxy args…` inside `ns` (`ip netns exec` execs the binary, so the child's pid is
    /// kproxy's own).
    pub(crate) fn start(ns: &Netns, args: &[&str]) -> KproxyProcess {
        KproxyProcess::start_with_env(ns, args, &[])
    }

    /// [`KproxyProcess::start`] with extra environment variables (`XTABLES_LOCKFILE`, ...).
    pub(crate) fn start_with_env(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> KproxyProcess {
        KproxyProcess::start_limited(ns, args, env, None)
    }

    /// [`KproxyProcess::start_with_env`] with an open-file limit (soft and hard) for kproxy:
    /// `prlimit` sets it on itself and execs kproxy, so the pid is still kproxy's.
    pub(crate) fn start_limited(
        ns: &Netns,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> KproxyProcess {
        let logs = tempfile::Builder::new()
            .prefix("kpx-logs-")
            .tempdir()
            .expect("log dir");
        let stdout = File::create(logs.path().join("stdout")).expect("stdout file");
        let stderr = File::create(logs.path().join("stderr")).expect("stderr file");
        // A private admin socket: the default path is host-wide (Unix sockets are not in the
        // network namespace), and tests run side by side.
        let admin = logs.path().join("admin.sock");
        let admin_flag = format!("--admin-socket={}", admin.display());
        let args: Vec<&str> = if args.iter().any(|a| a.starts_with("--admin-socket")) {
            args.to_vec()
        } else {
            std::iter::once(admin_flag.as_str())
                .chain(args.iter().copied())
                .collect()
        };
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns.name()]);
        if let Some(n) = nofile {
            command.args(["prlimit", &format!("--nofile={n}:{n}"), "--"]);
        }
        let child = command
            .arg(KPROXY)
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn kproxy");
        KproxyProcess {
            child,
            logs,
            label: format!("kproxy {args:?} in {}", ns.name()),
            status: None,
        }
    }

    /// Runs `kproxy args…` inside `ns` to completion (killing it after `timeout`) and returns it
    /// with its exit status.
    pub(crate) fn run(ns: &Netns, args: &[&str], timeout: Duration) -> (KproxyProcess, ExitStatus) {
        let mut p = KproxyProcess::start(ns, args);
        let status = p.wait(timeout).unwrap_or_else(|| {
            panic!(
                "{} did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                p.label,
                p.stdout(),
                p.stderr()
            )
        });
        (p, status)
    }

    /// The pid (kproxy's).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (to its pid only) and waits up to `timeout` for it to exit.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid")),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("SIGTERM");
        }
        self.wait(timeout)
    }

    /// How many file descriptors it has open now (`/proc/PID/fd`).
    pub(crate) fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or_default()
    }

    /// The exit status if it has exited.
    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait kproxy");
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_wait().is_some());
        self.status
    }

    /// Everything it wrote to stdout so far.
    pub(crate) fn stdout(&self) -> String {
        self.read_log("stdout")
    }

    /// Everything it wrote to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        self.read_log("stderr")
    }

    /// Its admin socket (a private one unless the test passed `--admin-socket`).
    pub(crate) fn admin_socket(&self) -> PathBuf {
        self.logs.path().join("admin.sock")
    }

    /// Where its logs are.
    pub(crate) fn log_dir(&self) -> PathBuf {
        self.logs.path().to_path_buf()
    }

    /// Panics (with its logs) if it has exited.
    pub(crate) fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!(
                "{} exited early ({status})\nstdout:\n{}\nstderr:\n{}",
                self.label,
                self.stdout(),
                self.stderr()
            );
        }
    }

    fn read_log(&self, which: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(which)).unwrap_or_default()
    }
}

impl Drop for KproxyProcess {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            // Child::kill signals this child's pid only.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}, status {:?})\n----- stdout:\n{}\n----- stderr:\n{}\n-----",
                self.label,
                self.child.id(),
                self.status,
                self.stdout(),
                self.stderr()
            );
        }
    }
}

/// Polls `predicate` every 20 ms until it holds (true) or `timeout` passes (false).
pub(crate) fn wait_until(timeout: Duration, mut predicate: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if predicate() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(deadline - now));
    }
}

/// Resident memory of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// `VmRSS`: resident now.
    pub(crate) rss_kb: u64,
    /// `VmHWM`: the peak resident size.
    pub(crate) peak_kb: u64,
}

/// [`Memory`] of `pid`.
pub(crate) fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kb: field("VmRSS:"),
        peak_kb: field("VmHWM:"),
    }
}
