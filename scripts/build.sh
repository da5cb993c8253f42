#!/usr/bin/env bash
# Set-up step 2: builds the workspace (the vmm and inspector binaries, and the
# guests under target/guest-images/) and the Linux guest images from Debian packages
# (again when guest-images/linux/build.sh or specula-marker.c changed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --workspace --all-targets
linux=target/guest-images/linux
if [ ! -f $linux/vmlinuz ] || [ ! -f $linux/initramfs.cpio.gz ] || [ ! -f $linux/introspect.cpio.gz ] \
    || [ guest-images/linux/build.sh -nt $linux/introspect.cpio.gz ] \
    || [ guest-images/linux/specula-marker.c -nt $linux/introspect.cpio.gz ]; then
    guest-images/linux/build.sh
fi
