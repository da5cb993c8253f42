#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain: libFuzzer (the libfuzzer-sys
# crate compiles it with the system C++ compiler) driven by LLVM's
# sanitizer-coverage instrumentation, which stable rustc enables with -C passes
# and -C llvm-args. No nightly, no cargo-fuzz. See docs/fuzzing.md.
#
#   scripts/fuzz.sh build                  build every target
#   scripts/fuzz.sh list                   the targets
#   scripts/fuzz.sh smoke [TARGET...]      FUZZ_SECONDS (default 20) s per target (CI)
#   scripts/fuzz.sh long  [TARGET...]      FUZZ_RUNS (default 10,000,000) executions per target
#   scripts/fuzz.sh run TARGET [ARGS...]   one target, extra libFuzzer arguments
#   scripts/fuzz.sh repro TARGET FILE...   replay crash files or corpus entries
#
# Corpora: fuzz/seeds/TARGET (committed, read-only seeds) and
# fuzz/corpus/TARGET (grown, ignored by git). Crashes land in
# fuzz/artifacts/TARGET/, logs in fuzz/logs/.
# The crashes the long run found (docs/fuzzing.md) are fixed; their inputs stay in
# fuzz/known-bugs/ as regression seeds (`repro` replays them).
# One fuzzing process at a time (single worker): the figures are per core.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FUZZ="$ROOT/fuzz"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN="$FUZZ/target/$TRIPLE/release"
TARGETS=(decode wire_recv line_request control_unhex cli_args boot_kernel agent_reply os_parsers qemu_state virtio_blk)

# Instrumentation for libFuzzer on stable rustc: edge coverage (level 4 = edges),
# inline 8-bit counters + PC table (libFuzzer's coverage feedback, cov/ft), and
# comparison tracing (value profile / CMP dictionary). --cfg fuzzing as cargo-fuzz
# sets it; debug assertions and overflow checks so arithmetic bugs panic.
SANCOV_FLAGS="-C passes=sancov-module \
-C llvm-args=-sanitizer-coverage-level=4 \
-C llvm-args=-sanitizer-coverage-inline-8bit-counters \
-C llvm-args=-sanitizer-coverage-pc-table \
-C llvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -C debug-assertions -C overflow-checks"

# Per-target libFuzzer options (largest input; frames carry up to 64 KiB payloads).
target_args() {
    case "$1" in
        decode | wire_recv) echo "-max_len=70000" ;;
        boot_kernel) echo "-max_len=65536 -rss_limit_mb=4096" ;;
        agent_reply) echo "-max_len=8192" ;;
        *) echo "-max_len=4096" ;;
    esac
}

build() {
    # --target keeps RUSTFLAGS off build scripts and proc macros (guest-images'
    # build script compiles the guests; it must not be instrumented).
    (cd "$FUZZ" && RUSTFLAGS="$SANCOV_FLAGS" cargo build --release --target "$TRIPLE" "$@")
}

check_target() {
    local t
    for t in "${TARGETS[@]}"; do [[ "$t" == "$1" ]] && return 0; done
    echo "unknown target '$1' (have: ${TARGETS[*]})" >&2
    exit 2
}

# fuzz_one TARGET MODE LIMIT_ARG...: runs one target, logs it, prints a summary line.
fuzz_one() {
    local target="$1" mode="$2"
    shift 2
    local corpus="$FUZZ/corpus/$target" seeds="$FUZZ/seeds/$target" artifacts="$FUZZ/artifacts/$target"
    local log="$FUZZ/logs/$target-$mode.log"
    mkdir -p "$corpus" "$artifacts" "$FUZZ/logs"
    local dirs=("$corpus")
    [[ -d "$seeds" ]] && dirs+=("$seeds")
    local start end rc=0
    start=$(date +%s)
    # shellcheck disable=SC2046 # target_args is a list of flags
    "$BIN/$target" "${dirs[@]}" $(target_args "$target") -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$@" >"$log" 2>&1 || rc=$?
    end=$(date +%s)
    local execs eps last crash
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
    crash=$(sed -n 's/^.*Test unit written to //p' "$log" | tail -1)
    printf '%-14s %-6s rc=%-3s execs=%-10s exec/s=%-8s %-22s wall=%ss%s\n' "$target" "$mode" "$rc" \
        "${execs:-?}" "${eps:-?}" "${last:-cov: ? ft: ?}" "$((end - start))" "${crash:+ CRASH: $crash}"
    return "$rc"
}

run_all() {
    local mode="$1"
    shift
    local limit=()
    case "$mode" in
        smoke) limit=(-max_total_time="${FUZZ_SECONDS:-20}") ;;
        long) limit=(-runs="${FUZZ_RUNS:-10000000}") ;;
    esac
    local targets=("$@")
    [[ ${#targets[@]} -eq 0 ]] && targets=("${TARGETS[@]}")
    local t failed=()
    for t in "${targets[@]}"; do check_target "$t"; done
    build
    for t in "${targets[@]}"; do
        fuzz_one "$t" "$mode" "${limit[@]}" || failed+=("$t")
    done
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "failed: ${failed[*]} (logs in $FUZZ/logs, inputs in $FUZZ/artifacts)" >&2
        return 1
    fi
}

case "${1:-}" in
    build) build ;;
    list) printf '%s\n' "${TARGETS[@]}" ;;
    smoke | long)
        mode="$1"
        shift
        run_all "$mode" "$@"
        ;;
    run)
        [[ $# -ge 2 ]] || { echo "usage: $0 run TARGET [libFuzzer args...]" >&2; exit 2; }
        check_target "$2"
        target="$2"
        shift 2
        build --bin "$target"
        fuzz_one "$target" run "$@"
        ;;
    repro)
        [[ $# -ge 3 ]] || { echo "usage: $0 repro TARGET FILE..." >&2; exit 2; }
        check_target "$2"
        target="$2"
        shift 2
        build --bin "$target"
        # shellcheck disable=SC2046
        exec "$BIN/$target" $(target_args "$target") -runs=1 "$@"
        ;;
    *)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
