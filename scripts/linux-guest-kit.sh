#!/usr/bin/env bash
# The Linux guest kit: a stock Debian kernel and a busybox initramfs for
# `castor run --kernel` and the Linux boot tests (tests/tests/linux_boot.rs).
#
#   scripts/linux-guest-kit.sh [KIT_DIR]
#
# KIT_DIR defaults to $CASTOR_LINUX_KIT, else /var/cache/castor-linux. The
# script is idempotent: when KIT_DIR already holds a kit built by this
# version of the script it exits at once (no network). Otherwise it
#   1. picks the kernel package: $CASTOR_KERNEL_PKG, else what the Debian
#      meta-package linux-image-cloud-amd64 depends on, "-unsigned" where that
#      exists (bookworm: 6.1, config PVH=y, VIRTIO_MMIO=m, ACPI=y);
#   2. `apt-get download`s it and busybox-static, `dpkg -x`es them;
#   3. extracts the ELF vmlinux (which carries the PVH note) from the
#      bzImage's payload (header fields payload_offset/payload_length);
#   4. builds initramfs.cpio.gz: static busybox, the virtio modules the
#      kernel has as modules, and an /init that prints CASTOR-GUEST-INIT,
#      loads the modules, brings up eth0 (castor.ip=ADDR/PREFIX on the kernel
#      command line, default 10.0.0.2/24) and serves TCP: a counter on 7000,
#      echo on 7001 (busybox nc) and HTTP on 80 (busybox httpd), then prints
#      CASTOR-GUEST-READY.
# Output in KIT_DIR: vmlinux, vmlinuz (the bzImage), config,
# initramfs.cpio.gz, kit.env (what was built from what).
#
# Needs: apt-get and dpkg (Debian/Ubuntu), root to install the decompressor
# (lz4/zstd/xz) when it is missing. Takes about a minute on a fresh machine.
set -euo pipefail

KIT_FORMAT=1
kit_dir="${1:-${CASTOR_LINUX_KIT:-/var/cache/castor-linux}}"
script_sum=$(sha256sum "$0" | cut -c1-16)
stamp="format=$KIT_FORMAT script=$script_sum pkg=${CASTOR_KERNEL_PKG:-auto}"

say() { echo "linux-guest-kit: $*"; }
die() { echo "linux-guest-kit: ERROR: $*" >&2; exit 1; }

mkdir -p "$kit_dir"
exec 9>"$kit_dir/.lock"
flock 9

if [ -f "$kit_dir/kit.stamp" ] && [ "$(cat "$kit_dir/kit.stamp")" = "$stamp" ] &&
    [ -s "$kit_dir/vmlinux" ] && [ -s "$kit_dir/initramfs.cpio.gz" ] && [ -s "$kit_dir/kit.env" ]; then
    say "up to date in $kit_dir ($(grep '^KIT_KERNEL_PACKAGE=' "$kit_dir/kit.env" | cut -d= -f2))"
    exit 0
fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
    die "needs apt-get and dpkg (a Debian or Ubuntu host)"

apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
}
need_tool() { # need_tool COMMAND PACKAGE
    command -v "$1" >/dev/null && return 0
    say "installing $2 (for $1)"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

# 1. Which kernel package.
pkg="${CASTOR_KERNEL_PKG:-}"
if [ -z "$pkg" ]; then
    resolve() {
        apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
    }
    base=$(resolve)
    if [ -z "$base" ]; then
        apt_update
        base=$(resolve)
    fi
    [ -n "$base" ] || die "cannot resolve linux-image-cloud-amd64 with apt-cache; set CASTOR_KERNEL_PKG"
    if apt-cache show "$base-unsigned" >/dev/null 2>&1; then pkg="$base-unsigned"; else pkg="$base"; fi
fi
say "kernel package $pkg"

work=$(mktemp -d "$kit_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

# 2. Download and unpack (as root, apt warns that _apt cannot write here: harmless).
download() {
    (cd "$work" && apt-get download "$@" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
}
download "$pkg" busybox-static
if ! ls "$work"/*.deb >/dev/null 2>&1 || [ "$(ls "$work"/*.deb | wc -l)" -lt 2 ]; then
    apt_update
    download "$pkg" busybox-static
fi
kdeb=$(ls "$work"/linux-image-*.deb 2>/dev/null | head -n1)
bdeb=$(ls "$work"/busybox-static_*.deb 2>/dev/null | head -n1)
[ -n "$kdeb" ] || die "apt-get download $pkg failed"
[ -n "$bdeb" ] || die "apt-get download busybox-static failed"
mkdir -p "$work/k" "$work/b"
dpkg -x "$kdeb" "$work/k"
dpkg -x "$bdeb" "$work/b"
vmlinuz=$(ls "$work"/k/boot/vmlinuz-* | head -n1)
config=$(ls "$work"/k/boot/config-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
busybox="$work/b/bin/busybox"
[ -x "$busybox" ] || die "no busybox in $bdeb"
say "kernel $kver"

# 3. vmlinux out of the bzImage: the payload is the compressed ELF.
le() { # le FILE OFFSET BYTES: little-endian unsigned at OFFSET
    od -An -t "u$3" -j "$2" -N "$3" --endian=little "$1" | tr -d ' '
}
[ "$(od -An -c -j 514 -N 4 "$vmlinuz" | tr -d ' ')" = "HdrS" ] || die "$vmlinuz is not a bzImage"
setup_sects=$(le "$vmlinuz" 497 1)
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset=$(le "$vmlinuz" 584 4)
payload_length=$(le "$vmlinuz" 588 4)
start=$(((setup_sects + 1) * 512 + payload_offset))
dd if="$vmlinuz" of="$work/payload" bs=1M iflag=skip_bytes,count_bytes \
    skip="$start" count="$payload_length" status=none
magic=$(od -An -t x1 -N 6 "$work/payload" | tr -d ' ')
# The kernel appends the unpacked size after the stream: decompressors may
# complain about it ("trailing garbage"); the ELF check below is what counts.
case "$magic" in
1f8b*) need_tool gzip gzip; gzip -dc <"$work/payload" >"$work/vmlinux" 2>/dev/null || true ;;
fd377a585a00) need_tool xz xz-utils; xz -dc --single-stream <"$work/payload" >"$work/vmlinux" 2>/dev/null || true ;;
02214c18*) need_tool lz4 lz4; lz4 -dc <"$work/payload" >"$work/vmlinux" 2>/dev/null || true ;;
28b52ffd*) need_tool zstd zstd; zstd -dcq <"$work/payload" >"$work/vmlinux" 2>/dev/null || true ;;
*) die "unknown compression of the kernel payload (magic $magic)" ;;
esac
[ "$(od -An -c -N 4 "$work/vmlinux" | tr -d ' ')" = "177ELF" ] || die "could not unpack vmlinux from $vmlinuz"
if command -v readelf >/dev/null; then
    readelf -n "$work/vmlinux" | grep -q 'Unknown note type: (0x00000012)' ||
        say "warning: no PVH note (XEN_ELFNOTE_PHYS32_ENTRY) in vmlinux: it will boot through its 64-bit entry"
fi

# 4. The initramfs.
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,www,lib/modules,etc}
cp "$busybox" "$root/bin/busybox"
: >"$root/lib/modules/load-order"
for m in virtio virtio_ring virtio_mmio failover net_failover virtio_net virtio_blk; do
    f=$(find "$work/k/lib/modules" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) | head -n1)
    [ -n "$f" ] || continue # built in, or absent
    case "$f" in
    *.xz) need_tool xz xz-utils; xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.zst) need_tool zstd zstd; zstd -dcq "$f" >"$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m.ko" >>"$root/lib/modules/load-order"
done
echo "castor linux guest: kernel $kver" >"$root/www/index.html"
cat >"$root/bin/counter" <<'EOF'
#!/bin/busybox sh
# 8-byte big-endian numbers 1, 2, 3, ... forever, 100 a second: what the
# built-in guest's counter serves, so `castor drill` and `castor demo`
# read a Linux guest's stream unchanged.
i=0
while :; do
    i=$((i + 1))
    printf "$(printf '\\%03o' $(((i >> 56) & 255)) $(((i >> 48) & 255)) $(((i >> 40) & 255)) \
        $(((i >> 32) & 255)) $(((i >> 24) & 255)) $(((i >> 16) & 255)) $(((i >> 8) & 255)) $((i & 255)))"
    usleep 10000
done
EOF
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "CASTOR-GUEST-INIT: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPU(s)"
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m" || echo "CASTOR-GUEST: insmod $m failed"
done
ip=10.0.0.2/24
gw=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    castor.ip=*) ip=${arg#castor.ip=} ;;
    castor.gw=*) gw=${arg#castor.gw=} ;;
    esac
done
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
    ip addr add "$ip" dev eth0
    [ -n "$gw" ] && ip route add default via "$gw"
    echo "CASTOR-GUEST-NET: eth0 $ip"
else
    echo "CASTOR-GUEST-NET: no eth0 (no virtio-net device, or its driver did not load)"
fi
nc -ll -p 7000 -e /bin/counter &
nc -ll -p 7001 -e /bin/cat &
httpd -p 80 -h /www
echo "CASTOR-GUEST-READY: counter on 7000, echo on 7001, http on 80"
while :; do sleep 3600; done
EOF
chmod 755 "$root/init" "$root/bin/counter"
(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | "$busybox" gzip -9 >"$work/initramfs.cpio.gz")

# 5. Publish.
cp "$work/vmlinux" "$kit_dir/vmlinux.new" && mv "$kit_dir/vmlinux.new" "$kit_dir/vmlinux"
cp "$vmlinuz" "$kit_dir/vmlinuz"
cp "$config" "$kit_dir/config"
cp "$work/initramfs.cpio.gz" "$kit_dir/initramfs.cpio.gz"
cat >"$kit_dir/kit.env" <<EOF
KIT_KERNEL_PACKAGE=$pkg
KIT_KERNEL_VERSION=$kver
KIT_VMLINUX=$kit_dir/vmlinux
KIT_BZIMAGE=$kit_dir/vmlinuz
KIT_INITRD=$kit_dir/initramfs.cpio.gz
KIT_MODULES=$(tr '\n' ' ' <"$root/lib/modules/load-order")
EOF
echo "$stamp" >"$kit_dir/kit.stamp"
say "built in $kit_dir: vmlinux ($(du -h "$kit_dir/vmlinux" | cut -f1)), initramfs.cpio.gz ($(du -h "$kit_dir/initramfs.cpio.gz" | cut -f1)), kernel $kver"
