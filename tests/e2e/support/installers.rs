//! The installer corpus (`tests/installers/`): reading its cases, laying a case's files out
//! under a temporary root, and running a case as the node's proxy. Shared by the e2e tests
//! (`tests/e2e/installers.rs`) and the IPVS lab guest (the ipvs cases need a kernel with IPVS).
//!
//! What the runner changes, and nothing else: the installer's file paths are mirrored under a
//! temporary directory (in the arguments and inside the files), `$(VAR)` references are expanded
//! as Kubernetes expands them in a container's arguments, and, to run the proxy for real, the
//! API server's address (each kubeconfig file, `--master`) becomes the fake API server's on a
//! node-local address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::fake_apiserver::FakeApiServer;
use super::http;
use super::kproxy::{KproxyProcess, wait_until};
use super::manifests::Port;
use super::netns::{Netns, veth};

/// One case of the corpus.
#[derive(Debug)]
pub(crate) struct Case {
    pub(crate) name: String,
    dir: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// Installer path → file name in the case's directory.
    files: BTreeMap<String, String>,
    /// Field path → upstream's effective value.
    pub(crate) expect: toml::Table,
}

pub(crate) fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/installers")
}

pub(crate) fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(corpus_dir()).expect("tests/installers") {
        let dir = entry.expect("entry").path();
        let file = dir.join("case.toml");
        if !file.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read case.toml");
        let t: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let run = t["run"].as_table().expect("[run]");
        let strings = |v: &toml::Value| -> BTreeMap<String, String> {
            v.as_table()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_string()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let source = t["source"].as_table().expect("[source]");
        for key in ["repo", "path", "commit"] {
            assert!(
                source.get(key).and_then(toml::Value::as_str).is_some(),
                "{}: [source] needs {key}",
                file.display()
            );
        }
        out.push(Case {
            name: dir
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned(),
            args: run["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(|a| a.as_str().expect("arg").to_string())
                .collect(),
            env: run.get("env").map(strings).unwrap_or_default(),
            files: run.get("files").map(strings).unwrap_or_default(),
            expect: t["expect"].as_table().expect("[expect]").clone(),
            dir,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(out.len() >= 12, "the corpus has {} cases", out.len());
    out
}

/// A case laid out under a temporary root.
pub(crate) struct Mapped {
    pub(crate) root: tempfile::TempDir,
    pub(crate) args: Vec<String>,
}

impl Mapped {
    /// `text` with every root-mapped path turned back into the installer's.
    fn unmap(&self, text: &str) -> String {
        text.replace(&self.root.path().display().to_string(), "")
    }
}

/// Writes the case's files under a fresh root, with installer paths mapped in the arguments and
/// inside the files; `kubeconfig`, when given, replaces every kubeconfig file's content.
pub(crate) fn map(case: &Case, kubeconfig: Option<&str>) -> Mapped {
    let root = tempfile::Builder::new()
        .prefix("kpx-installer-")
        .tempdir()
        .expect("root");
    let rootp = root.path().display().to_string();
    let remap = |text: &str| -> String {
        let mut out = text.to_string();
        for p in case.files.keys() {
            out = out.replace(p.as_str(), &format!("{rootp}{p}"));
        }
        out
    };
    for (installer_path, name) in &case.files {
        let text = std::fs::read_to_string(case.dir.join(name)).expect("case file");
        let text = match kubeconfig {
            Some(kc) if text.contains("kind: Config") || text.contains("clusters:") => {
                kc.to_string()
            }
            _ => remap(&text),
        };
        let dest = root.path().join(installer_path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("dirs");
        std::fs::write(&dest, text).expect("write case file");
    }
    let args = case
        .args
        .iter()
        .map(|a| {
            let mut a = remap(a);
            for (k, v) in &case.env {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect();
    Mapped { root, args }
}

/// The value at a dot path of a JSON value.
pub(crate) fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// Whether `actual` is upstream's `want` (a null list is an empty list; numbers as numbers).
pub(crate) fn same(want: &toml::Value, actual: Option<&Value>, mapped: &Mapped) -> bool {
    match (want, actual) {
        (toml::Value::String(w), Some(Value::String(a))) => *w == mapped.unmap(a),
        (toml::Value::Integer(w), Some(Value::Number(a))) => a.as_f64() == Some(*w as f64),
        (toml::Value::Float(w), Some(Value::Number(a))) => {
            a.as_f64().is_some_and(|a| (a - w).abs() < 1e-6)
        }
        (toml::Value::Boolean(w), Some(Value::Bool(a))) => w == a,
        (toml::Value::Array(w), Some(Value::Null) | None) => w.is_empty(),
        (toml::Value::Array(w), Some(Value::Array(a))) => {
            w.len() == a.len()
                && w.iter()
                    .zip(a)
                    .all(|(w, a)| w.as_str().is_some_and(|w| a.as_str() == Some(w)))
        }
        _ => false,
    }
}

impl Case {
    /// The expected mode (`mode`).
    pub(crate) fn mode(&self) -> Option<&str> {
        self.expect.get("mode").and_then(toml::Value::as_str)
    }
}

/// The node's address on its uplink, where the fake API server listens.
const NODE: &str = "10.0.1.1";
const HTTP: Port = Port::tcp("http", 80, 8080);

/// Listening TCP sockets in `ns`: their local addresses, from the namespace's own
/// `/proc/thread-self/net/tcp{,6}` (no `ss` needed, so the IPVS lab guest reads them too).
fn listening(ns: &Netns) -> Vec<SocketAddr> {
    ns.in_ns(|| {
        let mut out = Vec::new();
        for (file, v6) in [("tcp", false), ("tcp6", true)] {
            let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                .unwrap_or_default();
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // State 0A is LISTEN.
                if fields.get(3) != Some(&"0A") {
                    continue;
                }
                if let Some(addr) = fields.get(1).and_then(|a| proc_addr(a, v6)) {
                    out.push(addr);
                }
            }
        }
        out
    })
}

/// `0100007F:2818` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host byte order.
fn proc_addr(text: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    // The kernel prints each word as a host-order integer: on little-endian machines the bytes
    // of a word come out reversed, which `from_be` on the parsed value undoes.
    let ip: std::net::IpAddr = if v6 {
        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?).into()
    } else {
        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?).into()
    };
    Some(SocketAddr::new(ip, port))
}

/// Where to connect to reach a listener bound to `addr` from inside the node.
fn reach(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(NODE.parse().expect("ip"), addr.port())
    } else {
        addr
    }
}

/// Whether a process here may lower its OOM score (CAP_SYS_RESOURCE), tried in a child.
fn can_lower_oom_score() -> bool {
    std::process::Command::new("sh")
        .args(["-c", "echo -1 > /proc/self/oom_score_adj"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `case` as the node's proxy against a fake API server on a node-local address: it must
/// sync, serve /healthz and /metrics on exactly the expected addresses (and the metrics
/// server's /proxyMode and /configz), and run with the expected OOM score. `Ok` is a one-line
/// summary; `Err` says what was wrong, with kproxy's log.
pub(crate) fn run_live(case: &Case, hostname: &str) -> Result<String, String> {
    let node_ns = Netns::new("inst");
    let peer = Netns::new("peer");
    let _link = veth(&node_ns, &[&format!("{NODE}/24")], &peer, &["10.0.1.2/24"]);
    let listener = node_ns
        .in_ns(|| std::net::TcpListener::bind((NODE, 0)))
        .expect("bind the fake API server on the node's address");
    let api = FakeApiServer::start_on(listener);
    let name = match case
        .expect
        .get("hostnameOverride")
        .and_then(toml::Value::as_str)
    {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => hostname.to_string(),
    };
    api.apply(super::objects::node(&name, &[NODE], None));
    api.apply(super::objects::Svc::new("web", &["10.96.0.10"], &[HTTP]).json());
    api.apply(super::objects::endpoint_slice(
        "web",
        "web-v4",
        &[super::objects::Ep::ready("10.244.1.10")],
        &[HTTP],
    ));
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: proxy\n\
         current-context: fake\nusers:\n- name: proxy\n  user:\n    token: test\n",
        api.url()
    );
    let mapped = map(case, Some(&kubeconfig));
    let args: Vec<String> = mapped
        .args
        .iter()
        .map(|a| match a.strip_prefix("--master=") {
            Some(_) => format!("--master={}", api.url()),
            None => a.clone(),
        })
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut kproxy = KproxyProcess::start(&node_ns, &refs);

    let want = |field: &str| -> SocketAddr {
        let text = case.expect[field].as_str().expect("address");
        text.parse()
            .unwrap_or_else(|_| panic!("{}: {field} {text}", case.name))
    };
    let (healthz, metrics) = (want("healthzBindAddress"), want("metricsBindAddress"));
    let synced = wait_until(Duration::from_secs(30), || {
        http::get(&node_ns, reach(metrics), "/metrics").is_some_and(|(code, body)| {
            code == 200
                && body.lines().any(|l| {
                    l.starts_with("kubeproxy_sync_proxy_rules_last_timestamp_seconds ")
                        && !l.ends_with(" 0.0")
                })
        })
    });
    let mut wrong = Vec::new();
    if !synced {
        wrong.push(format!("no synced /metrics on {metrics}"));
    }
    match http::get(&node_ns, reach(healthz), "/healthz") {
        Some((200, _)) => {}
        other => wrong.push(format!("/healthz on {healthz}: {other:?}")),
    }
    // Runbooks ask the metrics server which mode a node runs, and its configuration.
    let mode = case.mode();
    match http::get(&node_ns, reach(metrics), "/proxyMode") {
        Some((200, body)) if mode.is_some_and(|m| body.ends_with(m)) => {}
        other => wrong.push(format!("/proxyMode: {other:?}, want {mode:?}")),
    }
    match http::get(&node_ns, reach(metrics), "/configz") {
        Some((200, body)) if body.contains("\"kubeproxy.config.k8s.io\":{") => {}
        other => wrong.push(format!("/configz: {other:?}")),
    }
    // Exactly the expected listeners on those ports: a bare 127.0.0.1 must not be served on
    // every address.
    let bound = listening(&node_ns);
    for (what, addr) in [("healthz", healthz), ("metrics", metrics)] {
        let on_port: Vec<&SocketAddr> = bound.iter().filter(|l| l.port() == addr.port()).collect();
        if on_port != [&addr] {
            wrong.push(format!("{what} listens on {on_port:?}, want {addr}"));
        }
    }
    if let Some(oom) = case
        .expect
        .get("oomScoreAdj")
        .and_then(toml::Value::as_integer)
    {
        let actual = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", kproxy.pid()))
            .unwrap_or_default();
        // Lowering a score needs CAP_SYS_RESOURCE, which a privileged pod has and some
        // sandboxes do not: there kproxy must have tried the expected value and said why it
        // could not.
        let refused_here = oom < 0
            && !can_lower_oom_score()
            && kproxy.stderr().contains(&format!(
                "oom_score_adj (--oom-score-adj); continuing value={oom}"
            ));
        if actual.trim() != oom.to_string() && !refused_here {
            wrong.push(format!("oom_score_adj {}, want {oom}", actual.trim()));
        }
    }
    if kproxy.try_wait().is_some() {
        wrong.push("kproxy exited".into());
    }
    if wrong.is_empty() {
        Ok(format!(
            "{:<24} healthz {healthz}, metrics {metrics}: ok",
            case.name
        ))
    } else {
        Err(format!(
            "{}: {}\nstderr:\n{}",
            case.name,
            wrong.join("; "),
            kproxy.stderr()
        ))
    }
}

/// This machine's host name as kubelet registers it (the node name when none is given).
pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .expect("hostname")
        .to_string_lossy()
        .to_lowercase()
}
