//! Network namespaces the tests create and always delete (RAII), and veth pairs between them.
//!
//! Nothing here touches the root namespace: veth pairs are created inside the first namespace
//! (`ip -n A link add … peer … netns B`), sysctls are written inside the test's namespaces, and
//! [`Netns::in_ns`] enters a namespace only on a fresh std thread (setns is per thread).

use std::fs::File;
use std::process::{Command, Output};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

/// Every namespace this process creates is named `kpx-<pid>-<n>-<role>`.
const PREFIX: &str = "kpx-";

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

/// A network namespace, deleted on drop (also when the test panics).
#[derive(Debug)]
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    /// Creates `kpx-<pid>-<n>-<role>` with `lo` up.
    pub(crate) fn new(role: &str) -> Netns {
        SWEEP.call_once(sweep_dead);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        run_ok("ip", &["netns", "add", &name]);
        // Constructed before anything else can fail, so Drop deletes it.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No duplicate address detection on the interfaces created here: link-local addresses
        // are usable at once, so neighbour discovery works from the first packet (with DAD the
        // first IPv6 connection through a router waits about 2 s).
        for conf in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0");
            ns.sysctl(&format!("net.ipv6.conf.{conf}.dad_transmits"), "0");
        }
        ns
    }

    /// The name under /run/netns.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Runs `cmd args` inside the namespace (`ip netns exec`); never panics.
    pub(crate) fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .expect("spawn ip netns exec")
    }

    /// Runs `cmd args` inside the namespace and returns stdout; panics with stderr on failure.
    pub(crate) fn run(&self, cmd: &str, args: &[&str]) -> String {
        let out = self.exec(cmd, args);
        assert!(
            out.status.success(),
            "in {}: {cmd} {args:?} failed ({}): {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -n NAME args…`, panicking on failure.
    pub(crate) fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_ok("ip", &full);
    }

    /// Adds an address (`10.0.0.1/24`, `fd00::1/64`) to `dev`; IPv6 addresses get `nodad` so
    /// they are usable at once.
    pub(crate) fn add_addr(&self, dev: &str, cidr: &str) {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev]);
        }
    }

    /// Adds a route (`ip route add DEST via GW`); the family follows the gateway.
    pub(crate) fn route(&self, dest: &str, via: &str) {
        if via.contains(':') {
            self.ip(&["-6", "route", "add", dest, "via", via]);
        } else {
            self.ip(&["route", "add", dest, "via", via]);
        }
    }

    /// Sets sysctl `key` (dotted, e.g. `net.ipv4.ip_forward`) inside this namespace: written to
    /// /proc/sys from a thread that entered it (net sysctls follow the writing thread's
    /// namespace), so no `sysctl` binary is needed.
    pub(crate) fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        let name = self.name.clone();
        self.in_ns(move || {
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {path} in {name}: {e}"));
        });
    }

    /// Reads sysctl `key` inside this namespace.
    pub(crate) fn sysctl_get(&self, key: &str) -> String {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.in_ns(move || std::fs::read_to_string(&path).expect("read sysctl"))
            .trim()
            .to_string()
    }

    /// Turns on IPv4 and IPv6 forwarding inside this namespace.
    pub(crate) fn enable_forwarding(&self) {
        self.sysctl("net.ipv4.ip_forward", "1");
        self.sysctl("net.ipv6.conf.all.forwarding", "1");
    }

    /// Runs `f` on a fresh std thread that has entered this namespace, and returns its result.
    /// Sockets created inside `f` stay in the namespace and work from any thread afterwards.
    /// A panic in `f` is propagated.
    pub(crate) fn in_ns<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let handle = std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .expect("spawn namespace thread");
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Netns {
    /// Like [`Netns::in_ns`], but does not wait: `f` runs on a new named thread inside the
    /// namespace (for long-running traffic generators). Join the handle for its result.
    pub(crate) fn spawn_in<T, F>(&self, thread: &str, f: F) -> std::thread::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::Builder::new()
            .name(thread.to_string())
            .spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .expect("spawn namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("warning: ip netns delete {}: {e}", self.name),
        }
    }
}

/// The two ends of a veth pair.
#[derive(Debug, Clone)]
pub(crate) struct Veth {
    /// The first namespace's name.
    pub(crate) a_ns: String,
    /// The interface name in the first namespace.
    pub(crate) a_dev: String,
    /// The second namespace's name.
    pub(crate) b_ns: String,
    /// The interface name in the second namespace.
    pub(crate) b_dev: String,
}

impl Veth {
    /// Waits (at most 3 s) until both ends are operationally up. The kernel's linkwatch brings
    /// a new veth's carrier and qdisc up asynchronously, up to a second later; packets sent
    /// before that are dropped (the first IPv6 neighbour solicitation is lost and retried only
    /// after a second). Create every pair first, then wait: one linkwatch run serves them all.
    pub(crate) fn wait_up(&self) {
        for (ns, dev) in [(&self.a_ns, &self.a_dev), (&self.b_ns, &self.b_dev)] {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let out = Command::new("ip")
                    .args(["-n", ns, "-o", "link", "show", "dev", dev])
                    .output()
                    .expect("spawn ip link show");
                let text = String::from_utf8_lossy(&out.stdout);
                if text.contains(" state UP ") && !text.contains("qdisc noop") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{dev} in {ns} is not up after 3 s: {text}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Connects `a` and `b` with a veth pair, gives each end its addresses (CIDRs; IPv6 with
/// `nodad`) and brings both ends up. The pair is created inside `a`, so the root namespace never
/// sees it; it disappears with either namespace. Call [`Veth::wait_up`] before sending traffic.
pub(crate) fn veth(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) -> Veth {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let a_dev = format!("va{n}");
    let b_dev = format!("vb{n}");
    a.ip(&[
        "link", "add", &a_dev, "type", "veth", "peer", "name", &b_dev, "netns", &b.name,
    ]);
    for (ns, dev, addrs) in [(a, &a_dev, a_addrs), (b, &b_dev, b_addrs)] {
        for addr in addrs {
            ns.add_addr(dev, addr);
        }
        ns.ip(&["link", "set", dev, "up"]);
    }
    Veth {
        a_ns: a.name.clone(),
        a_dev,
        b_ns: b.name.clone(),
        b_dev,
    }
}

fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces left by earlier runs of this harness that were killed before their Drop ran
/// (`kpx-<pid>-…` whose pid no longer exists). Never touches any other namespace.
fn sweep_dead() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        }
    }
}
