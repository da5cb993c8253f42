#!/usr/bin/env bash
# Set-up step 1: the Debian packages Specula's build, tests and benchmarks use.
#   qemu-system-x86  the live Linux guest for introspection tests, and the benchmark baseline
#   busybox-static, cpio, gzip  the Linux guest's initramfs images (guest-images/linux/build.sh)
#   libc6-dev        glibc's static libc.a, for the introspection guest's specula-marker (gcc -static)
#   curl             the README's API examples, which a test runs
#   python3          the Python client (clients/python) and its live test suite
#   python3-venv     target/python-tools, the pinned Volatility 3 (scripts/python-tools.sh)
#   linux-headers-cloud-amd64, make  the test rootkit (guest-images/linux/rootkit), a kernel
#                    module built against the guest kernel's headers
#   xz-utils         Debian 13's kernel modules are .ko.xz
#   yara             the benchmark's baseline for YARA scans (the command-line tool)
#   dwarves          pahole: module BTF when the kernel mirror device is built against
#                    Linux 6.12's headers (mirror-driver/kmod/build-backports.sh)
#   iproute2         `ip`: the virtio-net unit tests put an address on the tap they create
#   socat            the virtio-vsock test's client and server in the nest's L1 (AF_VSOCK)
#   mmdebstrap, e2fsprogs  the Debian root disk of the virtio tests (guest-images/linux/build-rootfs.sh:
#                    a root file system from Debian packages, then mkfs.ext4 -d; debugfs reads it back)
# The Rust toolchain (stable cargo/rustc) and gcc are expected to be installed already.
set -euo pipefail
packages=(qemu-system-x86 busybox-static cpio gzip libc6-dev curl python3 python3-venv linux-headers-cloud-amd64 make xz-utils yara dwarves mmdebstrap e2fsprogs iproute2 socat)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "install-deps.sh: cargo is missing (install a stable Rust toolchain)" >&2; exit 1; }
command -v gcc >/dev/null || { echo "install-deps.sh: gcc is missing" >&2; exit 1; }
echo "install-deps.sh: ${packages[*]} installed"
