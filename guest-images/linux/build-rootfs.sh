#!/usr/bin/env bash
# Builds a small Debian root file system from Debian packages into an ext4 image,
# with no loop mount and no root-only step but mmdebstrap's own:
#
#   guest-images/linux/build-rootfs.sh [OUT_DIR [SUITE]]
#
# OUT_DIR defaults to target/guest-images/debian, SUITE to bookworm. Writes
# OUT_DIR/rootfs.img: Debian's minbase (apt, bash, coreutils, dpkg, ...) plus
# sysvinit-core (for a real `poweroff`), procps, iproute2, iputils-ping, kmod and
# socat (whose VSOCK addresses the virtio-vsock tests use),
# without documentation, man pages or locales, and /sbin/specula-init, the init the
# tests boot (a shell on the serial console; see below). The image is ext4, made
# with `mkfs.ext4 -d` from the unpacked tree, sized to its contents plus 64 MiB.
#
# Boot it with the Linux guest's disk initramfs (build.sh: disk-initramfs.cpio.gz),
# which mounts /dev/vda and switch_roots to init=/sbin/specula-init:
#   vmm --kernel target/guest-images/linux/vmlinuz \
#       --initramfs target/guest-images/linux/disk-initramfs.cpio.gz \
#       --disk path=target/guest-images/debian/rootfs.img \
#       --cmdline "console=ttyS0 init=/sbin/specula-init"
#
# Needs mmdebstrap and e2fsprogs (scripts/install-deps.sh installs them) and access
# to deb.debian.org.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/guest-images/debian}"
suite="${2:-bookworm}"
for tool in mmdebstrap mkfs.ext4; do
    command -v "$tool" >/dev/null || { echo "build-rootfs.sh: missing $tool (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Why not systemd: under the nested test bed's TCG a systemd boot takes minutes;
# this init takes none, and the rest of the system is Debian's own.
cat > "$work/specula-init" <<'INIT'
#!/bin/bash
# Specula's init for the test root file system: the kernel's file systems, a
# banner the tests wait for, then a root shell on the serial console (again if
# it exits). `poweroff -f` (sysvinit) powers the VM off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
hostname specula-debian
echo "specula-rootfs: Debian $(cat /etc/debian_version) on $(uname -r), root $(awk '$2 == "/" {print $1, $4}' /proc/mounts | head -1)"
while true; do
    setsid bash -c 'exec bash -i </dev/ttyS0 >/dev/ttyS0 2>&1'
done
INIT

exclude='path-exclude=/usr/share/{doc,man,info,locale,lintian,linda}/*'
mmdebstrap --quiet --variant=minbase \
    --include=sysvinit-core,procps,iproute2,iputils-ping,kmod,socat \
    --dpkgopt="$exclude" --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook="install -m 755 '$work/specula-init' \"\$1/sbin/specula-init\"" \
    --customize-hook='echo specula-debian > "$1/etc/hostname"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$suite" "$work/tree" http://deb.debian.org/debian \
    || { echo "build-rootfs.sh: mmdebstrap of Debian $suite failed" >&2; exit 1; }
used_mib=$(( $(du -sm "$work/tree" | cut -f1) + 64 ))
rm -f "$out/rootfs.img.new"
mkfs.ext4 -q -F -L specula-root -d "$work/tree" "$out/rootfs.img.new" "${used_mib}M" \
    || { echo "build-rootfs.sh: mkfs.ext4 -d failed" >&2; exit 1; }
mv "$out/rootfs.img.new" "$out/rootfs.img"
echo "Debian $suite root file system -> $out/rootfs.img (${used_mib} MiB)"
