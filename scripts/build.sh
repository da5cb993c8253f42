#!/usr/bin/env bash
# Set-up step 2: builds the workspace (the vmm and inspector binaries, and the
# guests under target/guest-images/) and the Linux guest image from Debian packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --workspace --all-targets
if [ ! -f target/guest-images/linux/vmlinuz ] || [ ! -f target/guest-images/linux/initramfs.cpio.gz ]; then
    guest-images/linux/build.sh
fi
