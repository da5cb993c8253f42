# Shared by scripts/demo.sh and scripts/demo-qemu.sh (sourced, not run): a run
# directory, the background processes to stop on exit, and the demos' helpers.
inspector=target/debug/inspector
run="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT
say() { printf '\n== %s\n' "$*"; }
# A request to the inspector's control socket, shown with its reply.
ask() { echo "\$ inspector $*"; "$inspector" "$@" --control-socket "$run/control.sock" | cut -c1-150; }
# Waits (30 s at most) for a line matching $2 in file $1.
wait_for() { for _ in $(seq 1500); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done; echo "${0##*/}: timed out waiting for '$2'" >&2; exit 1; }
