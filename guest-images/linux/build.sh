#!/usr/bin/env bash
# Builds a Linux guest from Debian packages: the cloud kernel (bzImage) and two
# busybox-static initramfs images.
#
#   guest-images/linux/build.sh [OUT_DIR [SUITE]]
#
# OUT_DIR defaults to target/guest-images/linux. SUITE is the Debian suite the
# kernel comes from: by default the one apt is configured for (bookworm: Linux
# 6.1); another suite (trixie: Linux 6.12) is fetched through a private apt
# configuration under the build directory, leaving the system's untouched.
#
# Needs apt-get (to download the packages), dpkg-deb, cpio, gzip, xz and gcc
# (with glibc's static libc.a, from libc6-dev); for the default suite also make
# and the kernel's linux-headers package (the test rootkit is built against it).
# Writes into OUT_DIR:
#   vmlinuz, kernel-version  the kernel and its release (uname -r)
#   kvm-modules/, busybox    irqbypass.ko, kvm.ko and kvm-amd.ko of that kernel, and
#                            busybox-static: the nested test bed's L1 (nested.rs)
#   initramfs.cpio.gz        /init reports that it reached userspace, then runs a shell
#                            (the vmm's linux_boot test)
#   introspect.cpio.gz       the live guest of integration-tests' LinuxGuest fixture:
#                            /init starts known processes (specula-marker, built here
#                            from specula-marker.c, and sleeps), loads dummy.ko from the
#                            same kernel package, prints its ground truth between
#                            "=== specula ground truth begin/end ===" lines and runs a
#                            shell on ttyS0. With the default suite it also holds
#                            /lib/specula_rootkit.ko (rootkit/specula_rootkit.c), which
#                            the rootkit tests load.
#   kmod/                    with the default suite: specula_mirror.ko and
#                            specula_pin_baseline.ko (mirror-driver/kmod), built
#                            against the same headers as the rootkit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/guest-images/linux}"
suite="${2:-}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops privileges to _apt

for tool in apt-get dpkg-deb cpio gzip xz gcc; do
    command -v "$tool" >/dev/null || { echo "build.sh: missing $tool (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

# apt for the kernel: the system's, or a private one for another suite.
kernel_apt=()
if [ -n "$suite" ]; then
    apt="$work/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    chmod -R 755 "$apt"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
        > "$apt/sources.list"
    kernel_apt=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    apt-get "${kernel_apt[@]}" update -qq \
        || { echo "build.sh: cannot fetch the package lists of Debian $suite" >&2; exit 1; }
fi
# The metapackage names the current versioned kernel package.
kernel_pkg="$(apt-cache "${kernel_apt[@]}" depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[ -n "$kernel_pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 ${suite:+in $suite }(run apt-get update)" >&2; exit 1; }

cd "$work"
apt-get "${kernel_apt[@]}" download "$kernel_pkg" >/dev/null
apt-get download busybox-static >/dev/null
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
modules_root=kernel
[ -d kernel/usr/lib/modules ] && modules_root=kernel/usr  # Debian 13 ships /usr/lib/modules
if [ -f "$modules_root/$dummy.xz" ]; then  # and compresses modules
    xz -d "$modules_root/$dummy.xz"
fi
[ -f "$modules_root/$dummy" ] || { echo "build.sh: $kernel_pkg has no $dummy" >&2; exit 1; }
# The nested test bed (integration-tests/src/nested.rs) boots this kernel as an L1
# under QEMU's emulated SVM: it needs KVM's modules and a static busybox.
mkdir -p "$out/kvm-modules"
for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko; do
    f="$(ls "$modules_root/lib/modules/$version/kernel/$m"* 2>/dev/null | head -1)"
    [ -n "$f" ] || { echo "build.sh: $kernel_pkg has no $m" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" > "$out/kvm-modules/$(basename "$m")" ;;
        *) cp "$f" "$out/kvm-modules/$(basename "$m")" ;;
    esac
done
cp busybox/bin/busybox "$out/busybox"
if [ -z "$suite" ]; then
    headers="/usr/src/linux-headers-$version"
    [ -f "$headers/Makefile" ] || { echo "build.sh: $headers is missing: install linux-headers-$version (scripts/install-deps.sh installs linux-headers-cloud-amd64, which must match $kernel_pkg)" >&2; exit 1; }
    command -v make >/dev/null || { echo "build.sh: missing make (scripts/install-deps.sh installs it)" >&2; exit 1; }
    mkdir rootkit
    cp "$here/rootkit/specula_rootkit.c" "$here/rootkit/Kbuild" rootkit/
    make -s -C "$headers" M="$work/rootkit" modules >rootkit/build.log 2>&1 \
        || { cat rootkit/build.log >&2; echo "build.sh: building the test rootkit against $headers failed" >&2; exit 1; }
    # The kernel mirror device and its pinning baseline (mirror-driver/kmod);
    # that script prints its build log itself when it fails.
    "$root/mirror-driver/kmod/build.sh" "$headers" "$out/kmod" \
        || { echo "build.sh: building mirror-driver/kmod against $headers failed" >&2; exit 1; }
fi
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
cp "$modules_root/$dummy" "introspect/$dummy"
if [ -z "$suite" ]; then
    mkdir -p introspect/lib
    cp rootkit/specula_rootkit.ko introspect/lib/
fi
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
