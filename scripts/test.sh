#!/usr/bin/env bash
# Runs every test: unit tests beside the code and the end-to-end tests in
# integration-tests/ (real binaries on /dev/kvm). The binaries are rebuilt first
# because the end-to-end tests run them as processes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --workspace --all-targets
cargo test --workspace "$@"
