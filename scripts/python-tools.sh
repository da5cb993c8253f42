#!/usr/bin/env bash
# Set-up step 3: the Python tools the tests run against live guests, pinned, in a
# virtual environment at target/python-tools (quick when already there):
#   volatility3  Volatility 3, through Specula's specula:// layer (clients/python/volatility)
#   pefile       Volatility 3's one required dependency
#   drgn         opens `specula dump` ELF cores (kallsyms through VMCOREINFO)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=target/python-tools
requirements=(volatility3==2.26.2 pefile==2024.8.26 drgn==0.3.0)
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${requirements[*]}" ]; then
    exit 0
fi
rm -rf "$venv"
/usr/bin/python3 -m venv "$venv" \
    || { echo "python-tools.sh: python3 -m venv failed (scripts/install-deps.sh installs python3-venv)" >&2; exit 1; }
"$venv/bin/pip" install --quiet --disable-pip-version-check "${requirements[@]}"
echo "${requirements[*]}" > "$stamp"
echo "python-tools.sh: ${requirements[*]} in $venv"
