//! Network programming latency under churn, from the API (`--churn SECONDS`): the `kproxy`
//! binary (nftables mode) watches the fake API server (inside its namespace) holding N
//! services x E endpoints, and the harness changes one endpoint of one service every
//! `1/rate` seconds, round robin over the services, each time to an address never used before.
//!
//! Latency is measured outside kproxy, from the kernel: `nft monitor` runs in kproxy's
//! namespace and prints every element the kernel commits; a change counts as programmed when
//! its new endpoint address first appears in an `endpoints-tcp` element. So the figure runs
//! from the moment the harness wrote the object to the API server to the moment the kernel
//! committed the rule: the watch, kproxy's debounce (`--min-sync-period`), build, render, plan
//! and apply. At the end the harness reads the map back and compares every service's endpoints
//! with what it wrote last: a dropped or reordered change would leave a service behind.
//!
//! Alongside: kproxy's RSS and CPU every second.
//!
//! Before the churn, an idle phase (`--churn-idle SECONDS`, 60 by default): the first sync is
//! in the kernel and nothing changes; kproxy's CPU time over the phase (from `/proc`, its
//! periodic resyncs and watch upkeep included) and its RSS at the end are the idle figures.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::common::objects::{NODE_NAME, node, service, slice};
use crate::common::{Ns, Proc};
use crate::fake_apiserver::FakeApiServer;

/// What one churn run measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChurnRun {
    pub(crate) services: usize,
    pub(crate) endpoints: usize,
    pub(crate) rate: u32,
    pub(crate) seconds: u64,
    /// kproxy's start to its first complete sync.
    pub(crate) start_to_synced: Duration,
    /// Changes written to the API server.
    pub(crate) changes: usize,
    /// Write → kernel commit, per change seen, in the order they were written.
    pub(crate) latencies: Vec<(Duration, Duration)>,
    /// Changes whose address never reached the kernel.
    pub(crate) missing: usize,
    /// Services whose endpoints in the kernel at the end differ from the last write.
    pub(crate) mismatched: usize,
    /// (seconds since the churn started, RSS KiB, CPU % of one core over the last second).
    pub(crate) samples: Vec<(u64, u64, f64)>,
    /// The idle phase before the churn: its length, kproxy's CPU % of one core over it, its
    /// RSS (KiB) at the end.
    pub(crate) idle: (Duration, f64, u64),
}

/// The address the `k`-th change gives its service: 10.248.0.0/14, never used twice.
fn fresh(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 248, 0, 0)) + k as u32)
}

/// `ns/s{i}`'s slice with these endpoints and the trigger-time annotation upstream's
/// EndpointSlice controller writes.
fn slice_with(i: usize, addrs: &[Ipv4Addr]) -> Value {
    let mut s = slice(i, addrs.len(), 0);
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| {
            serde_json::json!({"addresses": [a.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}, "nodeName": "other-node"})
        })
        .collect();
    s["endpoints"] = Value::Array(endpoints);
    s["metadata"]["annotations"] = serde_json::json!({
        "endpoints.kubernetes.io/last-change-trigger-time":
            humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
    });
    s
}

/// The addresses `nft monitor` shows as values of `endpoints-tcp` elements on one line.
fn endpoint_values(line: &str) -> Vec<Ipv4Addr> {
    if !line.starts_with("add element ip kproxy endpoints-tcp") {
        return Vec::new();
    }
    line.split(" : ")
        .skip(1)
        .filter_map(|v| v.split(" . ").next()?.trim().parse().ok())
        .collect()
}

/// `/proc/PID/stat` utime + stime, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The endpoints of every ClusterIP in the kernel's `endpoints-tcp` map.
fn kernel_endpoints(ns: &Ns) -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "nft",
            "-j",
            "list",
            "map",
            "ip",
            "kproxy",
            "endpoints-tcp",
        ])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let elements = doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["map"]["elem"].as_array())
        .flatten();
    for e in elements {
        // [[key concat], [value concat]]
        let key = &e[0]["concat"];
        let value = &e[1]["concat"];
        if let (Some(vip), Some(ep)) = (key[0].as_str(), value[0].as_str()) {
            map.entry(vip.to_string())
                .or_default()
                .insert(ep.to_string());
        }
    }
    map
}

/// One churn run. See the module documentation.
pub(crate) fn run(
    n: usize,
    e: usize,
    rate: u32,
    seconds: u64,
    idle_seconds: u64,
) -> Result<ChurnRun, String> {
    let ns = Ns::new("bench", "churn");
    let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let api = FakeApiServer::start_on(listener);
    api.apply(node());
    let mut current: Vec<Vec<Ipv4Addr>> = Vec::with_capacity(n);
    for i in 0..n {
        api.apply(service(i));
        let s = slice(i, e, 0);
        let addrs: Vec<Ipv4Addr> = s["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ep| ep["addresses"][0].as_str()?.parse().ok())
            .collect();
        api.apply(s);
        current.push(addrs);
    }
    // The kernel's commits, as they happen. Started before kproxy, while the namespace has no
    // table: `nft monitor` started next to a filled table first lists all of it, and the events
    // of the first minute and a half then reached it 100 s late (measured).
    let seen: Arc<Mutex<HashMap<Ipv4Addr, Instant>>> = Arc::default();
    let mut monitor = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "nft", "monitor", "new", "elements"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nft monitor: {e}"))?,
    );
    let out = monitor.0.stdout.take().ok_or("nft monitor has no stdout")?;
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let now = Instant::now();
                let mut seen = seen.lock().unwrap();
                for addr in endpoint_values(&line) {
                    seen.entry(addr).or_insert(now);
                }
            }
        })
    };
    let log = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let url = api.url();
    let started = Instant::now();
    let kproxy = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, &crate::binary::kproxy_binary()])
            .args(["--master", &url, "--proxy-mode", "nftables"])
            .args([
                "--hostname-override",
                NODE_NAME,
                "--cluster-cidr",
                "10.244.0.0/16",
            ])
            .args(["--healthz-bind-address=", "--metrics-bind-address="])
            .args(["--log-format", "json"])
            .envs(crate::binary::image_env())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start kproxy: {e}"))?,
    );
    let pid = kproxy.0.id();
    let synced = loop {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        if text.contains("\"sync complete\"") {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("kproxy did not sync within 120 s: {text}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    // The monitor has printed the first sync (its last service's endpoints) before the churn
    // starts, so no change waits behind it.
    let caught_up = Instant::now() + Duration::from_secs(120);
    while !current[n - 1]
        .iter()
        .all(|a| seen.lock().unwrap().contains_key(a))
    {
        if Instant::now() > caught_up {
            return Err("nft monitor did not show the first sync within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let ticks_per_s = 100.0;
    let idle = {
        let before = cpu_ticks(pid).ok_or("cannot read kproxy's CPU time")?;
        let from = Instant::now();
        std::thread::sleep(Duration::from_secs(idle_seconds));
        let ticks = cpu_ticks(pid).ok_or("cannot read kproxy's CPU time")?;
        let took = from.elapsed();
        let cpu = (ticks - before) as f64 / ticks_per_s / took.as_secs_f64() * 100.0;
        (took, cpu, rss_kib(pid).unwrap_or(0))
    };

    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let total = (u64::from(rate) * seconds) as usize;
    let mut written: Vec<(Ipv4Addr, Instant)> = Vec::with_capacity(total);
    let mut samples = Vec::new();
    let t0 = Instant::now();
    let mut next_sample = 1;
    let mut last_ticks = cpu_ticks(pid).unwrap_or(0);
    for k in 0..total {
        let due = t0 + period * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let i = k % n;
        let addr = fresh(k);
        let slot = (k / n) % e.max(1);
        current[i][slot] = addr;
        api.apply(slice_with(i, &current[i]));
        written.push((addr, Instant::now()));
        if t0.elapsed().as_secs() >= next_sample {
            let ticks = cpu_ticks(pid).unwrap_or(last_ticks);
            let cpu = (ticks - last_ticks) as f64 / ticks_per_s * 100.0;
            last_ticks = ticks;
            samples.push((next_sample, rss_kib(pid).unwrap_or(0), cpu));
            next_sample += 1;
        }
    }
    // What is still on its way gets a few sync periods.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let seen = seen.lock().unwrap();
        if written.iter().all(|(a, _)| seen.contains_key(a)) {
            break;
        }
        drop(seen);
        std::thread::sleep(Duration::from_millis(50));
    }
    let latencies_seen = seen.lock().unwrap().clone();
    let mut latencies = Vec::new();
    let mut missing = 0;
    for (addr, at) in &written {
        match latencies_seen.get(addr) {
            Some(t) => latencies.push((at.duration_since(t0), t.saturating_duration_since(*at))),
            None => missing += 1,
        }
    }
    let kernel = kernel_endpoints(&ns);
    let mismatched = (0..n)
        .filter(|&i| {
            let vip = service(i)["spec"]["clusterIP"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let want: BTreeSet<String> = current[i].iter().map(ToString::to_string).collect();
            kernel.get(&vip) != Some(&want)
        })
        .count();
    drop(monitor);
    drop(kproxy);
    let _ = reader.join();
    drop(api);
    Ok(ChurnRun {
        services: n,
        endpoints: e,
        rate,
        seconds,
        start_to_synced: synced,
        changes: written.len(),
        latencies,
        missing,
        mismatched,
        samples,
        idle,
    })
}

/// The `q`-quantile of `sorted`.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// The run as Markdown: the totals, then per-window latency percentiles, RSS and CPU.
pub(crate) fn markdown(r: &ChurnRun, window: u64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let mut all: Vec<Duration> = r.latencies.iter().map(|(_, l)| *l).collect();
    all.sort();
    let _ = writeln!(
        o,
        "Churn: {} services x {} endpoints from the fake API server, nftables mode (default --min-sync-period 1s), \
         one endpoint change every {:.0} ms for {} s. Latency: write to the API server → the kernel committed the element (`nft monitor`).\n",
        r.services,
        r.endpoints,
        1000.0 / f64::from(r.rate.max(1)),
        r.seconds
    );
    let _ = writeln!(
        o,
        "| changes | programmed | missing | services wrong at the end | p50 ms | p90 ms | p99 ms | max ms | start→synced ms |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        o,
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        r.changes,
        r.latencies.len(),
        r.missing,
        r.mismatched,
        ms(quantile(&all, 0.5)),
        ms(quantile(&all, 0.9)),
        ms(quantile(&all, 0.99)),
        ms(all.last().copied().unwrap_or_default()),
        ms(r.start_to_synced),
    );
    let _ = writeln!(
        o,
        "\nIdle, before the churn (synced, nothing changing): {:.0} s, CPU {:.2}% of one core, RSS {:.1} MiB at the end.",
        r.idle.0.as_secs_f64(),
        r.idle.1,
        r.idle.2 as f64 / 1024.0,
    );
    let _ = writeln!(
        o,
        "\n| window (s) | changes | p50 ms | p99 ms | RSS MiB at end | CPU % of a core |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for (from, to, w) in windows(r, window) {
        let in_window: Vec<&(u64, u64, f64)> = r
            .samples
            .iter()
            .filter(|(s, _, _)| *s > from && *s <= to)
            .collect();
        let rss = in_window.last().map_or(0, |s| s.1);
        let cpu = if in_window.is_empty() {
            0.0
        } else {
            in_window.iter().map(|s| s.2).sum::<f64>() / in_window.len() as f64
        };
        let _ = writeln!(
            o,
            "| {from}-{to} | {} | {} | {} | {:.1} | {cpu:.1} |",
            w.len(),
            ms(quantile(&w, 0.5)),
            ms(quantile(&w, 0.99)),
            rss as f64 / 1024.0,
        );
    }
    o
}

/// The run cut into `window`-second slices: (from, to, the latencies of the changes written
/// in it, sorted).
fn windows(r: &ChurnRun, window: u64) -> impl Iterator<Item = (u64, u64, Vec<Duration>)> + '_ {
    (0..r.seconds)
        .step_by(window.max(1) as usize)
        .map(move |from| {
            let to = from + window;
            let mut w: Vec<Duration> = r
                .latencies
                .iter()
                .filter(|(at, _)| (from..to).contains(&at.as_secs()))
                .map(|(_, l)| *l)
                .collect();
            w.sort();
            (from, to, w)
        })
}

/// The latency percentiles of the changes written in each `window`-second slice of the run:
/// (slice start in seconds, p50 ms, p99 ms), slices without changes left out.
fn latency_by_window(r: &ChurnRun, window: u64) -> Vec<(f64, f64, f64)> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    windows(r, window)
        .filter(|(_, _, w)| !w.is_empty())
        .map(|(from, _, w)| (from as f64, ms(quantile(&w, 0.5)), ms(quantile(&w, 0.99))))
        .collect()
}

/// `churn.svg`: the latency percentiles over the run (p50 and p99 per `window` seconds, with
/// the minimum sync period as a grey line) and kproxy's RSS and CPU, sampled every second.
pub(crate) fn plot(r: &ChurnRun, window: u64, path: &std::path::Path) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1500, 560)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let title = format!(
        "kproxy under churn: {} services x {} endpoints, {} endpoint changes/s for {} s (nftables, from the API)",
        r.services, r.endpoints, r.rate, r.seconds
    );
    let root = root.titled(&title, ("sans-serif", 18)).unwrap();
    let (left, right) = root.split_horizontally(750);
    let end = r.seconds.max(1) as f64;

    let lat = latency_by_window(r, window);
    let max_ms = lat.iter().map(|l| l.2).fold(1_200.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!("write → kernel commit, per {window} s (ms)"),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..max_ms)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds into the churn")
        .y_desc("ms")
        .draw()
        .unwrap();
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1000.0), (end, 1000.0)],
            BLACK.mix(0.3).stroke_width(1),
        ))
        .unwrap()
        .label("min-sync-period (1 s)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.3)));
    for (name, color, pick) in [("p50", BLUE, 1usize), ("p99", RED, 2usize)] {
        let points: Vec<(f64, f64)> = lat
            .iter()
            .map(|l| (l.0, if pick == 1 { l.1 } else { l.2 }))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .unwrap()
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    crate::report::legend(&mut chart, SeriesLabelPosition::LowerRight, 12);

    let rss: Vec<(f64, f64)> = r
        .samples
        .iter()
        .map(|(t, kib, _)| (*t as f64, *kib as f64 / 1024.0))
        .collect();
    let cpu: Vec<(f64, f64)> = r.samples.iter().map(|(t, _, c)| (*t as f64, *c)).collect();
    let max_rss = rss.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let max_cpu = cpu.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "kproxy's RSS (MiB) and CPU (% of a core), every second",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..max_rss)
        .unwrap()
        .set_secondary_coord(0.0..end, 0.0..max_cpu);
    chart
        .configure_mesh()
        .x_desc("seconds into the churn")
        .y_desc("RSS MiB")
        .draw()
        .unwrap();
    chart
        .configure_secondary_axes()
        .y_desc("CPU %")
        .draw()
        .unwrap();
    chart
        .draw_series(LineSeries::new(rss, BLUE.stroke_width(2)))
        .unwrap()
        .label("RSS")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(cpu, RED.mix(0.6).stroke_width(1)))
        .unwrap()
        .label("CPU")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.6)));
    crate::report::legend(&mut *chart, SeriesLabelPosition::LowerRight, 12);
    root.present().unwrap();
}
