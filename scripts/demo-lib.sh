# Shared by scripts/demo.sh and scripts/demo-qemu.sh (sourced, not run): a run
# directory, the background processes to stop on exit, and the demos' helpers.
inspector=target/debug/inspector
specula=target/debug/specula
run="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT
say() { printf '\n== %s\n' "$*"; }
# A command of the specula CLI on the inspector's API, shown with its tables.
spec() { echo "\$ specula $*"; "$specula" --socket "$run/specula.sock" "$@" | cut -c1-150; }
# A request to the inspector's line socket (raw values for the demo's own scripting).
line() { "$inspector" "$@" --control-socket "$run/control.sock"; }
# Waits (30 s at most) for a line matching $2 in file $1.
wait_for() { for _ in $(seq 1500); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.02; done; echo "${0##*/}: timed out waiting for '$2'" >&2; exit 1; }
