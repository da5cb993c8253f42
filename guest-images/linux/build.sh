#!/usr/bin/env bash
# Builds a Linux guest from Debian packages: the cloud kernel (bzImage) and two
# busybox-static initramfs images.
#
#   guest-images/linux/build.sh [OUT_DIR]     (default: target/guest-images/linux)
#
# Needs apt-get (to download the packages), dpkg-deb, cpio, gzip and gcc (with
# glibc's static libc.a, from libc6-dev). Writes into OUT_DIR:
#   vmlinuz, kernel-version  the kernel and its release (uname -r)
#   initramfs.cpio.gz        /init reports that it reached userspace, then runs a shell
#                            (the vmm's linux_boot test)
#   introspect.cpio.gz       the live guest of integration-tests' LinuxGuest fixture:
#                            /init starts known processes (specula-marker, built here
#                            from specula-marker.c, and sleeps), loads dummy.ko from the
#                            same kernel package, prints its ground truth between
#                            "=== specula ground truth begin/end ===" lines and runs a
#                            shell on ttyS0
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/guest-images/linux}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops privileges to _apt

for tool in apt-get dpkg-deb cpio gzip gcc; do
    command -v "$tool" >/dev/null || { echo "build.sh: missing $tool (scripts/install-deps.sh installs it)" >&2; exit 1; }
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

# The introspection guest. Ground truth is printed by the guest itself; the
# fixture (integration-tests/src/linux_guest.rs) parses it, so keep the two in step.
version="$(cat "$out/kernel-version")"
dummy="lib/modules/$version/kernel/drivers/net/dummy.ko"
[ -f "kernel/$dummy" ] || { echo "build.sh: $kernel_pkg has no $dummy" >&2; exit 1; }
gcc -static -O2 -Wall -Wextra -o specula-marker "$here/specula-marker.c" \
    || { echo "build.sh: gcc -static failed (needs libc6-dev's libc.a)" >&2; exit 1; }
mkdir -p introspect/{bin,dev,etc,proc,sys,tmp,root} "introspect/$(dirname "$dummy")"
printf 'root:x:0:0:root:/root:/bin/sh\nspecula:x:1000:1000:specula:/tmp:/bin/sh\n' > introspect/etc/passwd
printf 'root:x:0:\nspecula:x:1000:\n' > introspect/etc/group
cp busybox/bin/busybox introspect/bin/busybox
for applet in sh ash mount echo cat uname ps insmod rmmod lsmod sleep usleep grep kill setsid \
    ls stat readlink printf poweroff true false head tail sed awk tr wc id; do
    ln -sf busybox "introspect/bin/$applet"
done
cp specula-marker introspect/bin/specula-marker
cp "kernel/$dummy" "introspect/$dummy"
cat > introspect/init <<'INIT'
#!/bin/sh
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
# The workload: two marker processes (one as uid 1000, user specula) and two sleeps.
specula-marker --name specula-workerA --tag alpha >/tmp/marker-a &
specula-marker --name specula-workerB --tag bravo --uid 1000 >/tmp/marker-b &
sleep 1000000 &
sleep 2000000 &
insmod "/lib/modules/$(uname -r)/kernel/drivers/net/dummy.ko"
for f in /tmp/marker-a /tmp/marker-b; do
    n=0
    while ! grep -q '^marker ' "$f" 2>/dev/null && [ "$n" -lt 1000 ]; do usleep 10000; n=$((n + 1)); done
done
echo "=== specula ground truth begin ==="
echo "--- ps ---"
ps -o pid,ppid,user,comm,args | cat  # through a pipe: ps cuts lines to a terminal's width
echo "--- modules ---"
cat /proc/modules
echo "--- markers ---"
cat /tmp/marker-a /tmp/marker-b
echo "--- uname ---"
uname -r
echo "=== specula ground truth end ==="
# A shell on the serial console for the fixture to drive; started again if it exits.
while true; do
    setsid sh -c 'exec sh -c "echo === specula console ready ===; exec sh" </dev/ttyS0 >/dev/ttyS0 2>&1'
done
INIT
chmod +x introspect/init
(cd introspect && find . | cpio -o -H newc --quiet | gzip -9) > "$out/introspect.cpio.gz"
echo "Linux $version -> $out/vmlinuz, $out/initramfs.cpio.gz, $out/introspect.cpio.gz"
