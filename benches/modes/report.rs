//! The results: the machine and versions, Markdown tables (stdout and `results.md`), the raw
//! figures (`results.json`) and the plot (`modes.svg`: sync time and connect latency versus N
//! per subject).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::binary::BinaryRun;
use crate::{Phases, Row};

/// Where the run happened: recorded in every output, so figures are never read without it.
pub(crate) struct Machine {
    pub(crate) fields: BTreeMap<&'static str, String>,
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text).trim().to_string()
        })
        .unwrap_or_else(|| "unavailable".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Machine {
    /// A collected field, or `default` when it was not collected.
    fn field<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.fields.get(key).map_or(default, String::as_str)
    }

    /// "N CPUs, DATE": what every plot's title says of the run.
    fn plot_stamp(&self) -> String {
        format!(
            "{} CPUs, {}",
            self.field("nproc", "?"),
            self.field("date", "")
        )
    }

    pub(crate) fn collect(quick: bool) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
            })
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| format!("{:.1} GiB", kb as f64 / 1_048_576.0))
            .unwrap_or_default();
        let root = env!("CARGO_MANIFEST_DIR");
        let commit = output("git", &["-C", root, "rev-parse", "--short=12", "HEAD"]);
        let dirty = !output(
            "git",
            &["-C", root, "status", "--porcelain", "--untracked-files=no"],
        )
        .is_empty();
        let mut fields = BTreeMap::new();
        fields.insert("profile", if quick { "quick" } else { "full" }.to_string());
        fields.insert(
            "build",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_string(),
        );
        fields.insert("date", output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
        fields.insert("uname", output("uname", &["-srvm"]));
        fields.insert("cpu", cpu);
        fields.insert("nproc", output("nproc", &[]));
        fields.insert("memory", mem);
        fields.insert("iptables", output("iptables", &["--version"]));
        fields.insert("iptables-legacy", output("iptables-legacy", &["--version"]));
        fields.insert("nft", output("nft", &["--version"]));
        fields.insert("iproute2", output("ip", &["-V"]));
        fields.insert("rustc", output("rustc", &["--version"]));
        fields.insert("kproxy", env!("CARGO_PKG_VERSION").to_string());
        fields.insert(
            "git commit",
            format!("{commit}{}", if dirty { " (modified)" } else { "" }),
        );
        fields.insert("load average at start", loadavg());
        Machine { fields }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn opt(d: Option<Duration>) -> String {
    d.map(ms).unwrap_or_else(|| "–".into())
}

fn phases(p: Option<Phases>) -> String {
    p.map(|p| format!("{} / {} / {}", ms(p.render), ms(p.plan), ms(p.apply)))
        .unwrap_or_else(|| "–".into())
}

fn pct(v: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.0}%", v / base * 100.0)
    } else {
        "–".into()
    }
}

/// The Markdown report.
fn markdown(rows: &[Row], machine: &Machine, took: Duration, args: &[String]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "## kproxy mode benchmark\n");
    for (k, v) in &machine.fields {
        let _ = writeln!(o, "- {k}: {v}");
    }
    let _ = writeln!(o, "- load average at end: {}", loadavg());
    let _ = writeln!(o, "- run took: {:.0} s", took.as_secs_f64());
    let _ = writeln!(
        o,
        "- arguments: `{}`",
        args.get(1..).unwrap_or_default().join(" ")
    );
    let _ = writeln!(
        o,
        "\nControl plane. Library: the mode crate's render + plan + apply against the kernel in a fresh namespace (ms). \
         Binary: the `kproxy` binary with `--once` on generated manifests, exec to exit (ms), the first sync as it logs it (ms), and the peak RSS (MiB) of kproxy itself and of the largest of kproxy and the tools it ran (iptables-restore, nft). \
         Every state has N TCP service ports plus one UDP port on the first service (the data-plane probe).\n"
    );
    let _ = writeln!(
        o,
        "| subject | N | E | full sync | 1 endpoint | +1 service | -1 service | objects | binary start→synced | binary sync | peak RSS MiB kproxy / incl. tools |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        if let Some(why) = &r.skipped {
            let _ = writeln!(
                o,
                "| {} | {} | {} | skipped: {why} | | | | | | | |",
                r.subject, r.services, r.endpoints
            );
            continue;
        }
        let (wall, sync, rss) = binary_cells(&r.binary);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {wall} | {sync} | {rss} |",
            r.subject,
            r.services,
            r.endpoints,
            ms(r.full_sync),
            opt(r.endpoint_change),
            opt(r.service_add),
            opt(r.service_delete),
            r.objects,
        );
    }
    let _ = writeln!(
        o,
        "\nThe binary from the API source: the same objects served by the fake API server (paged lists, as kproxy asks for them; the server runs in the benchmark process inside kproxy's namespace, so its memory is not kproxy's).\n"
    );
    let _ = writeln!(
        o,
        "| subject | N | E | start→synced (API) | sync | peak RSS MiB kproxy / incl. tools | start→synced (manifests) | peak RSS MiB (manifests) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| r.binary_api.is_some()) {
        let (wall, sync, rss) = binary_cells(&r.binary_api);
        let (m_wall, _, m_rss) = binary_cells(&r.binary);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {wall} | {sync} | {rss} | {m_wall} | {m_rss} |",
            r.subject, r.services, r.endpoints,
        );
    }
    let _ = writeln!(
        o,
        "\nData plane: client → node → endpoint namespaces. Connect: TCP connect until the endpoint's first byte arrived, p50/p99 µs, \
         to the first and the last service's ClusterIP, and direct: straight to an endpoint through an identical set of namespaces with no rule and no proxy, in alternating rounds. \
         Bulk: one TCP stream through the first ClusterIP, Gbit/s (% of direct). UDP: round trips per second, 4 clients (% of direct).\n"
    );
    let _ = writeln!(
        o,
        "| subject | N | E | connect first | connect last | direct | bulk Gbit/s | direct bulk | UDP rt/s | direct UDP |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let Some(d) = &r.dataplane else { continue };
        let gbit = |v: f64| format!("{:.2}", v * 8.0 / 1e9);
        let _ = writeln!(
            o,
            "| {} | {} | {} | {}/{} | {}/{} | {}/{} | {} ({}) | {} | {:.0} ({}) | {:.0} |",
            r.subject,
            r.services,
            r.endpoints,
            us(d.first.0),
            us(d.first.1),
            us(d.last.0),
            us(d.last.1),
            us(d.direct.0),
            us(d.direct.1),
            gbit(d.bulk),
            if d.failed_streams > 0 {
                format!("{} streams failed", d.failed_streams)
            } else {
                pct(d.bulk, d.bulk_direct)
            },
            gbit(d.bulk_direct),
            d.udp,
            pct(d.udp, d.udp_direct),
            d.udp_direct,
        );
    }
    let _ = writeln!(
        o,
        "\nWhere kproxy's library time goes (render / plan / apply ms):\n"
    );
    let _ = writeln!(
        o,
        "| subject | N | E | full sync | 1 endpoint | binary first sync (build / render / plan / apply) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| r.full_phases.is_some()) {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            r.subject,
            r.services,
            r.endpoints,
            phases(r.full_phases),
            phases(r.endpoint_phases),
            match &r.binary {
                Some(Ok(b)) => b.phases.map(ms).join(" / "),
                _ => "–".into(),
            }
        );
    }
    o
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Start→synced, sync and peak RSS cells of a binary run.
fn binary_cells(run: &Option<Result<BinaryRun, String>>) -> (String, String, String) {
    match run {
        None => ("–".to_string(), "–".to_string(), "–".to_string()),
        Some(Ok(b)) => (
            ms(b.wall),
            ms(b.sync),
            format!(
                "{:.1} / {:.1}",
                b.own_rss_kib as f64 / 1024.0,
                b.max_rss_kib as f64 / 1024.0
            ),
        ),
        Some(Err(e)) => (format!("failed: {e}"), "–".into(), "–".into()),
    }
}

fn binary_json(run: &Option<Result<BinaryRun, String>>) -> Value {
    match run {
        None => Value::Null,
        Some(Ok(b)) => json!({
            "start_to_synced_s": secs(b.wall), "sync_s": secs(b.sync),
            "own_max_rss_kib": b.own_rss_kib, "max_rss_incl_tools_kib": b.max_rss_kib,
            "objects_added": b.added,
            "sync_phases": {
                "build_s": secs(b.phases[0]), "render_s": secs(b.phases[1]),
                "plan_s": secs(b.phases[2]), "apply_s": secs(b.phases[3]),
            },
        }),
        Some(Err(e)) => json!({ "error": e }),
    }
}

fn row_json(r: &Row) -> Value {
    let dataplane = r.dataplane.map_or(Value::Null, |d| {
        json!({
            "connect_first_p50_s": secs(d.first.0), "connect_first_p99_s": secs(d.first.1),
            "connect_last_p50_s": secs(d.last.0), "connect_last_p99_s": secs(d.last.1),
            "direct_p50_s": secs(d.direct.0), "direct_p99_s": secs(d.direct.1),
            "bulk_bytes_per_s": d.bulk, "bulk_direct_bytes_per_s": d.bulk_direct,
            "bulk_failed_streams": d.failed_streams,
            "udp_round_trips_per_s": d.udp, "udp_direct_round_trips_per_s": d.udp_direct,
        })
    });
    let ph = |p: Option<Phases>| {
        p.map_or(Value::Null, |p| {
            json!({"render_s": secs(p.render), "plan_s": secs(p.plan), "apply_s": secs(p.apply)})
        })
    };
    json!({
        "subject": r.subject, "services": r.services, "endpoints": r.endpoints,
        "skipped": r.skipped,
        "full_sync_s": r.skipped.is_none().then(|| secs(r.full_sync)),
        "endpoint_change_s": r.endpoint_change.map(secs),
        "service_add_s": r.service_add.map(secs),
        "service_delete_s": r.service_delete.map(secs),
        "objects": r.skipped.is_none().then_some(r.objects),
        "full_sync_phases": ph(r.full_phases),
        "endpoint_change_phases": ph(r.endpoint_phases),
        "binary": binary_json(&r.binary),
        "binary_api": binary_json(&r.binary_api),
        "dataplane": dataplane,
    })
}

/// `--out DIR`, else `$CARGO_TARGET_DIR/kproxy-bench`, else `target/kproxy-bench`.
pub(crate) fn out_dir(args: &[String]) -> PathBuf {
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
    {
        return PathBuf::from(dir);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("kproxy-bench")
}

pub(crate) fn report(rows: &[Row], machine: &Machine, took: Duration, args: &[String]) {
    let text = markdown(rows, machine, took, args);
    print!("{text}");
    let dir = out_dir(args);
    std::fs::create_dir_all(&dir).unwrap();
    let mut meta: serde_json::Map<String, Value> = machine
        .fields
        .iter()
        .map(|(k, v)| ((*k).to_string(), Value::String(v.clone())))
        .collect();
    meta.insert("load average at end".into(), Value::String(loadavg()));
    meta.insert("run_s".into(), json!(took.as_secs_f64()));
    let doc = json!({ "machine": meta, "rows": rows.iter().map(row_json).collect::<Vec<_>>() });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("results.md"), &text).unwrap();
    plot(rows, machine, &dir.join("modes.svg"));
    plot_memory(rows, machine, &dir.join("memory.svg"));
    println!(
        "\nwrote results.json, results.md, modes.svg and memory.svg in {}",
        dir.display()
    );
}

/// One color per subject, the same in both panels: a hue per kernel mechanism, strong for
/// kproxy and pale for the upstream layout on the same mechanism.
/// Draws a chart's legend as every plot of this benchmark does: framed, on a light background.
pub(crate) fn legend<'a, DB, CT>(
    chart: &mut plotters::chart::ChartContext<'a, DB, CT>,
    position: plotters::chart::SeriesLabelPosition,
    font_size: u32,
) where
    DB: plotters::prelude::DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    use plotters::style::Color as _;
    use plotters::style::colors::{BLACK, WHITE};
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", font_size))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .unwrap();
}

fn color(subject: &str) -> plotters::style::RGBAColor {
    use plotters::style::Color as _;
    use plotters::style::RGBColor;
    let c = match subject {
        "kproxy iptables (nft)" => RGBColor(200, 30, 30),
        "upstream-layout iptables (nft)" => RGBColor(245, 150, 120),
        "kproxy iptables (legacy)" => RGBColor(30, 80, 200),
        "upstream-layout iptables (legacy)" => RGBColor(130, 170, 240),
        "kproxy nftables" => RGBColor(20, 140, 50),
        "upstream-layout nftables" => RGBColor(140, 210, 130),
        "kproxy userspace" => RGBColor(140, 50, 170),
        "kproxy ipvs" => RGBColor(150, 100, 30),
        _ => RGBColor(100, 100, 100),
    };
    c.to_rgba()
}

/// 100, 1k, 20k.
fn count_label(x: &f64) -> String {
    if *x >= 1000.0 {
        format!("{}k", (*x / 1000.0).round())
    } else {
        format!("{x:.0}")
    }
}

/// Two panels: full sync time versus services (library, log-log; thin lines 2 endpoints per
/// service, thick 10), and the median connect latency to the last service versus services
/// (at the largest endpoint count measured), with the direct connection as the black line.
fn plot(rows: &[Row], machine: &Machine, path: &std::path::Path) {
    use plotters::prelude::*;
    let measured: Vec<&Row> = rows.iter().filter(|r| r.skipped.is_none()).collect();
    if measured.is_empty() {
        return;
    }
    let root = SVGBackend::new(path, (1500, 620)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let title = format!(
        "kproxy modes vs upstream layouts — {}, {}",
        machine.field("uname", ""),
        machine.plot_stamp()
    );
    let root = root.titled(&title, ("sans-serif", 18)).unwrap();
    let (left, right) = root.split_horizontally(800);
    let max_n = measured.iter().map(|r| r.services).max().unwrap_or(1) as f64;
    let min_n = measured.iter().map(|r| r.services).min().unwrap_or(1) as f64;
    let x_range = (min_n * 0.8)..(max_n * 1.25);

    // Left: full sync time.
    let max_t = measured
        .iter()
        .map(|r| secs(r.full_sync))
        .fold(0.001, f64::max);
    let min_t = measured
        .iter()
        .map(|r| secs(r.full_sync))
        .fold(f64::MAX, f64::min)
        .max(1e-4);
    let mut chart = ChartBuilder::on(&left)
        .caption("full sync time (library) vs services", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            x_range.clone().log_scale(),
            (min_t * 0.5..max_t * 2.0).log_scale(),
        )
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("services (log)")
        .x_labels(6)
        .x_label_formatter(&count_label)
        .y_desc("seconds (log)")
        .draw()
        .unwrap();
    let mut series: BTreeMap<(String, usize), Vec<(f64, f64)>> = BTreeMap::new();
    for r in &measured {
        series
            .entry((r.subject.clone(), r.endpoints))
            .or_default()
            .push((r.services as f64, secs(r.full_sync)));
    }
    let max_e = measured.iter().map(|r| r.endpoints).max().unwrap_or(1);
    for ((subject, e), points) in series {
        let c = color(&subject);
        let width = if e == max_e && e != 2 { 3 } else { 1 };
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(width)))
            .unwrap()
            .label(format!("{subject}, {e} eps"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
            });
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .unwrap();
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 11);

    // Right: connect latency to the last service.
    let dp: Vec<&&Row> = measured
        .iter()
        .filter(|r| r.dataplane.is_some() && r.endpoints == max_e)
        .collect();
    if dp.is_empty() {
        root.present().unwrap();
        return;
    }
    let lat = |d: Duration| d.as_secs_f64() * 1e6;
    let max_l = dp
        .iter()
        .filter_map(|r| r.dataplane.map(|d| lat(d.last.0).max(lat(d.direct.0))))
        .fold(1.0, f64::max);
    let dmin = dp.iter().map(|r| r.services).min().unwrap_or(1) as f64;
    let dmax = dp.iter().map(|r| r.services).max().unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!("TCP connect p50 to the last service, {max_e} endpoints (µs)"),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(((dmin * 0.8)..(dmax * 1.25)).log_scale(), 0.0..max_l * 1.2)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("services (log)")
        .x_labels(6)
        .x_label_formatter(&count_label)
        .y_desc("µs")
        .draw()
        .unwrap();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut direct: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for r in &dp {
        let d = r.dataplane.unwrap();
        series
            .entry(r.subject.clone())
            .or_default()
            .push((r.services as f64, lat(d.last.0)));
        direct.entry(r.services).or_default().push(lat(d.direct.0));
    }
    for (subject, points) in series {
        let c = color(&subject);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .unwrap()
            .label(subject)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .unwrap();
    }
    // The direct connects of every row at a size: their median.
    let direct: Vec<(f64, f64)> = direct
        .into_iter()
        .map(|(n, mut v)| {
            v.sort_by(f64::total_cmp);
            (n as f64, v[v.len() / 2])
        })
        .collect();
    chart
        .draw_series(LineSeries::new(direct, BLACK.stroke_width(3)))
        .unwrap()
        .label("direct (no proxy)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(3)));
    legend(&mut chart, SeriesLabelPosition::LowerRight, 11);
    root.present().unwrap();
}

/// kproxy's own peak resident set (MiB), if the run measured it.
fn own_mib(run: &Option<Result<BinaryRun, String>>) -> Option<f64> {
    let run = run.as_ref()?.as_ref().ok()?;
    (run.own_rss_kib > 0).then(|| run.own_rss_kib as f64 / 1024.0)
}

/// `memory.svg`: kproxy's own peak RSS per mode and size, from manifests and from the API
/// server side by side (a bar each), with its value written at its end: the memory a node pays
/// for each mode.
fn plot_memory(rows: &[Row], machine: &Machine, path: &std::path::Path) {
    use plotters::prelude::*;
    // (label, MiB, from the API?) in row order; a row's two sources next to each other.
    let mut bars: Vec<(String, f64, bool)> = Vec::new();
    for r in rows.iter().filter(|r| r.skipped.is_none()) {
        let name = format!(
            "{}, {} x {}",
            r.subject,
            count_label(&(r.services as f64)),
            r.endpoints
        );
        if let Some(m) = own_mib(&r.binary) {
            bars.push((format!("{name}, manifests"), m, false));
        }
        if let Some(m) = own_mib(&r.binary_api) {
            bars.push((format!("{name}, API"), m, true));
        }
    }
    if bars.is_empty() {
        return;
    }
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let height = 110 + 28 * bars.len() as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let title = format!(
        "kproxy's own peak RSS (`kproxy --once`, VmHWM) — {}",
        machine.plot_stamp()
    );
    let root = root.titled(&title, ("sans-serif", 18)).unwrap();
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max * 1.2, (0..bars.len()).into_segmented())
        .unwrap();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("MiB")
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .unwrap();
    for (i, (_, mib, api)) in bars.iter().enumerate() {
        let c = if *api {
            RGBColor(230, 120, 30)
        } else {
            RGBColor(40, 100, 190)
        };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*mib, SegmentValue::Exact(i + 1)),
            ],
            c.filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        chart.draw_series(std::iter::once(bar)).unwrap();
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{mib:.1}"),
                (*mib + max * 0.01, SegmentValue::CenterOf(i)),
                ("sans-serif", 13),
            )))
            .unwrap();
    }
    root.present().unwrap();
}
