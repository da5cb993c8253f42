#!/usr/bin/env bash
# Builds a Linux guest from Debian packages: the cloud kernel (bzImage) and a
# busybox-static initramfs whose /init reports that it reached userspace.
#
#   guest-images/linux/build.sh [OUT_DIR]     (default: target/guest-images/linux)
#
# Needs apt-get (to download the packages), dpkg-deb, cpio and gzip.
# Writes OUT_DIR/vmlinuz, OUT_DIR/initramfs.cpio.gz and OUT_DIR/kernel-version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/guest-images/linux}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops privileges to _apt

for tool in apt-get dpkg-deb cpio gzip; do
    command -v "$tool" >/dev/null || { echo "build.sh: missing $tool (apt-get install cpio gzip dpkg)" >&2; exit 1; }
done

# The metapackage names the current versioned kernel package.
kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[ -n "$kernel_pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }

cd "$work"
apt-get download "$kernel_pkg" busybox-static >/dev/null
dpkg-deb -x "$kernel_pkg"_*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
cp kernel/boot/vmlinuz-* "$out/vmlinuz"
basename kernel/boot/vmlinuz-* | sed 's/^vmlinuz-//' > "$out/kernel-version"

mkdir -p initramfs/{bin,dev,proc,sys,tmp}
cp busybox/bin/busybox initramfs/bin/busybox
for applet in sh mount echo cat uname poweroff; do ln -sf busybox "initramfs/bin/$applet"; done
cat > initramfs/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "specula-initramfs: reached userspace on $(uname -r)"
exec /bin/sh
INIT
chmod +x initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz"
echo "Linux $(cat "$out/kernel-version") -> $out/vmlinuz, $out/initramfs.cpio.gz"
