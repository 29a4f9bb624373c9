//! Where the CPU time went while a figure was measured: the whole machine's (`/proc/stat`) and
//! the subject's (every process in the process groups it started, `/proc/<pid>/stat`), split into
//! user and system time.
//!
//! Client, proxy and server share the machine's cores, so a proxy's throughput against direct is
//! bounded by what the path costs in CPU time per unit of work, not only by the proxy's code: the
//! kernel's work for the proxy's second connection (its receive and send paths, and for veth the
//! peer's receive run in the sender's context) is system time that no user-space design removes.
//! These figures let the report say how far a proxy whose own code took no time at all could go.

use std::time::Instant;

/// Clock ticks per second of `/proc/stat` and `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 in the
/// Linux ABI on every architecture this project builds for).
const TICKS_PER_S: f64 = 100.0;

/// CPU use over one measurement, as CPU-seconds per second of wall time (2.0 = two cores busy).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Usage {
    /// Share of all CPUs' time that was idle, in percent.
    pub(crate) idle_pct: f64,
    /// The machine's busy CPUs (user, nice, system, irq, softirq).
    pub(crate) busy: f64,
    /// The subject's processes in user mode.
    pub(crate) user: f64,
    /// The subject's processes in the kernel (system calls and the network stack run in them).
    pub(crate) system: f64,
    /// CPU 0's busy share (0 to 1): the harness's core when the proxy has a core of its own.
    pub(crate) cpu0_busy: f64,
}

/// Counters at one instant.
struct Sample {
    at: Instant,
    /// (idle + iowait, busy, all) ticks of every CPU together.
    machine: (u64, u64, u64),
    /// The same for CPU 0 alone.
    cpu0: (u64, u64, u64),
    /// (user, system) ticks of the subject's processes, including reaped children.
    subject: (u64, u64),
}

fn sample(groups: &[u32]) -> Sample {
    let (machine, cpu0) = machine_ticks();
    Sample {
        at: Instant::now(),
        machine,
        cpu0,
        subject: group_ticks(groups),
    }
}

/// Runs `f` and says what the machine and the processes of `groups` (process group ids: the
/// benchmark starts each subject as the leader of a group of its own) spent meanwhile.
pub(crate) fn during<T>(groups: &[u32], f: impl FnOnce() -> T) -> (T, Usage) {
    let before = sample(groups);
    let out = f();
    let after = sample(groups);
    (out, usage(&before, &after))
}

fn usage(a: &Sample, b: &Sample) -> Usage {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let per_s = |from: u64, to: u64| to.saturating_sub(from) as f64 / TICKS_PER_S / wall;
    // The share of a set of CPUs' ticks (idle, busy, all) that went to `pick`'s field.
    let share = |from: (u64, u64, u64), to: (u64, u64, u64), pick: fn((u64, u64, u64)) -> u64| {
        let all = to.2.saturating_sub(from.2);
        if all > 0 {
            pick(to).saturating_sub(pick(from)) as f64 / all as f64
        } else {
            0.0
        }
    };
    Usage {
        idle_pct: share(a.machine, b.machine, |t| t.0) * 100.0,
        busy: per_s(a.machine.1, b.machine.1),
        user: per_s(a.subject.0, b.subject.0),
        system: per_s(a.subject.1, b.subject.1),
        cpu0_busy: share(a.cpu0, b.cpu0, |t| t.1),
    }
}

/// `/proc/stat`'s first line and its `cpu0` line: (idle + iowait, busy, all) ticks. Steal (time
/// the hypervisor gave to others) is neither idle nor busy here; it counts in `all`.
fn machine_ticks() -> ((u64, u64, u64), (u64, u64, u64)) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu0 = stat
        .lines()
        .find(|l| l.starts_with("cpu0 "))
        .unwrap_or_default();
    (
        parse_cpu_line(stat.lines().next().unwrap_or_default()),
        parse_cpu_line(cpu0),
    )
}

fn parse_cpu_line(line: &str) -> (u64, u64, u64) {
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    (idle, busy, idle + busy + at(7))
}

/// (user, system) ticks of every process whose process group is one of `groups`, with the
/// children each has reaped (socat's per-connection children end and are counted there).
fn group_ticks(groups: &[u32]) -> (u64, u64) {
    if groups.is_empty() {
        return (0, 0);
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(t) = parse_pid_stat(&stat)
            && groups.contains(&t.pgrp)
        {
            total.0 += t.utime + t.cutime;
            total.1 += t.stime + t.cstime;
        }
    }
    total
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, PartialEq)]
struct PidStat {
    pgrp: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold spaces
/// and parentheses, so fields are counted from the last `)`.
fn parse_pid_stat(stat: &str) -> Option<PidStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is rest[0]; pgrp is field 5, utime..cstime fields 14..17.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(PidStat {
        pgrp: u32::try_from(num(5)?).ok()?,
        utime: num(14)?,
        stime: num(15)?,
        cutime: num(16)?,
        cstime: num(17)?,
    })
}

/// The machine's CPUs (`/proc/stat`'s `cpuN` lines): unlike `available_parallelism`, not narrowed
/// by the calling thread's affinity.
pub(crate) fn machine_cpus() -> usize {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
}
