#!/usr/bin/env bash
# The main job: a paired source + inspector on the built-in guests.
#
#   1. a source vmm boots source-workload (2 vCPUs) and serves the mirror device;
#   2. an inspector attaches, maps all of the source's RAM read-only into its
#      agent VM, and keeps an integrity watch on the workload's kernel text;
#   3. the demo asks the agent to read, hash and scan the source's memory;
#   4. the workload modifies its kernel text: the watch reports it as it happens;
#   5. the source discards a page and revokes a grant (the inspector unmaps it;
#      a holder that ignored it would keep only a dead snapshot);
#   6. the source exits; the inspector keeps serving the rest.
#
# `scripts/demo.sh qemu` is the second mode: the source is a real Linux guest under an
# unmodified QEMU (TCG, memfd RAM), and the inspector attaches to it through QMP.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
if [ "${1:-}" = "qemu" ]; then
    exec scripts/demo-qemu.sh
fi
vmm=target/debug/vmm
source scripts/demo-lib.sh
mkfifo "$run/com1"
exec 3<>"$run/com1"

api() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall((sys.argv[2]+"\n").encode()); print(s.makefile().readline().strip())' "$run/api.sock" "$1"; }

say "source: vmm + source-workload, 2 vCPUs, 256 MiB, mirror device on $run/mirror.sock"
"$vmm" --kernel target/guest-images/source-workload.elf --memory 256M --cpus 2 \
    --mirror-socket "$run/mirror.sock" --api-socket "$run/api.sock" <&3 \
    > >(tee "$run/source.log" | sed -u 's/^/[source]    /') 2>&1 &
pids+=($!)
wait_for "$run/source.log" "workload: ready"

say "inspector: attach, map all source RAM read-only, watch the kernel text (0x1010000+256K)"
"$inspector" --source-socket "$run/mirror.sock" --all --api-socket "$run/specula.sock" \
    --watch 0x1010000:0x40000 --watch-interval-ms 100 \
    > >(tee "$run/inspector.log" | sed -u 's/^/[inspector] /') 2>&1 &
pids+=($!)
wait_for "$run/inspector.log" "baseline taken"

say "the agent reads, hashes and scans source memory through its read-only window"
spec status
spec read 0x1000000 32
spec hash 0x1010000 0x40000
spec scan 0x1000000 0x100000 sshd
spec vcpus

say "the source workload modifies its kernel text"
echo "text-modify 4096" >&3
wait_for "$run/inspector.log" "integrity watch 0:"
sleep 0.3
spec watch list
spec watch findings 0

say "the source VMM discards a page; the inspector reads zeros there"
echo "source api: discard 0x1100000 4096 -> $(api 'discard 0x1100000 4096')"
spec read 0x1100000 16

say "the source revokes the grant holding 0x1800000: the chunk is re-homed, old fds see a dead snapshot"
grant=$(api grants | tr ' ' '\n' | awk -F: '$2 == "0x1800000" { print $1 }')
echo "source api: revoke $grant -> $(api "revoke $grant")"
spec read 0x1800000 16 || true

say "the source exits; the inspector keeps serving the last contents"
echo "exit 0" >&3
wait_for "$run/inspector.log" "source gone"
spec status
spec read 0x1000000 16
say "done"
