#!/usr/bin/env bash
# Everything README.md's commands need on a fresh machine: Debian packages, the
# workspace and its guests, the Linux guest image. Quick when already done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/install-deps.sh
scripts/build.sh
scripts/python-tools.sh
