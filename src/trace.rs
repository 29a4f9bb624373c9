//! `kproxy trace`: what happens to one packet, and why, over the selected mode's objects.
//!
//! Without `--live` the objects are the mode's rendering of the desired state (from
//! `--manifests` or one list of the API, with the daemon's own builder): no root needed,
//! nothing touched. With
//! `--live` they are read back from the kernel of the network namespace kproxy runs in, and
//! the desired state's answer is shown next to the live one when they disagree.
//!
//! Exit status: 0 forwarded (or not a service: the packet is routed normally), 3 dropped or
//! rejected, 1 when the live state cannot be read or interpreted, 2 for bad flags.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use kproxy_contract::{
    IpFamily, LocalMatch, LocalTraffic, MAX_INTERFACE_NAME, ModeName, Protocol, ProxyState,
    check_interface_name,
};
use kproxy_tracer::{Env, Origin, Packet, Trace, Traceable, Verdict};
use serde_json::json;

use crate::cli::{OriginArg, TraceArgs, TraceOutput};
use crate::config::{Config, SourceConfig};
use crate::modes::{ModeSpec, WithMode};
use crate::source::{Change, Update};

/// What the command found: the trace it reports and the desired state's answer when that
/// differs from a live one.
#[derive(Debug)]
pub struct Report {
    /// The mode traced.
    pub mode: ModeName,
    /// The packet.
    pub packet: Packet,
    /// `desired` or `live`.
    pub source: &'static str,
    /// The trace reported.
    pub trace: Trace,
    /// With `--live`: the desired state's trace, when its verdict disagrees with the live one.
    pub desired_disagrees: Option<(Trace, String)>,
}

impl Report {
    /// The process exit status.
    pub fn exit_code(&self) -> u8 {
        match &self.trace.verdict {
            Verdict::Forward { .. } | Verdict::NotService => 0,
            Verdict::Drop { .. } | Verdict::Reject { .. } => 3,
            Verdict::Unknown { .. } => 1,
        }
    }
}

/// `IP`, `IP:PORT`, `[IPv6]:PORT`.
fn parse_endpoint(s: &str, need_port: bool) -> anyhow::Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        if need_port {
            bail!("{s:?} has no port (IP:PORT, [IPv6]:PORT)");
        }
        return Ok((ip, None));
    }
    bail!("{s:?} is not IP[:PORT] ([IPv6]:PORT for IPv6)")
}

/// `kproxy trace --in-interface`, the packet's ingress interface: what the bridge and
/// interface-prefix local-traffic detectors look at. (`TraceArgs` flattens it.)
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct IngressArgs {
    /// The interface the packet arrives on (what `-i` / `iifname` see). Default: with --from
    /// pod and a bridge or interface-prefix --detect-local-mode, the bridge or the prefix
    /// followed by "0" (a pod's interface); otherwise none. Not with --from node: the node's
    /// own packets arrive on no interface.
    #[arg(long, value_name = "NAME")]
    pub in_interface: Option<String>,
}

/// The packet the flags describe. `--from` defaults from the source address and the ingress
/// interface: `node` for a local source; `pod` when the local-traffic detector says so (its
/// CIDR holds the source, or its interface matches `--in-interface`) or, under an interface
/// detector without `--in-interface`, when the source is in `cluster_cidrs` (`--cluster-cidr`);
/// else `external`.
pub fn packet(
    args: &TraceArgs,
    ingress: &IngressArgs,
    cluster_cidrs: &[IpNet],
    state: &ProxyState,
    env: &Env,
) -> anyhow::Result<Packet> {
    let (src, src_port) = parse_endpoint(&args.src, false).context("--src")?;
    let (dst, dst_port) = parse_endpoint(&args.dst, true).context("--dst")?;
    if IpFamily::of(&src) != IpFamily::of(&dst) {
        bail!("--src {src} and --dst {dst} are of different IP families");
    }
    let given = ingress.in_interface.as_deref();
    if let Some(name) = given {
        check_interface_name(name)
            .map_err(|why| anyhow::anyhow!("--in-interface {name:?}: {why}"))?;
    }
    let detector = state
        .node
        .local_traffic
        .matcher(IpFamily::of(&dst))
        .ok()
        .flatten();
    let origin = match args.from {
        Some(OriginArg::Pod) => Origin::Pod,
        Some(OriginArg::Node) => Origin::Node,
        Some(OriginArg::External) => Origin::External,
        None if env.is_local(&src) => Origin::Node,
        None if looks_like_pod(detector, &src, given, cluster_cidrs) => Origin::Pod,
        None => Origin::External,
    };
    let in_iface = match (given, origin) {
        (Some(_), Origin::Node) => bail!(
            "--in-interface with a packet from the node: the node's own packets arrive on no interface"
        ),
        (Some(name), _) => Some(name.to_string()),
        (None, Origin::Pod) => pod_interface(&state.node.local_traffic),
        (None, _) => None,
    };
    Ok(Packet {
        src,
        src_port,
        dst,
        dst_port: dst_port.unwrap_or_default(),
        proto: match args.proto.as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            other => bail!("--proto {other:?}: use tcp, udp or sctp"),
        },
        origin,
        in_iface,
    })
}

/// The `--from` guess for a source that is not local (see [`packet`]).
fn looks_like_pod(
    detector: Option<LocalMatch<'_>>,
    src: &IpAddr,
    in_interface: Option<&str>,
    cluster_cidrs: &[IpNet],
) -> bool {
    match (detector, in_interface) {
        (Some(d @ LocalMatch::SourceCidr(_)), _) | (Some(d), Some(_)) => {
            d.matches(src, in_interface.unwrap_or_default())
        }
        (Some(_), None) => cluster_cidrs.iter().any(|c| c.contains(src)),
        (None, _) => false,
    }
}

/// The interface a pod's packet arrives on when `--in-interface` does not say: the bridge, or
/// a name with the detector's prefix (the prefix and `0`, or the prefix alone when that would
/// exceed the kernel's limit); none for the other detectors, which do not look at it.
fn pod_interface(local: &LocalTraffic) -> Option<String> {
    match local {
        LocalTraffic::Interface(name) => Some(name.clone()),
        LocalTraffic::InterfacePrefix(prefix) if prefix.len() < MAX_INTERFACE_NAME => {
            Some(format!("{prefix}0"))
        }
        LocalTraffic::InterfacePrefix(prefix) => Some(prefix.clone()),
        LocalTraffic::None | LocalTraffic::SourceCidrs(_) => None,
    }
}

/// How long `kproxy trace` waits for the API's initial lists.
const API_LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The desired state, from `--manifests` or from one complete list of the API (the daemon's
/// own watcher, stopped once Services, EndpointSlices and the Node have been listed).
pub fn desired_state(config: &Config) -> anyhow::Result<ProxyState> {
    let SourceConfig::Api { kubeconfig, master } = &config.source else {
        return Ok(crate::services::desired(config)?.0);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let client = crate::source::client::build(
            kubeconfig.as_deref(),
            master.as_deref(),
            config.api_rate_limit,
        )
        .await?
        .client;
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let watch = tokio::spawn(crate::source::kube::run(client, config.hostname.clone(), tx));
        let mut cache = crate::cache::ClusterCache::default();
        let mut node_listed = false;
        let deadline = tokio::time::sleep(API_LIST_TIMEOUT);
        tokio::pin!(deadline);
        let listed = loop {
            tokio::select! {
                update = rx.recv() => match update {
                    Some(update) => {
                        node_listed |= matches!(update, Update::Node(Change::Reset(_)));
                        cache.apply(update);
                        if cache.is_synced() && node_listed {
                            break Ok(());
                        }
                    }
                    None => break Err(anyhow::anyhow!("the API watch stopped")),
                },
                () = &mut deadline => break Err(anyhow::anyhow!(
                    "no complete list of Services, EndpointSlices and the Node from the API within {API_LIST_TIMEOUT:?}"
                )),
            }
        };
        watch.abort();
        listed?;
        Ok(crate::services::build(config, &cache).0)
    })
}

/// One trace with whichever mode the configuration selects: in the mode's rendering of the
/// desired state, and with `--live` in what the kernel holds.
struct TraceJob<'a> {
    state: &'a ProxyState,
    env: &'a Env,
    packet: &'a Packet,
    live: bool,
}

impl WithMode for TraceJob<'_> {
    type Output = anyhow::Result<(Trace, Option<Trace>)>;

    fn with<M: Traceable>(self, mut mode: M) -> Self::Output {
        let name = mode.name();
        if self.live
            && let Some(why) = mode.live_unavailable()
        {
            bail!("--live is not available for the {name} mode: {why}");
        }
        // Desired: the node's own addresses stand for this machine's (it may be any machine);
        // live: this namespace's addresses, which the kernel objects were made from.
        let facts = if self.live {
            mode.observe()
        } else {
            mode.facts_for(&self.state.node.node_ips)
        };
        let rules = mode.render(self.state, &facts, &mut M::Memo::default());
        let desired = mode.trace(&rules, self.env, self.packet);
        if !self.live {
            return Ok((desired, None));
        }
        let mut live = mode
            .read_live()
            .with_context(|| format!("reading the live {name} state"))?;
        let unknown = mode.complete_live(&mut live, &rules);
        if unknown > 0 {
            tracing::warn!(
                unknown,
                "live rules that this configuration does not render; the trace stops at them"
            );
        }
        Ok((desired, Some(mode.trace(&live, self.env, self.packet))))
    }
}

/// Runs the trace (with `--in-interface` when given).
pub fn run(config: &Config, args: &TraceArgs) -> anyhow::Result<Report> {
    run_with(config, args, &args.ingress)
}

/// Runs the trace with `--in-interface`.
pub fn run_with(
    config: &Config,
    args: &TraceArgs,
    ingress: &IngressArgs,
) -> anyhow::Result<Report> {
    let state = desired_state(config)?;
    let desired_env = Env::from_state(&state);
    // Live: this namespace's own addresses are what `addrtype LOCAL` / `fib` see.
    let live_env = {
        let mut env = desired_env.clone();
        env.local_addresses.extend(crate::node::local_addresses());
        env
    };
    let env = if args.live { &live_env } else { &desired_env };
    let pkt = packet(args, ingress, &config.cluster_cidrs, &state, env)?;
    let job = TraceJob {
        state: &state,
        env,
        packet: &pkt,
        live: args.live,
    };
    let families = vec![pkt.family()];
    let (desired, live) = if args.live {
        // Read the node as the daemon does: the backend it detects, the sysctl it reads.
        let sysctls = crate::conntrack::sysctl::ProcSys::default();
        ModeSpec::from_config(config, &sysctls).with_mode(families, job)?
    } else {
        ModeSpec::offline(config).with_mode(families, job)?
    };
    Ok(match live {
        None => Report {
            mode: config.mode,
            packet: pkt,
            source: "desired",
            trace: desired,
            desired_disagrees: None,
        },
        Some(live) => {
            let disagreement = live.verdict.agrees_with(&desired.verdict).err();
            Report {
                mode: config.mode,
                packet: pkt,
                source: "live",
                trace: live,
                desired_disagrees: disagreement.map(|why| (desired, why)),
            }
        }
    })
}

/// The report for people: verdict first, then the path.
pub fn to_text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "packet:  {}", r.packet);
    let _ = writeln!(out, "mode:    {} ({} state)", r.mode, r.source);
    let _ = writeln!(out, "verdict: {}", r.trace.verdict);
    if let Some((desired, why)) = &r.desired_disagrees {
        let _ = writeln!(
            out,
            "\nDISAGREEMENT: the desired state says otherwise ({why}):\n  {}",
            desired.verdict.to_string().replace('\n', "\n  ")
        );
    }
    let _ = writeln!(out, "\npath:");
    for h in &r.trace.path {
        let _ = writeln!(out, "  {}{}: {}", "  ".repeat(h.depth), h.object, h.detail);
    }
    out
}

fn verdict_json(v: &Verdict) -> serde_json::Value {
    match v {
        Verdict::Forward {
            service,
            frontend,
            candidates,
            affinity,
        } => json!({
            "kind": v.kind(),
            "service": service,
            "frontend": frontend.map(|f| f.as_str()),
            "affinityTimeoutSeconds": affinity,
            "candidates": candidates.iter().map(|c| json!({
                "endpoint": c.endpoint.to_string(),
                "share": c.share,
                "weight": c.weight,
                "masquerade": c.masquerade,
            })).collect::<Vec<_>>(),
        }),
        Verdict::Reject { rule, reason } | Verdict::Drop { rule, reason } => {
            json!({ "kind": v.kind(), "rule": rule, "reason": reason })
        }
        Verdict::NotService => json!({ "kind": v.kind() }),
        Verdict::Unknown { reason } => json!({ "kind": v.kind(), "reason": reason }),
    }
}

/// The report for tools.
pub fn to_json(r: &Report) -> serde_json::Value {
    let p = &r.packet;
    json!({
        "packet": {
            "src": p.src.to_string(),
            "srcPort": p.src_port,
            "dst": p.dst.to_string(),
            "dstPort": p.dst_port,
            "protocol": p.proto.as_str(),
            "from": p.origin.as_str(),
            "inInterface": Some(p.ingress()).filter(|i| !i.is_empty()),
        },
        "mode": r.mode.as_str(),
        "state": r.source,
        "verdict": verdict_json(&r.trace.verdict),
        "exitStatus": r.exit_code(),
        "path": r.trace.path.iter().map(|h| json!({
            "depth": h.depth, "object": h.object, "detail": h.detail,
        })).collect::<Vec<_>>(),
        "desiredDisagrees": r.desired_disagrees.as_ref().map(|(t, why)| json!({
            "why": why,
            "verdict": verdict_json(&t.verdict),
        })),
    })
}

/// Renders the report in the requested format.
pub fn render(r: &Report, output: TraceOutput) -> String {
    match output {
        TraceOutput::Text => to_text(r),
        TraceOutput::Json => format!("{:#}\n", to_json(r)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use kproxy_tracer::FrontendKind;

    use super::*;
    use crate::cli::{Args, Command};

    fn report(mode: &str, trace_args: &[&str]) -> Report {
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/demo");
        let mut argv = vec![
            "kproxy",
            "--manifests",
            demo,
            "--hostname-override",
            "node-a",
            "--cluster-cidr",
            "10.244.0.0/16,fd00:244::/56",
            "--proxy-mode",
            mode,
            "trace",
        ];
        argv.extend_from_slice(trace_args);
        let args = Args::try_parse_from(argv).expect("flags");
        let config = crate::config::from_args(&args).expect("config");
        let Some(Command::Trace(t)) = &args.command else {
            panic!("not a trace command")
        };
        run(&config, t).expect("trace runs")
    }

    /// Every mode answers the same questions about the demo cluster, and the exit status and
    /// JSON say so.
    #[test]
    fn demo_packets_in_every_mode() {
        for mode in ["iptables", "nftables", "ipvs", "userspace"] {
            let r = report(mode, &["--src", "10.244.1.7", "--dst", "10.96.0.20:80"]);
            assert_eq!(r.exit_code(), 0, "{mode}: {}", to_text(&r));
            let Verdict::Forward { candidates, .. } = &r.trace.verdict else {
                panic!("{mode}: {}", to_text(&r))
            };
            assert_eq!(candidates.len(), 2, "{mode}");
            let json = to_json(&r);
            assert_eq!(json["verdict"]["kind"], "FORWARD");
            assert_eq!(json["verdict"]["affinityTimeoutSeconds"], 600);
            // default/legacy has no endpoints: refused, exit 3.
            let r = report(mode, &["--src", "10.244.1.7", "--dst", "10.96.0.50:8000"]);
            assert_eq!(r.exit_code(), 3, "{mode}: {}", to_text(&r));
        }
        // Outside loadBalancerSourceRanges: DROP by docs/semantics.md rule 13 in the kernel modes.
        for mode in ["iptables", "nftables", "ipvs"] {
            let r = report(
                mode,
                &[
                    "--src",
                    "192.0.2.9",
                    "--dst",
                    "198.51.100.30:443",
                    "--output",
                    "json",
                ],
            );
            assert!(
                matches!(r.trace.verdict, Verdict::Drop { rule: 13, .. }),
                "{mode}: {}",
                to_text(&r)
            );
            // The text names the rule and where it is written down.
            assert!(
                to_text(&r).contains("(docs/semantics.md, rule 13)"),
                "{mode}: {}",
                to_text(&r)
            );
            assert_eq!(to_json(&r)["packet"]["from"], "external");
        }
    }

    /// Two Services claim `10.96.0.1:443`: the older `zzz-system/kubernetes` as its ClusterIP,
    /// the younger `aaa/evil` (sorting first) as an externalIP. The desired state keeps only the
    /// older one's, so every mode's tracer forwards to it and calls the frontend a ClusterIP
    /// (iptables used to give the packet to `aaa/evil`, nftables to `kubernetes`).
    #[test]
    fn a_contested_frontend_traces_to_the_older_service_in_every_mode() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("objects.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: kubernetes, namespace: zzz-system, \
             creationTimestamp: \"2020-01-01T00:00:00Z\"}\nspec: {clusterIP: 10.96.0.1, ports: \
             [{name: https, port: 443}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: \
             evil, namespace: aaa, creationTimestamp: \"2024-01-01T00:00:00Z\"}\nspec: {clusterIP: \
             10.96.0.9, externalIPs: [10.96.0.1], ports: [{name: https, port: 443}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: k, namespace: \
             zzz-system, labels: {kubernetes.io/service-name: kubernetes}}\naddressType: IPv4\n\
             endpoints: [{addresses: [10.244.1.1]}]\nports: [{name: https, port: 6443}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e, namespace: \
             aaa, labels: {kubernetes.io/service-name: evil}}\naddressType: IPv4\nendpoints: \
             [{addresses: [10.244.2.2]}]\nports: [{name: https, port: 8443}]\n",
        )
        .expect("write manifests");
        let manifests = dir.path().display().to_string();
        for mode in ["iptables", "nftables", "ipvs", "userspace"] {
            let argv = [
                "kproxy",
                "--manifests",
                &manifests,
                "--hostname-override",
                "node-a",
                "--proxy-mode",
                mode,
                "trace",
                "--src",
                "10.244.1.7",
                "--dst",
                "10.96.0.1:443",
            ];
            let args = Args::try_parse_from(argv).expect("flags");
            let config = crate::config::from_args(&args).expect("config");
            let Some(Command::Trace(t)) = &args.command else {
                panic!("not a trace command")
            };
            let r = run(&config, t).expect("trace runs");
            let Verdict::Forward {
                service,
                frontend,
                candidates,
                ..
            } = &r.trace.verdict
            else {
                panic!("{mode}: {}", to_text(&r))
            };
            assert_eq!(
                service.as_deref(),
                Some("zzz-system/kubernetes:https"),
                "{mode}: {}",
                to_text(&r)
            );
            assert_eq!(*frontend, Some(FrontendKind::ClusterIp), "{mode}");
            assert_eq!(candidates.len(), 1, "{mode}");
            assert_eq!(
                candidates[0].endpoint.to_string(),
                "10.244.1.1:6443",
                "{mode}"
            );
        }
    }

    /// `kproxy trace` flags for a TCP packet from `src` to `dst`.
    fn trace_args(src: &str, dst: &str, from: Option<OriginArg>) -> TraceArgs {
        TraceArgs {
            src: src.into(),
            dst: dst.into(),
            proto: "tcp".into(),
            from,
            ingress: IngressArgs::default(),
            live: false,
            output: TraceOutput::Text,
        }
    }

    fn state_with(local_traffic: LocalTraffic) -> ProxyState {
        let mut s = kproxy_testkit::state(vec![kproxy_testkit::service(
            "web",
            "10.96.0.10",
            vec![kproxy_testkit::ep("10.244.2.1", false)],
        )]);
        std::sync::Arc::make_mut(&mut s.node).local_traffic = local_traffic;
        s
    }

    fn ingress(name: Option<&str>) -> IngressArgs {
        IngressArgs {
            in_interface: name.map(str::to_string),
        }
    }

    /// The masquerade decision of a trace's only candidate, in iptables mode.
    fn masqueraded(s: &ProxyState, p: &Packet) -> bool {
        let rules = kproxy_iptables::render::render(s, &kproxy_iptables::RenderOptions::default());
        let t = kproxy_iptables::trace::trace(&rules, &Env::from_state(s), p);
        let Verdict::Forward { candidates, .. } = &t.verdict else {
            panic!("{p}: {}", t.verdict)
        };
        candidates[0].masquerade
    }

    #[test]
    fn in_interface_defaults_to_the_pods_interface_and_decides_the_origin() {
        let cluster: Vec<IpNet> = vec!["10.244.0.0/16".parse().expect("net")];
        let bridge = state_with(LocalTraffic::Interface("cbr0".into()));
        let env = Env::from_state(&bridge);
        let args = trace_args("10.244.1.7", "10.96.0.10:80", None);
        // A pod source under an interface detector: from the pod, via the bridge.
        let p = packet(&args, &ingress(None), &cluster, &bridge, &env).expect("packet");
        assert_eq!((p.origin, p.ingress()), (Origin::Pod, "cbr0"));
        assert!(!masqueraded(&bridge, &p));
        // Another interface: not from a pod, masqueraded.
        let p = packet(&args, &ingress(Some("eth0")), &cluster, &bridge, &env).expect("packet");
        assert_eq!((p.origin, p.ingress()), (Origin::External, "eth0"));
        assert!(masqueraded(&bridge, &p));
        // An address outside the pod network arriving on the bridge is a pod's packet.
        let outside = trace_args("172.16.0.9", "10.96.0.10:80", None);
        let p = packet(&outside, &ingress(Some("cbr0")), &cluster, &bridge, &env).expect("packet");
        assert_eq!(p.origin, Origin::Pod);
        // A prefix detector: the prefix and 0.
        let prefix = state_with(LocalTraffic::InterfacePrefix("veth".into()));
        let pod = trace_args("172.16.0.9", "10.96.0.10:80", Some(OriginArg::Pod));
        let p = packet(&pod, &ingress(None), &[], &prefix, &env).expect("packet");
        assert_eq!(p.ingress(), "veth0");
        assert!(!masqueraded(&prefix, &p));
        // The CIDR detector needs no interface.
        let cidr = state_with(LocalTraffic::source_cidrs(&cluster));
        let p = packet(&args, &ingress(None), &[], &cidr, &env).expect("packet");
        assert_eq!((p.origin, p.in_iface.as_deref()), (Origin::Pod, None));
    }

    #[test]
    fn in_interface_is_refused_for_the_nodes_own_packets_and_bad_names() {
        let s = state_with(LocalTraffic::Interface("cbr0".into()));
        let env = Env::from_state(&s);
        let from_node = trace_args("192.168.0.2", "10.96.0.10:80", None);
        assert!(packet(&from_node, &ingress(Some("cbr0")), &[], &s, &env).is_err());
        let args = trace_args("10.244.1.7", "10.96.0.10:80", None);
        for bad in ["", "a b", "sixteen-chars-xx"] {
            assert!(
                packet(&args, &ingress(Some(bad)), &[], &s, &env).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn in_interface_flag_parses() {
        use clap::{Args as _, FromArgMatches as _};
        let cmd = IngressArgs::augment_args(clap::Command::new("trace"));
        let m = cmd
            .try_get_matches_from(["trace", "--in-interface", "cbr0"])
            .expect("flags");
        assert_eq!(
            IngressArgs::from_arg_matches(&m).expect("args"),
            ingress(Some("cbr0"))
        );
    }

    #[test]
    fn bad_addresses_are_usage_errors() {
        let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/demo");
        for (src, dst) in [
            ("10.0.0.1", "10.96.0.20"),
            ("nonsense", "10.96.0.20:80"),
            ("fd00::1", "10.96.0.20:80"),
        ] {
            let args = Args::try_parse_from([
                "kproxy",
                "--manifests",
                demo,
                "--hostname-override",
                "node-a",
                "trace",
                "--src",
                src,
                "--dst",
                dst,
            ])
            .expect("flags");
            let config = crate::config::from_args(&args).expect("config");
            let Some(Command::Trace(t)) = &args.command else {
                panic!("not a trace command")
            };
            assert!(run(&config, t).is_err(), "{src} -> {dst}");
        }
    }
}
