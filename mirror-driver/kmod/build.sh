#!/usr/bin/env bash
# Builds the Specula kernel modules against a kernel's headers:
#
#   mirror-driver/kmod/build.sh HEADERS_DIR OUT_DIR [MAKE_ARG...]
#
# HEADERS_DIR is a configured kernel tree or a linux-headers package
# (/usr/src/linux-headers-$(uname -r), /lib/modules/$(uname -r)/build). The
# build runs in a scratch copy, so this tree stays clean; it fails with the
# build log on any error and on any warning (compiler or modpost). On success
# OUT_DIR holds specula_mirror.ko (the kernel mirror device) and
# specula_pin_baseline.ko (the pinning baseline). MAKE_ARGs go to make, e.g.
# W=1 for the extra warnings.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 HEADERS_DIR OUT_DIR [MAKE_ARG...]" >&2; exit 2; }
headers="$1"
out="$2"
shift 2
[ -f "$headers/Makefile" ] || { echo "kmod/build.sh: $headers is not a kernel build tree (no Makefile)" >&2; exit 1; }
command -v make >/dev/null || { echo "kmod/build.sh: missing make" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/Kbuild" "$here"/*.c "$here"/*.h "$work/"
mkdir "$work/baseline"
cp "$here/baseline/specula_pin_baseline.c" "$work/baseline/"

log="$work/build.log"
if ! make -s -C "$headers" M="$work" "$@" modules >"$log" 2>&1; then
    cat "$log" >&2
    echo "kmod/build.sh: building the Specula modules against $headers failed" >&2
    exit 1
fi
if grep -qi "warning:" "$log"; then
    cat "$log" >&2
    echo "kmod/build.sh: the build against $headers has warnings (treated as errors)" >&2
    exit 1
fi
mkdir -p "$out"
cp "$work/specula_mirror.ko" "$work/specula_pin_baseline.ko" "$out/"
