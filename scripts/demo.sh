#!/usr/bin/env bash
# The main job: boots Specula's built-in guests on /dev/kvm with the vmm.
#   1. hello on 2 vCPUs, exiting with status 7 (the vmm's exit code becomes 7);
#   2. source-workload on 2 vCPUs, driven over COM1: modify its kernel text, then exit.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
vmm=target/debug/vmm
[ -x "$vmm" ] || { echo "demo.sh: $vmm is missing: run scripts/build.sh first" >&2; exit 1; }

echo "== hello, 2 vCPUs, exit=7"
"$vmm" --kernel target/guest-images/hello.elf --memory 64M --cpus 2 --cmdline "exit=7"
echo "== vmm exit code: $?"

echo "== source-workload, 2 vCPUs, driven over COM1"
{ sleep 1; echo "text-modify 4096"; sleep 0.5; echo "reuse-pages 8"; sleep 0.5; echo "exit 0"; sleep 1; } |
    "$vmm" --kernel target/guest-images/source-workload.elf --memory 128M --cpus 2
echo "== vmm exit code: $? (1: the workload saw its kernel text modified)"
