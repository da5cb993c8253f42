#!/usr/bin/env bash
# The main job's second mode (scripts/demo.sh qemu): a real Linux guest under an
# unmodified QEMU is inspected through QMP and QEMU's own memfd RAM, read-only.
#
#   1. QEMU (TCG) boots Debian's cloud kernel with memfd RAM and an initramfs whose
#      init starts marker processes and prints its own ground truth;
#   2. an inspector attaches with --qemu-qmp and maps all guest RAM read-only;
#   3. the agent computes OS views (kernel, processes, modules, a syscall-table check)
#      from guest RAM alone, and finds the kernel's banner and a marker process's secret, at the
#      physical address the guest itself reports (its pagemap);
#   4. the inspector stops and resumes QEMU (stop/cont) and sees the events;
#   5. QEMU is killed; the inspector keeps serving the last contents.
# Needs scripts/setup.sh (scripts/demo.sh runs it first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
linux=target/guest-images/linux
source scripts/demo-lib.sh
hex() { printf '%s' "$1" | od -An -tx1 | tr -d ' \n'; }
# Text up to the first NUL, unprintable bytes shown as '.'.
ascii() { python3 -c 'import sys; b = bytes.fromhex(sys.argv[1]).split(b"\0")[0]; print("".join(chr(c) if 32 <= c < 127 else "." for c in b))' "$1"; }
console() { echo "$1" > "$run/console.in"; }

say "source: QEMU (TCG) boots Linux $(cat $linux/kernel-version) with 512 MiB of memfd RAM"
mkfifo "$run/console.in" "$run/console.out"
qemu-system-x86_64 -accel tcg -nodefaults -nographic -display none -m 512M \
    -object memory-backend-memfd,id=ram0,size=512M,share=on -machine pc,memory-backend=ram0 \
    -kernel $linux/vmlinuz -initrd $linux/introspect.cpio.gz -append "console=ttyS0 panic=-1 loglevel=4" \
    -serial pipe:"$run/console" -qmp unix:"$run/qmp.sock",server=on,wait=off -no-reboot &
pids+=($!)
qemu=$!
exec 3<>"$run/console.in"
(sed -u 's/\r//g' < "$run/console.out" | tee "$run/console.log" | sed -u 's/^/[linux]     /') &
pids+=($!)
wait_for "$run/console.log" "=== specula ground truth end ==="
marker_line=$(grep '^marker ' "$run/console.log" | head -1)
pid=$(sed 's/.* pid=\([0-9]*\).*/\1/' <<<"$marker_line")
vaddr=$(sed 's/.* vaddr=\(0x[0-9a-f]*\).*/\1/' <<<"$marker_line")
secret=$(sed 's/.* text=\([^ ]*\).*/\1/' <<<"$marker_line")

say "inspector: attach to QEMU through QMP, map all guest RAM read-only (no change to QEMU)"
"$inspector" --qemu-qmp "$run/qmp.sock" --all --api-socket "$run/specula.sock" --control-socket "$run/control.sock" --serial null \
    > >(tee "$run/inspector.log" | sed -u 's/^/[inspector] /') 2>&1 &
pids+=($!)
wait_for "$run/inspector.log" "agent ready"
spec status
spec grants
spec vcpus

say "OS views computed in the agent from guest RAM alone (VMCOREINFO, kallsyms, BTF; no symbol files)"
spec kernel
echo "\$ specula ps   (kernel threads, children of kthreadd, left out)"
"$specula" --socket "$run/specula.sock" ps | awk 'NR == 1 || $2 != 2' | cut -c1-150
spec lsmod
spec check-syscalls
spec checks || echo "(the checks found something: exit status $?)"

say "the agent finds the kernel's banner in guest RAM"
hits=$(line scan 0x100000 0x1ff00000 "$(hex 'Linux version ')" | sed 's/.*gpas=//; s/,/ /g')
for gpa in $hits; do
    # The first copy that reads as the whole banner (others sit in compressed or freed data).
    text=$(ascii "$(line read "$gpa" 160)")
    if [[ "$text" == *"(gcc"*"#1 SMP"* ]]; then
        echo "banner at $gpa: $text"
        break
    fi
done

say "the marker process $pid holds '$secret' at virtual $vaddr; the guest's pagemap says where"
console "dd if=/proc/$pid/pagemap bs=8 skip=\$(($vaddr / 4096)) count=1 2>/dev/null | od -An -tx8 > /tmp/pm; echo pagemap \$(cat /tmp/pm)"
wait_for "$run/console.log" "^pagemap "
entry=$(grep '^pagemap ' "$run/console.log" | tail -1 | awk '{print $2}')
physical=$(printf '%#x' $(( ((0x$entry & ((1 << 55) - 1)) << 12) + (vaddr & 0xfff) )))
echo "guest: physical address $physical"
spec scan 0x100000 0x1ff00000 "$secret"
echo "read $physical: $(ascii "$(line read "$physical" ${#secret})")"

say "the inspector stops QEMU's vCPUs (QMP stop) and lets them run again (cont)"
spec pause
spec resume
spec status
sleep 0.3

say "QEMU is killed; the inspector keeps serving the last contents"
kill -9 "$qemu"
wait_for "$run/inspector.log" "source gone"
spec status
echo "read $physical: $(ascii "$(line read "$physical" ${#secret})")"
say "done"
