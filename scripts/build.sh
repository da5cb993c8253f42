#!/usr/bin/env bash
# Set-up step 2: builds the workspace (the vmm and inspector binaries, and the
# guests under target/guest-images/) and the Linux guest images from Debian packages
# (again when their sources under guest-images/linux/ changed), and a Debian root
# disk for the virtio tests (target/guest-images/debian/rootfs.img): Debian 12's 6.1
# cloud kernel in target/guest-images/linux, Debian 13's 6.12 in
# target/guest-images/linux-trixie.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --workspace --all-targets
# build_linux DIR [SUITE]: builds the Linux guest into DIR unless it is up to date.
build_linux() {
    local dir="$1" suite="${2:-}" stale=""
    local outputs="vmlinuz initramfs.cpio.gz introspect.cpio.gz disk-initramfs.cpio.gz busybox kvm-modules/kvm-amd.ko"
    # The default suite's kernel also gets the kernel mirror device (mirror-driver/kmod)
    # and the modules the L1 swaps with.
    [ -n "$suite" ] || outputs="$outputs kmod/specula_mirror.ko kmod/specula_pin_baseline.ko l1-modules/zram.ko l1-modules/tun.ko"
    for f in $outputs; do [ -f "$dir/$f" ] || stale=1; done
    for src in guest-images/linux/build.sh guest-images/linux/specula-marker.c guest-images/linux/specula-forger.c \
        guest-images/linux/rootkit/* \
        mirror-driver/kmod/* mirror-driver/kmod/baseline/*; do
        [ -n "$stale" ] || [ ! "$src" -nt "$dir/introspect.cpio.gz" ] || stale=1
    done
    if [ -n "$stale" ]; then
        guest-images/linux/build.sh "$PWD/$dir" $suite
    fi
}
build_linux target/guest-images/linux
# The Debian root disk the virtio tests boot from (again when its script changed).
rootfs=target/guest-images/debian/rootfs.img
if [ ! -f "$rootfs" ] || [ guest-images/linux/build-rootfs.sh -nt "$rootfs" ]; then
    guest-images/linux/build-rootfs.sh "$PWD/target/guest-images/debian"
fi
build_linux target/guest-images/linux-trixie trixie
# The kernel mirror device against a second kernel series (Linux 6.12's headers, from
# Debian 12 backports): built, with warnings as errors, whenever its sources change.
kmod612=target/guest-images/kmod-6.12
if [ ! -f "$kmod612/specula_mirror.ko" ] || [ -n "$(find mirror-driver/kmod -newer "$kmod612/specula_mirror.ko" -type f)" ]; then
    mirror-driver/kmod/build-backports.sh "$kmod612"
fi
