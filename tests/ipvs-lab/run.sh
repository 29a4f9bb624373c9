#!/usr/bin/env bash
# The IPVS test lab: boots a stock Debian kernel in qemu with a tiny initramfs holding the e2e
# test binary and kproxy, loads ip_vs, runs the IPVS end-to-end tests inside the guest (network
# namespaces, real traffic through virtual servers) and exits with their status.
#
# Why a VM: the development and CI machines' kernel has no IPVS (and no dummy link type) and
# cannot load modules. Debian's kernel has both as modules.
#
# Inputs (environment):
#   KPROXY_LAB_E2E      the e2e test binary to run in the guest (required)
#   KPROXY_LAB_KPROXY   the kproxy binary (required); placed at the same path in the guest
#   KPROXY_LAB_CACHE    cache directory for packages and the extracted tree (required)
#   KPROXY_LAB_FILTER   test-name filter (default: ipvs_guest::)
#   KPROXY_LAB_TIMEOUT  seconds the guest may run (default: 1200)
#   KPROXY_LAB_ARGS     extra test-harness arguments in the guest (e.g. --nocapture)
#   KPROXY_LAB_ACCEL    kvm|tcg|auto (default auto: KVM if a probe boot works, cached, else TCG)
#   KPROXY_LAB_CORPUS   the installer corpus directory (tests/installers), placed at the same path
#                       in the guest for the ipvs cases (optional)
#
# Needs qemu-system-x86_64 (bookworm-backports' qemu-system-x86, installed by .ci/run), apt-get
# (downloads linux-image-amd64's kernel, busybox-static and ipvsadm with its libraries), and the
# host's iproute2 and nftables (copied into the guest with their shared libraries).
# Output: the guest's console; the last line is `ipvs-lab: PASS` or `ipvs-lab: FAIL ...`.
set -euo pipefail

die() {
	echo "ipvs-lab: FAIL: $*" >&2
	exit 2
}

E2E=${KPROXY_LAB_E2E:?KPROXY_LAB_E2E: the e2e test binary}
KPROXY=${KPROXY_LAB_KPROXY:?KPROXY_LAB_KPROXY: the kproxy binary}
CACHE=${KPROXY_LAB_CACHE:?KPROXY_LAB_CACHE: a cache directory}
FILTER=${KPROXY_LAB_FILTER:-ipvs_guest::}
TIMEOUT=${KPROXY_LAB_TIMEOUT:-1200}
ACCEL=${KPROXY_LAB_ACCEL:-auto}
LAB_ARGS=${KPROXY_LAB_ARGS:-}

command -v qemu-system-x86_64 >/dev/null ||
	die "qemu-system-x86_64 is not installed; install qemu-system-x86 from bookworm-backports (.ci/run does: apt-get install -t bookworm-backports qemu-system-x86)"
command -v apt-get >/dev/null || die "apt-get is needed to download the guest kernel and tools"
for tool in dpkg-deb objcopy ldd; do
	command -v "$tool" >/dev/null || die "$tool is needed to build the guest image"
done
IP_BIN=$(command -v ip) || die "iproute2 (ip) is needed: it is copied into the guest"
NFT_BIN=$(command -v nft || true)
[ -n "$NFT_BIN" ] || NFT_BIN=/usr/sbin/nft
[ -x "$NFT_BIN" ] || die "nftables (nft) is needed: it is copied into the guest"

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

# --- 1. Guest packages, downloaded once per kernel version -------------------------------------
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package (run apt-get update)"
KVER=${KPKG#linux-image-}
PKGROOT="$CACHE/pkgroot-$KVER"
if [ ! -f "$PKGROOT/.complete" ]; then
	echo "ipvs-lab: downloading $KPKG, busybox-static, ipvsadm"
	rm -rf "$CACHE/debs" "$PKGROOT"
	mkdir -p "$CACHE/debs" "$PKGROOT"
	(cd "$CACHE/debs" && apt-get download -q "$KPKG" busybox-static ipvsadm libnl-3-200 libnl-genl-3-200 libpopt0 >/dev/null 2>&1) ||
		die "apt-get download failed (network, or apt-get update needed)"
	for deb in "$CACHE"/debs/*.deb; do
		dpkg-deb -x "$deb" "$PKGROOT"
	done
	touch "$PKGROOT/.complete"
fi
MODDIR="$PKGROOT/lib/modules/$KVER"
VMLINUZ="$PKGROOT/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "no kernel image in $KPKG"

# --- 2. The initramfs ---------------------------------------------------------------------------
ROOT="$CACHE/initramfs"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/modules,proc,sys,dev,tmp,run,etc,lab}
cp "$PKGROOT/bin/busybox" "$ROOT/bin/busybox"

# Modules and everything they depend on, in load order (read from each module's .modinfo;
# the package ships no modules.dep).
declare -A MODPATH=()
while IFS= read -r f; do
	name=$(basename "$f" .ko)
	MODPATH[${name//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko')
declare -A LOADED=()
ORDER=()
add_module() {
	local name=${1//-/_}
	[ -n "${LOADED[$name]:-}" ] && return 0
	local path=${MODPATH[$name]:-}
	[ -n "$path" ] || return 0 # built in
	LOADED[$name]=1
	local deps
	deps=$(objcopy -O binary --only-section=.modinfo "$path" /dev/stdout 2>/dev/null | tr '\0' '\n' | sed -n 's/^depends=//p')
	local d
	for d in ${deps//,/ }; do
		add_module "$d"
	done
	ORDER+=("$path")
}
# crc32c_generic first: libcrc32c (nf_conntrack, IPVS) needs the crc32c algorithm at init, a
# soft dependency its depends= does not list.
# nft_nat, nft_numgen and nft_fib_*: the nftables mode, also tested on this stock kernel.
for m in crc32c_generic veth dummy nf_conntrack nf_conntrack_netlink nf_nat nf_tables nft_ct nft_masq \
	nft_chain_nat nft_reject nft_reject_inet nft_reject_ipv4 nft_reject_ipv6 \
	nft_nat nft_numgen nft_fib nft_fib_ipv4 nft_fib_ipv6 nft_fib_inet \
	ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_dh ip_vs_mh ip_vs_sed ip_vs_nq; do
	add_module "$m"
done
: >"$ROOT/lab/modules"
for path in "${ORDER[@]}"; do
	cp "$path" "$ROOT/lib/modules/"
	basename "$path" >>"$ROOT/lab/modules"
done

# Dynamically linked programs with their libraries (the host's, Debian 12 like the guest's
# kernel package; ipvsadm's libnl/popt come from the downloaded packages).
copy_with_libs() {
	local src=$1 dst=$2
	mkdir -p "$ROOT$(dirname "$dst")"
	objcopy --strip-debug "$src" "$ROOT$dst" 2>/dev/null || cp "$src" "$ROOT$dst"
	chmod +x "$ROOT$dst"
	local lib
	while read -r lib; do
		[ -n "$lib" ] || continue
		if [ ! -e "$ROOT$lib" ]; then
			mkdir -p "$ROOT$(dirname "$lib")"
			cp -L "$lib" "$ROOT$lib"
		fi
	done < <(LD_LIBRARY_PATH="$PKGROOT/lib/x86_64-linux-gnu:$PKGROOT/usr/lib/x86_64-linux-gnu" ldd "$src" |
		awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}')
}
E2E_DST=/lab/e2e
copy_with_libs "$E2E" "$E2E_DST"
copy_with_libs "$KPROXY" "$KPROXY"
copy_with_libs "$IP_BIN" /sbin/ip
copy_with_libs "$NFT_BIN" /usr/sbin/nft
copy_with_libs "$PKGROOT/sbin/ipvsadm" /sbin/ipvsadm
if [ -n "${KPROXY_LAB_CORPUS:-}" ]; then
	mkdir -p "$ROOT$(dirname "$KPROXY_LAB_CORPUS")"
	cp -r "$KPROXY_LAB_CORPUS" "$ROOT$KPROXY_LAB_CORPUS"
fi
# Libraries found only in the extracted packages land under the package root's path.
if [ -d "$ROOT$PKGROOT" ]; then
	mkdir -p "$ROOT/usr/lib/x86_64-linux-gnu"
	find "$ROOT$PKGROOT" -type f -name '*.so*' -exec mv {} "$ROOT/usr/lib/x86_64-linux-gnu/" \;
	rm -rf "${ROOT:?}$PKGROOT"
fi
echo "root:x:0:0:root:/tmp:/bin/sh" >"$ROOT/etc/passwd"

cat >"$ROOT/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/tmp TMPDIR=/tmp RUST_BACKTRACE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# No tmpfs on /tmp: the initramfs root is already in memory and writable, and a checkout under
# /tmp (the kproxy binary is copied to its host path) must not be hidden by a fresh mount.
mkdir -p /tmp
mount -t tmpfs run /run
mkdir -p /run/netns /var/run
for m in \$(cat /lab/modules); do insmod /lib/modules/\$m || echo "ipvs-lab: insmod \$m failed"; done
ip link set lo up
echo "ipvs-lab: guest up after \$(cut -d' ' -f1 /proc/uptime)s; kernel \$(uname -r)"
if [ "\$(cat /proc/cmdline | grep -o 'lab=probe')" = "lab=probe" ]; then
	echo "ipvs-lab: PROBE-OK"
else
	$E2E_DST --include-ignored --test-threads=1 $LAB_ARGS $FILTER
	rc=\$?
	echo "ipvs-lab: guest tests exited \$rc after \$(cut -d' ' -f1 /proc/uptime)s"
	[ \$rc -eq 0 ] && echo "ipvs-lab: GUEST-PASS" || echo "ipvs-lab: GUEST-FAIL rc=\$rc"
fi
echo o >/proc/sysrq-trigger
sleep 5
EOF
chmod +x "$ROOT/init"
(cd "$ROOT" && find . | "$ROOT/bin/busybox" cpio -o -H newc 2>/dev/null) >"$CACHE/initramfs.cpio"

# --- 3. Boot ------------------------------------------------------------------------------------
boot() { # accel, timeout, extra cmdline, log
	timeout --kill-after=10 "$2" qemu-system-x86_64 -accel "$1" -m 3072 -smp 2 \
		-cpu max -nographic -no-reboot -nodefaults -serial stdio \
		-kernel "$VMLINUZ" -initrd "$CACHE/initramfs.cpio" \
		-append "console=ttyS0 panic=-1 quiet loglevel=3 sysrq_always_enabled=1 $3" \
		</dev/null >"$4" 2>&1 || true
}
if [ "$ACCEL" = auto ]; then
	ACCEL=tcg
	probe="$CACHE/kvm-probe-$KVER"
	if [ -f "$probe" ]; then
		ACCEL=$(cat "$probe")
	elif [ -w /dev/kvm ]; then
		boot kvm 30 lab=probe "$CACHE/probe.log"
		if grep -q "ipvs-lab: PROBE-OK" "$CACHE/probe.log"; then ACCEL=kvm; fi
		echo "$ACCEL" >"$probe"
	fi
fi
echo "ipvs-lab: booting $KPKG under qemu ($ACCEL), tests matching '$FILTER'"
start=$(date +%s.%N)
LOG="$CACHE/console.log"
boot "$ACCEL" "$TIMEOUT" "" "$LOG"
end=$(date +%s.%N)
cat "$LOG"
elapsed=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')
if grep -q "ipvs-lab: GUEST-PASS" "$LOG"; then
	echo "ipvs-lab: PASS (boot and tests: ${elapsed}s wall, $ACCEL)"
	exit 0
fi
if ! grep -q "ipvs-lab: guest tests exited" "$LOG"; then
	echo "ipvs-lab: FAIL: the guest did not finish within ${TIMEOUT}s (${elapsed}s wall, $ACCEL)"
else
	echo "ipvs-lab: FAIL (${elapsed}s wall, $ACCEL)"
fi
exit 1
