#!/usr/bin/env bash
# Runs every test: unit tests beside the code and the end-to-end tests in
# integration-tests/ (real binaries on /dev/kvm). The binaries are rebuilt first
# because the end-to-end tests run them as processes. Ends with one line that
# totals every test target: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
