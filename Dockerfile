# kproxy's node image: docker build -t kproxy:0.1.0 .
# (Not built in CI: the development machines have no container engine.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kproxy

# The runtime carries the kernel userland every mode may call: iptables (both backends),
# nft, conntrack, ipset and ip.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables conntrack ipset iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kproxy /usr/local/bin/kproxy
ENTRYPOINT ["/usr/local/bin/kproxy"]
