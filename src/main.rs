//! The `kproxy` binary: parse, configure logging, run. Every decision lives in the library.

use std::io::Write as _;
use std::process::ExitCode;

use kproxy::cli::{Args, Command, LogFormat, OutputFormat};
use tracing_subscriber::EnvFilter;

#[cfg(not(feature = "dhat-heap"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--features dhat-heap`: every allocation is recorded, and the allocation sites live at the
/// heap's peak are written to `dhat-heap-PID.json` on exit (docs/memory.md reads it).
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

/// Writes a line to standard error, ignoring a reader that has gone (`kproxy ... 2>&1 | head`):
/// `eprintln!` would panic there, and a CLI piped into `head` or a pager must exit quietly.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Writes a line to standard output, ignoring a reader that has gone.
fn say_out(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn main() -> ExitCode {
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::builder()
        .file_name(format!("dhat-heap-{}.json", std::process::id()))
        .build();
    let args = Args::parse_go_style();
    if let Some(Command::Version) = args.command {
        say_out(&format!("kproxy {}", kproxy::version::VERSION));
        return ExitCode::SUCCESS;
    }
    let config = match kproxy::config::from_args(&args) {
        Ok(config) => config,
        Err(err) => {
            say!("kproxy: {err}");
            return ExitCode::from(2);
        }
    };
    // The file's `logging` section counts too, so logging starts once the configuration is read.
    init_logging(config.log_format, config.verbosity);
    if let Some(path) = &config.write_config_to {
        return match kproxy::config::write_effective(&config, path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "wrote the effective configuration");
                ExitCode::SUCCESS
            }
            Err(err) => {
                say!("kproxy: --write-config-to {}: {err}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Services { output }) = args.command {
        return services(&config, output);
    }
    if let Some(Command::Trace(trace)) = &args.command {
        return match kproxy::trace::run(&config, trace) {
            Ok(report) => {
                let text = kproxy::trace::render(&report, trace.output);
                let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
                ExitCode::from(report.exit_code())
            }
            Err(err) => {
                say!("kproxy trace: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_PLANE_WORKERS)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            say!("kproxy: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kproxy::run::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the context chain on one line, without a backtrace.
            say!("kproxy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Worker threads of the control plane's runtime: one, whatever the node's size.
///
/// What runs there is I/O bound and light: the API watches, the health, metrics and admin
/// servers. The heavy phases of a sync (build, render, apply) leave the worker through
/// `block_in_place`, so a long apply never holds up `/healthz`; the userspace data path has
/// runtimes of its own. Tokio's default, a worker per core, gave each thread its own allocator
/// pages for decoding the API's lists: measured at 10,000 services x 10 from the API
/// (nftables, 2 cores, two runs each, alternating), peak RSS 113.1–113.7 MiB with two workers
/// against 109.3–110.4 with one, the time to the first sync unchanged. On a 64-core node the
/// default would have meant 64 workers.
const CONTROL_PLANE_WORKERS: usize = 1;

/// `-v N` maps kube-proxy's klog levels onto tracing levels; `RUST_LOG` wins when set.
fn init_logging(format: LogFormat, verbosity: u32) {
    let level = match verbosity {
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},kube=warn,hyper=warn,tower=warn")));
    // Colour only on a terminal: logs in files and journals stay plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // A closed stderr (`2>&1 | head`) is no reason to complain on stderr (which would panic).
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `kproxy services`.
fn services(config: &kproxy::config::Config, output: OutputFormat) -> ExitCode {
    if !matches!(config.source, kproxy::config::SourceConfig::Manifests(_)) {
        // No --manifests: ask the daemon running on this node.
        let socket = config
            .admin_socket
            .clone()
            .unwrap_or_else(|| kproxy::admin::DEFAULT_SOCKET.into());
        let path = match output {
            OutputFormat::Table => "/services?output=table",
            OutputFormat::Json => "/services",
        };
        return match kproxy::admin::query(&socket, path) {
            Ok(text) => {
                let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
                ExitCode::SUCCESS
            }
            Err(err) => {
                say!("kproxy: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    match kproxy::services::desired(config) {
        Ok((state, skipped)) => {
            let text = match output {
                OutputFormat::Table => kproxy::services::to_table(&state, &skipped),
                OutputFormat::Json => {
                    format!("{:#}\n", kproxy::services::to_json(&state, &skipped))
                }
            };
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(err) => {
            say!("kproxy: {err:#}");
            ExitCode::from(2)
        }
    }
}
