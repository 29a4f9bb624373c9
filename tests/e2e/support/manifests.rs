//! A temp directory of Service / EndpointSlice / Node YAML for `kproxy --manifests DIR`.
//!
//! Files are written atomically (a dot-file renamed into place), one object per file, so
//! kproxy's watcher never reads half an object.

use std::fmt::Write as _;
use std::path::Path;

use tempfile::TempDir;

/// The namespace every object lives in.
pub(crate) const NAMESPACE: &str = "default";

/// One service port and where its endpoints listen.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Port {
    /// The port name (shared by the Service and the EndpointSlice).
    pub(crate) name: &'static str,
    /// `TCP`, `UDP` or `SCTP`.
    pub(crate) protocol: &'static str,
    /// The service port.
    pub(crate) port: u16,
    /// The endpoints' port.
    pub(crate) target: u16,
    /// The NodePort (NodePort and LoadBalancer Services).
    pub(crate) node_port: Option<u16>,
}

impl Port {
    /// A TCP port.
    pub(crate) const fn tcp(name: &'static str, port: u16, target: u16) -> Port {
        Port {
            name,
            protocol: "TCP",
            port,
            target,
            node_port: None,
        }
    }

    /// The same port with a NodePort.
    pub(crate) const fn with_node_port(self, node_port: u16) -> Port {
        Port {
            node_port: Some(node_port),
            ..self
        }
    }

    /// An SCTP port.
    pub(crate) const fn sctp(name: &'static str, port: u16, target: u16) -> Port {
        Port {
            name,
            protocol: "SCTP",
            port,
            target,
            node_port: None,
        }
    }

    /// A UDP port.
    pub(crate) const fn udp(name: &'static str, port: u16, target: u16) -> Port {
        Port {
            name,
            protocol: "UDP",
            port,
            target,
            node_port: None,
        }
    }
}

/// The manifests directory; deleted on drop.
#[derive(Debug)]
pub(crate) struct Manifests {
    dir: TempDir,
}

impl Manifests {
    /// An empty directory.
    pub(crate) fn new() -> Manifests {
        Manifests {
            dir: tempfile::Builder::new()
                .prefix("kpx-manifests-")
                .tempdir()
                .expect("manifests dir"),
        }
    }

    /// The directory (for `--manifests`).
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The directory as a string argument.
    pub(crate) fn arg(&self) -> String {
        self.path().display().to_string()
    }

    /// Writes `FILE.yaml` atomically.
    pub(crate) fn write(&self, file: &str, yaml: &str) {
        let tmp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("write manifest");
        std::fs::rename(&tmp, self.path().join(format!("{file}.yaml"))).expect("rename manifest");
    }

    /// Deletes `FILE.yaml` (or `FILE.json`, written by [`Manifests::object`]).
    pub(crate) fn remove(&self, file: &str) {
        let yaml = self.path().join(format!("{file}.yaml"));
        let path = if yaml.exists() {
            yaml
        } else {
            self.path().join(format!("{file}.json"))
        };
        std::fs::remove_file(path).expect("remove manifest");
    }

    /// Writes an object (see [`super::objects`]) atomically as `FILE.json`, where FILE is
    /// [`object_file`] of it.
    pub(crate) fn object(&self, object: &serde_json::Value) {
        let file = object_file(object);
        let tmp = self.path().join(format!(".{file}.tmp"));
        let text = serde_json::to_string_pretty(object).expect("serialize manifest");
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.path().join(format!("{file}.json"))).expect("rename manifest");
    }

    /// Writes the Node `name` with InternalIP(s) `ips` as `node-NAME.yaml`.
    pub(crate) fn node(&self, name: &str, ips: &[&str]) {
        self.write(&format!("node-{name}"), &node(name, ips));
    }

    /// Writes a ClusterIP Service as `svc-NAME.yaml`. One cluster IP makes it single-stack;
    /// two (IPv4 first) make it `RequireDualStack`.
    pub(crate) fn service(&self, name: &str, cluster_ips: &[&str], ports: &[Port]) {
        self.write(&format!("svc-{name}"), &service(name, cluster_ips, ports));
    }

    /// Writes an EndpointSlice of `service` named `SLICE` as `eps-SLICE.yaml`; the address type
    /// follows the first address. All endpoints are ready and on node `node-b`.
    pub(crate) fn endpoint_slice(
        &self,
        service: &str,
        slice: &str,
        addrs: &[&str],
        ports: &[Port],
    ) {
        self.write(
            &format!("eps-{slice}"),
            &endpoint_slice(service, slice, addrs, ports),
        );
    }
}

/// The file an object is written to: `svc-NAME`, `eps-NAME` or `node-NAME`, as the YAML
/// writers name theirs.
pub(crate) fn object_file(object: &serde_json::Value) -> String {
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    let prefix = match object["kind"].as_str().expect("kind") {
        "Service" => "svc",
        "EndpointSlice" => "eps",
        "Node" => "node",
        other => panic!("no manifest file name for kind {other}"),
    };
    format!("{prefix}-{name}")
}

fn family_of(ip: &str) -> &'static str {
    if ip.contains(':') { "IPv6" } else { "IPv4" }
}

fn list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A Node with InternalIP(s).
pub(crate) fn node(name: &str, ips: &[&str]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\nstatus:\n  addresses:\n"
    );
    for ip in ips {
        let _ = writeln!(out, "  - type: InternalIP\n    address: \"{ip}\"");
    }
    out
}

/// A ClusterIP Service.
pub(crate) fn service(name: &str, cluster_ips: &[&str], ports: &[Port]) -> String {
    let families: Vec<&str> = cluster_ips.iter().map(|ip| family_of(ip)).collect();
    let policy = if cluster_ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  type: ClusterIP\n  clusterIP: \"{}\"\n  clusterIPs: {}\n  ipFamilies: {}\n  ipFamilyPolicy: {policy}\n  ports:\n",
        cluster_ips.first().expect("a cluster IP"),
        list(cluster_ips),
        list(&families),
    );
    for p in ports {
        let _ = writeln!(
            out,
            "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}",
            p.name, p.protocol, p.port, p.target
        );
    }
    out
}

/// An EndpointSlice with ready endpoints.
pub(crate) fn endpoint_slice(service: &str, slice: &str, addrs: &[&str], ports: &[Port]) -> String {
    let family = addrs.first().map_or("IPv4", |a| family_of(a));
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {family}\nendpoints:\n"
    );
    for a in addrs {
        let _ = writeln!(
            out,
            "- addresses: [\"{a}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node-b"
        );
    }
    out.push_str("ports:\n");
    for p in ports {
        let _ = writeln!(
            out,
            "- name: {}\n  protocol: {}\n  port: {}",
            p.name, p.protocol, p.target
        );
    }
    out
}
