#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian 12 machine, as root: the kernel userland the
# modes run, qemu for the IPVS lab, g++ and cargo-fuzz for the fuzz test, kubectl for the
# kustomize check, openssl for the fresh-node test's CA. Safe to run again.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null 2>&1; then
  # The IPVS lab (tests/ipvs-lab) boots a Debian kernel under qemu-system-x86, which Debian 12
  # ships in bookworm-backports (with the qemu-utils it depends on).
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
      >/etc/apt/sources.list.d/kproxy-backports.sources
  fi
  apt-get update -qq
  # iptables/nftables/conntrack/ipset/iproute2: the kernel modes and the network-namespace tests;
  # binutils (objcopy): the IPVS lab reads kernel modules' dependencies and strips binaries.
  # g++: libfuzzer-sys compiles libFuzzer for the fuzz target (tests/e2e/reliability/fuzz.rs).
  # ca-certificates brings openssl (tests/e2e/dropin.rs makes a CA with it).
  apt-get install -y -qq --no-install-recommends \
    iptables nftables conntrack ipset iproute2 socat ca-certificates binutils g++ >/dev/null
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  # haproxy, nginx and its stream module: subjects of the userspace benchmark (benches/userspace.rs
  # starts them itself, inside its own network namespaces, by pid). Debian would start both as
  # services on install (nginx listening on port 80 of the machine): a policy-rc.d keeps them from
  # starting, and they are disabled so a boot does not start them either.
  if ! command -v haproxy >/dev/null 2>&1 || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    placed_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      placed_policy=yes
    fi
    apt-get install -y -qq --no-install-recommends haproxy nginx libnginx-mod-stream >/dev/null
    if [ -n "$placed_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    # Only the services this script just installed: a machine's own haproxy or nginx is left
    # as it was.
    if command -v systemctl >/dev/null 2>&1; then
      systemctl disable haproxy nginx >/dev/null 2>&1 || true
    fi
  fi
  # kubectl renders the kustomize base (tests/e2e/deploy_manifests.rs); Debian's
  # kubernetes-client does it offline.
  if ! command -v kubectl >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
  fi
fi

# cargo-fuzz, for the fuzz test (it fails, not skips, without it); from crates.io.
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
