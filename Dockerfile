# kproxy's node image: docker build --build-arg KPROXY_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t kproxy:0.1.0 .
# (Not built in CI: the development machines have no container engine; tests/e2e/image.rs checks
# this file against what the code runs.)
FROM rust:1.95-bookworm AS build
ARG KPROXY_GIT_COMMIT=""
ENV KPROXY_GIT_COMMIT=${KPROXY_GIT_COMMIT}
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kproxy

# The runtime carries exactly the programs kproxy runs (modes/contract/src/command.rs PROGRAMS):
# iptables (both backends), nft and ip. Conntrack cleanup and IPVS use netlink, not tools.
FROM debian:bookworm-slim
ARG KPROXY_GIT_COMMIT=""
LABEL org.opencontainers.image.title="kproxy" \
      org.opencontainers.image.description="A kube-proxy replacement: iptables, nftables, ipvs and userspace modes" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${KPROXY_GIT_COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kproxy /usr/local/bin/kproxy
# kubeadm's DaemonSet (and every installer built on it) runs /usr/local/bin/kube-proxy: swapping
# the image is then all it takes.
RUN ln -s kproxy /usr/local/bin/kube-proxy
# The allocator (mimalloc, read once at process start): return freed pages to the system at
# once instead of a second later, and commit arena memory as it is used rather than ahead. A
# first sync allocates and frees its transient data within that second: peak RSS at 10,000
# services x 10 endpoints falls by about 33 MiB (docs/memory.md). The benchmarks run the binary
# with exactly these lines.
ENV MIMALLOC_PURGE_DELAY=0 \
    MIMALLOC_ARENA_EAGER_COMMIT=0
ENTRYPOINT ["/usr/local/bin/kproxy"]
