//! The runtime image (`Dockerfile`): it carries exactly the packages of the programs kproxy may
//! run, answers to kubeadm's `/usr/local/bin/kube-proxy`, labels itself, and the binary names the
//! commit it was built from. No container engine runs here, so the Dockerfile is checked against
//! the code's own list of programs (`kproxy_contract::command::PROGRAMS`, which `command::run`
//! enforces) and against Debian's package contents on this machine.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("Dockerfile")
}

/// The runtime stage: everything after the last `FROM`.
fn runtime_stage(text: &str) -> &str {
    let at = text.rfind("\nFROM ").expect("a runtime stage");
    &text[at..]
}

/// The packages the runtime stage installs with apt-get.
fn installed_packages(stage: &str) -> BTreeSet<String> {
    let joined = stage.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| l.contains("apt-get install"))
        .expect("an apt-get install line");
    let after = line.split("apt-get install").nth(1).expect("packages");
    after
        .split("&&")
        .next()
        .expect("command")
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_image_carries_exactly_the_packages_of_the_programs_kproxy_runs() {
    let text = dockerfile();
    let stage = runtime_stage(&text);
    let installed = installed_packages(stage);
    let needed: BTreeSet<String> = kproxy_contract::command::PROGRAMS
        .iter()
        .map(|(_, package)| package.to_string())
        .collect();
    assert_eq!(
        installed, needed,
        "Dockerfile packages vs command::PROGRAMS"
    );
    // Each program is really in its package (Debian's file lists on this machine).
    for (program, package) in kproxy_contract::command::PROGRAMS {
        let out = Command::new("dpkg")
            .args(["-L", package])
            .output()
            .expect("dpkg (a Debian machine) must be present");
        let files = String::from_utf8_lossy(&out.stdout);
        assert!(
            files.lines().any(|f| f.ends_with(&format!("/{program}"))),
            "package {package} does not ship {program}"
        );
    }
}

#[test]
fn the_image_answers_to_kube_proxy_and_labels_itself() {
    let text = dockerfile();
    let stage = runtime_stage(&text);
    assert!(
        stage.contains("COPY --from=build /src/target/release/kproxy /usr/local/bin/kproxy"),
        "{stage}"
    );
    assert!(
        stage.contains("ln -s kproxy /usr/local/bin/kube-proxy"),
        "kubeadm's DaemonSet runs /usr/local/bin/kube-proxy"
    );
    for label in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.description",
    ] {
        assert!(stage.contains(label), "no {label} label");
    }
    // The allocator's settings the memory figures are measured with (benches/modes reads them
    // from this stage).
    for setting in ["MIMALLOC_PURGE_DELAY=0", "MIMALLOC_ARENA_EAGER_COMMIT=0"] {
        assert!(stage.contains(setting), "the runtime stage lacks {setting}");
    }
    // The commit reaches the build stage, where build.rs reads it.
    assert!(text.contains("ENV KPROXY_GIT_COMMIT=${KPROXY_GIT_COMMIT}"));
    // The version in the labels is the crate's.
    assert!(stage.contains(&format!(
        "org.opencontainers.image.version=\"{}\"",
        env!("CARGO_PKG_VERSION")
    )));
}

#[test]
fn version_names_the_git_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .arg("--version")
        .output()
        .expect("run kproxy --version");
    let version = String::from_utf8_lossy(&out.stdout);
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git (the tests run from a checkout)");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(head.len(), 12, "not a git checkout?");
    assert_eq!(
        version.trim(),
        format!("kproxy {} (git {head})", env!("CARGO_PKG_VERSION"))
    );
    // Upstream's spelling, which scripts use, prints the same.
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .arg("--version=true")
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), version);
}
