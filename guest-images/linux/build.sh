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
# Needs apt-get (to download the packages), dpkg-deb, cpio, gzip, xz, gcc
# (with glibc's static libc.a, from libc6-dev) and make; for the default suite
# also the kernel's linux-headers package (the test rootkit is built against it).
# For another suite the rootkit is built against that kernel's own headers
# packages, downloaded and unpacked here, with the kbuild tools of the same
# kernel series from bookworm-backports (see build_suite_headers below).
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
#                            shell on ttyS0. It also holds /lib/specula_rootkit.ko
#                            (rootkit/specula_rootkit.c), which the rootkit tests load,
#                            and /bin/specula-forger (specula-forger.c), which forges a
#                            second kernel in its pages for the forgery tests.
#   disk-initramfs.cpio.gz   boots a root file system from a virtio disk: /init loads
#                            the virtio-mmio, virtio-blk, virtio-net and virtio-vsock
#                            modules of this kernel (Debian builds them as modules),
#                            mounts root= (default
#                            /dev/vda; `ro` on the command line mounts it read-only)
#                            and switch_roots to init= (default /sbin/init). The
#                            disk itself is build-rootfs.sh's.
#   l1-modules/              with the default suite: zsmalloc.ko, zram.ko and
#                            lzo-rle.ko, for swap to zram in the L1, tun.ko, for
#                            the taps of the virtio-net tests, and vhost_iotlb.ko,
#                            vhost.ko, vsock.ko, vmw_vsock_virtio_transport_common.ko
#                            and vhost_vsock.ko (in this load order), for the
#                            virtio-vsock tests' /dev/vhost-vsock
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
# module_file M: the file of module M (a path under the kernel's modules, `.ko` or a
# prefix of it) in the kernel package, compressed or not; empty when it has none.
module_file() { ls "$modules_root/lib/modules/$version/kernel/$1"* 2>/dev/null | head -1 || true; }
# unpack_module FILE DEST: copies a module, decompressing a .ko.xz (busybox's insmod
# and L1's take only plain modules).
unpack_module() { case "$1" in *.xz) xz -dc "$1" > "$2" ;; *) cp "$1" "$2" ;; esac; }
# The nested test bed (integration-tests/src/nested.rs) boots this kernel as an L1
# under QEMU's emulated SVM: it needs KVM's modules and a static busybox.
mkdir -p "$out/kvm-modules"
for m in virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko; do
    f="$(module_file "$m")"
    [ -n "$f" ] || { echo "build.sh: $kernel_pkg has no $m" >&2; exit 1; }
    unpack_module "$f" "$out/kvm-modules/$(basename "$m")"
done
# Swap to zram in the L1 (the kernel mirror's swap test): zram, its allocator and its
# default compressor, which the L1 loads by hand (it has no modprobe).
if [ -z "$suite" ]; then
    mkdir -p "$out/l1-modules"
    for m in mm/zsmalloc.ko drivers/block/zram/zram.ko crypto/lzo-rle.ko drivers/net/tun.ko \
        drivers/vhost/vhost_iotlb.ko drivers/vhost/vhost.ko net/vmw_vsock/vsock.ko \
        net/vmw_vsock/vmw_vsock_virtio_transport_common.ko drivers/vhost/vhost_vsock.ko; do
        f="$(module_file "$m")"
        [ -n "$f" ] || { echo "build.sh: $kernel_pkg has no $m" >&2; exit 1; }
        unpack_module "$f" "$out/l1-modules/$(basename "$m")"
    done
fi
cp busybox/bin/busybox "$out/busybox"
# build_suite_headers: unpacks the kernel's linux-headers package, its -common and
# its linux-kbuild from the suite into $work/headers and prints the build tree. The
# kbuild programs are built for that suite's glibc (trixie's modpost and objtool
# need GLIBC_2.38; Debian 12 has 2.36), so the build tree's scripts and tools point
# at the linux-kbuild package of the same kernel series from bookworm-backports
# (built for Debian 12) instead; the kbuild makefiles stay the suite's. Modules built against bookworm-backports' own
# headers do not load: their vermagic names another release and most symbol CRCs
# differ from this kernel's Module.symvers.
build_suite_headers() {
    local headers_pkg="linux-headers-$version" common_pkg kbuild_pkg bpo_kbuild_pkg series bpo root tree
    common_pkg="$(apt-cache "${kernel_apt[@]}" depends "$headers_pkg" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-headers-.*-common$/ {print $2; exit}')"
    kbuild_pkg="$(apt-cache "${kernel_apt[@]}" depends "$headers_pkg" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-kbuild-/ {print $2; exit}')"
    [ -n "$common_pkg" ] && [ -n "$kbuild_pkg" ] \
        || { echo "build.sh: cannot resolve $headers_pkg's -common and kbuild packages in $suite" >&2; return 1; }
    series="$(echo "$version" | cut -d. -f1,2)"
    bpo="$work/apt-bpo"
    mkdir -p "$bpo/lists/partial" "$bpo/cache/archives/partial"
    chmod -R 755 "$bpo"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
        > "$bpo/sources.list"
    local bpo_apt=(-o "Dir::Etc::SourceList=$bpo/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$bpo/lists" -o "Dir::Cache=$bpo/cache")
    apt-get "${bpo_apt[@]}" update -qq || { echo "build.sh: cannot fetch bookworm-backports' package lists" >&2; return 1; }
    bpo_kbuild_pkg="$(apt-cache "${bpo_apt[@]}" search --names-only "^linux-kbuild-${series//./\\.}\\." | awk '{print $1}' | sort -V | tail -1)"
    [ -n "$bpo_kbuild_pkg" ] || { echo "build.sh: bookworm-backports has no linux-kbuild-$series.* for $version" >&2; return 1; }
    apt-get "${kernel_apt[@]}" download "$headers_pkg" "$common_pkg" "$kbuild_pkg" >/dev/null 2>&1 \
        || { echo "build.sh: cannot download $headers_pkg, $common_pkg and $kbuild_pkg from $suite" >&2; return 1; }
    apt-get "${bpo_apt[@]}" download "$bpo_kbuild_pkg" >/dev/null 2>&1 \
        || { echo "build.sh: cannot download $bpo_kbuild_pkg from bookworm-backports" >&2; return 1; }
    root="$work/headers"
    mkdir -p "$root"
    for deb in "$headers_pkg"_*.deb "$common_pkg"_*.deb "$kbuild_pkg"_*.deb "$bpo_kbuild_pkg"_*.deb; do
        dpkg-deb -x "$deb" "$root"
    done
    tree="$root/usr/src/$headers_pkg"
    [ -f "$tree/Makefile" ] || { echo "build.sh: $headers_pkg has no Makefile" >&2; return 1; }
    sed -i "s|^include /usr/src/|include $root/usr/src/|" "$tree/Makefile"
    # The programs are run from the build tree's scripts and tools; the makefiles
    # are read from the source tree's (-common's), which stay the suite's own.
    ln -sfn "$root/usr/lib/$bpo_kbuild_pkg/scripts" "$tree/scripts"
    ln -sfn "$root/usr/lib/$bpo_kbuild_pkg/tools" "$tree/tools"
    echo "$tree"
}
command -v make >/dev/null || { echo "build.sh: missing make (scripts/install-deps.sh installs it)" >&2; exit 1; }
rootkit_make=()
if [ -z "$suite" ]; then
    headers="/usr/src/linux-headers-$version"
    [ -f "$headers/Makefile" ] || { echo "build.sh: $headers is missing: install linux-headers-$version (scripts/install-deps.sh installs linux-headers-cloud-amd64, which must match $kernel_pkg)" >&2; exit 1; }
else
    headers="$(build_suite_headers)" || exit 1
    # The suite's kernel was built by its own gcc (trixie: 14): use this one, without
    # the options it lacks (-fmin-function-alignment: gcc 14; then -falign-functions
    # aligns the module's functions), and without module BTF (this pahole may lack
    # the kernel's --btf_features; the BTF is optional and nothing here reads it).
    rootkit_make=(CC=gcc CONFIG_DEBUG_INFO_BTF_MODULES=)
    gcc -fmin-function-alignment=16 -x c -c -o /dev/null /dev/null 2>/dev/null \
        || rootkit_make+=(CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT=)
fi
mkdir rootkit
cp "$here/rootkit/specula_rootkit.c" "$here/rootkit/Kbuild" rootkit/
make -s -C "$headers" M="$work/rootkit" "${rootkit_make[@]}" modules >rootkit/build.log 2>&1 \
    || { cat rootkit/build.log >&2; echo "build.sh: building the test rootkit against $headers failed" >&2; exit 1; }
if [ -z "$suite" ]; then
    # The kernel mirror device and its pinning baseline (mirror-driver/kmod);
    # that script prints its build log itself when it fails.
    "$root/mirror-driver/kmod/build.sh" "$headers" "$out/kmod" \
        || { echo "build.sh: building mirror-driver/kmod against $headers failed" >&2; exit 1; }
fi
gcc -static -O2 -Wall -Wextra -o specula-marker "$here/specula-marker.c" \
    || { echo "build.sh: gcc -static failed (needs libc6-dev's libc.a)" >&2; exit 1; }
gcc -static -O2 -Wall -Wextra -Werror -o specula-forger "$here/specula-forger.c" \
    || { echo "build.sh: gcc -static of specula-forger.c failed" >&2; exit 1; }
mkdir -p introspect/{bin,dev,etc,proc,sys,tmp,root} "introspect/$(dirname "$dummy")"
printf 'root:x:0:0:root:/root:/bin/sh\nspecula:x:1000:1000:specula:/tmp:/bin/sh\n' > introspect/etc/passwd
printf 'root:x:0:\nspecula:x:1000:\n' > introspect/etc/group
cp busybox/bin/busybox introspect/bin/busybox
for applet in sh ash mount echo cat uname ps insmod rmmod lsmod sleep usleep grep kill setsid \
    ls stat readlink printf poweroff true false head tail sed awk tr wc id; do
    ln -sf busybox "introspect/bin/$applet"
done
cp specula-marker introspect/bin/specula-marker
cp specula-forger introspect/bin/specula-forger
cp "$modules_root/$dummy" "introspect/$dummy"
mkdir -p introspect/lib
cp rootkit/specula_rootkit.ko introspect/lib/
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

# The disk boot's initramfs: the virtio modules (transport, block, network, vsock) in load
# order (each after what it depends on), busybox, and an /init that mounts the root
# disk and switch_roots.
mkdir -p disk/{bin,dev,proc,sys,newroot,lib/modules}
cp busybox/bin/busybox disk/bin/busybox
for applet in sh mount umount echo cat insmod switch_root sleep grep sed; do ln -sf busybox "disk/bin/$applet"; done
# Each module's config symbol: a kernel that builds it in (=y) has no .ko for it.
for entry in drivers/virtio/virtio_ring:VIRTIO drivers/virtio/virtio:VIRTIO drivers/virtio/virtio_mmio:VIRTIO_MMIO \
    drivers/block/virtio_blk:VIRTIO_BLK net/core/failover:FAILOVER drivers/net/net_failover:NET_FAILOVER \
    drivers/net/virtio_net:VIRTIO_NET net/vmw_vsock/vsock:VSOCKETS \
    net/vmw_vsock/vmw_vsock_virtio_transport_common:VIRTIO_VSOCKETS_COMMON \
    net/vmw_vsock/vmw_vsock_virtio_transport:VIRTIO_VSOCKETS; do
    m="${entry%%:*}" symbol="CONFIG_${entry##*:}"
    f="$(module_file "$m.ko")"
    if [ -z "$f" ]; then
        grep -q "^$symbol=y" kernel/boot/config-* \
            || { echo "build.sh: $kernel_pkg has no $m.ko and does not build $symbol in" >&2; exit 1; }
        continue
    fi
    unpack_module "$f" "disk/lib/modules/$(basename "$m").ko"
    echo "$(basename "$m")" >> disk/lib/modules/order
done
touch disk/lib/modules/order
cat > disk/init <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || echo "specula-disk-initramfs: cannot load $m.ko"
done
root=/dev/vda init=/sbin/init mode=rw
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        init=*) init="${arg#init=}" ;;
        ro) mode=ro ;;
    esac
done
n=0
while [ ! -b "$root" ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
# A file system left dirty needs its journal replayed, which a read-only disk cannot
# take: mount it without the journal then, and say so.
if ! mount -t ext4 -o "$mode" "$root" /newroot && ! { [ "$mode" = ro ] \
    && echo "specula-disk-initramfs: $root needs journal recovery; mounting it read-only without the journal" \
    && mount -t ext4 -o ro,noload "$root" /newroot; }; then
    echo "specula-disk-initramfs: cannot mount $root; a shell instead"
    exec sh
fi
echo "specula-disk-initramfs: $root mounted $mode; switching to $init"
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot "$init"
INIT
chmod +x disk/init
(cd disk && find . | cpio -o -H newc --quiet | gzip -9) > "$out/disk-initramfs.cpio.gz"
echo "Linux $version -> $out/vmlinuz, $out/initramfs.cpio.gz, $out/introspect.cpio.gz, $out/disk-initramfs.cpio.gz"
