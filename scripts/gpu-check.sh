#!/usr/bin/env bash
# Runs every GPU check of gpu-pack/ in one go on the GPU machine and writes gpu-pack/gpu-log.txt, or, when
# $OUT is set (the device tool), $OUT/gpu-log.txt as it goes: a run cut off by the tool's time limit still
# brings back everything logged until then. The tests run with CLT_REQUIRE_GPU=1: a missing driver or
# device fails them instead of skipping. Usage: bash gpu-pack/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")"
LOG=gpu-log.txt
if [ -n "${OUT:-}" ]; then
    LOG="$OUT/gpu-log.txt"
fi
# The bench's figures as JSON (`clt bench --cuda --json`), beside the log: scripts/gpu-figures.py turns them
# into docs/perf.md's tables.
FIGS=$(dirname "$LOG")
{
    echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "== commit: $(cat COMMIT 2>/dev/null)"
    echo "== device:"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
} > "$LOG"
# cuBLAS (the dense baseline) is opened at run time: put the toolkit's library folder on the loader path when
# the system's cache does not list it.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
    for lib in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/local/cuda-*/lib64 /usr/lib/*/; do
        if ls "$lib"/libcublas.so* >/dev/null 2>&1; then
            export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            break
        fi
    done
fi
echo "== cuBLAS: $( (ldconfig -p 2>/dev/null | grep -m1 'libcublas\.so') || echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}")" >> "$LOG"
status=0
export CLT_REQUIRE_GPU=1 CLT_GPU_CASES=${CLT_GPU_CASES:-64}
# Each executable runs under a time limit, so that a hang costs its own minutes, not the bench's: the
# device tool's call is cut off at its own limit, and the figures come last. (A test's name is printed
# before it runs, so the log names the one that hung.)
limit=${CLT_GPU_STEP_TIMEOUT:-300}
# A step's header in the log, with the seconds since the script began (to plan the next session's time).
step() {
    echo "== [${SECONDS} s] $*" | tee -a "$LOG"
}
run_limited() {
    run_within "$limit" "$@"
}
# The same under a limit of $1 seconds.
run_within() {
    local within=$1
    shift
    timeout -k 10 "$within" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "== timed out after $within s: $*" | tee -a "$LOG"
    fi
    return "$rc"
}
# The Hopper wgmma encoders (hand-encoded descriptors, tensor maps, mbarriers: the kernels most likely to
# fail on their first GPU run) run last, in processes of their own: a fault poisons its process's CUDA
# context, and every later test or row in that process would fail with it. (encode_wgmma_tma's mbarrier
# waits trap after 2 s, so a hang there costs seconds, not the step's time limit.)
for t in bin/test-*; do
    step "$t (all but wgmma)"
    filter=()
    # The library's unit tests: only the CUDA ones (the others need ../shared, and ran in CI).
    [ "$t" = bin/test-clt ] && filter=(backend::cuda)
    if ! run_limited "$t" --test-threads=1 --skip wgmma "${filter[@]}"; then
        status=1
    fi
done
# The per-kernel bench (`clt bench --cuda`): the small shape, then the Llama-3.2-1B shape
# (CLT_BENCH_PRESETS overrides the list: scripts/emu-check.sh runs "tiny" on the CPU emulator).
presets=${CLT_BENCH_PRESETS:-small large}
for preset in $presets; do
    step "bin/clt bench --cuda --preset $preset --cuda-rows no-wgmma"
    if ! run_limited bin/clt bench --cuda --preset "$preset" --cuda-rows no-wgmma \
        --json "$FIGS/bench-$preset-no-wgmma.json"; then
        status=1
    fi
done
if [ -x bin/test-cuda ]; then
    step "bin/test-cuda wgmma"
    if ! run_limited bin/test-cuda --test-threads=1 wgmma; then
        status=1
    fi
fi
for preset in $presets; do
    step "bin/clt bench --cuda --preset $preset --cuda-rows encoders"
    if ! run_limited bin/clt bench --cuda --preset "$preset" --cuda-rows encoders \
        --json "$FIGS/bench-$preset-encoders.json"; then
        status=1
    fi
done
# Last, in whatever time is left: compute-sanitizer (installed on the GPU machine's image, seen working
# under its Firecracker runtime) over tests/cuda.rs with 2 cases a property: memcheck (out-of-bounds and
# misaligned accesses, on the hardware's own addressing) and racecheck (shared-memory hazards between a
# block's threads) over every kernel but the wgmma encoders, then memcheck over those. The emulator checks
# the same things its own way; this is the hardware's view. Each pass has 120 s (CLT_GPU_SANITIZER_TIMEOUT);
# a pass cut off by it does not fail the run.
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -z "$san" ]; then
    step "compute-sanitizer: not found, skipped"
elif [ -x bin/test-cuda ]; then
    san_limit=${CLT_GPU_SANITIZER_TIMEOUT:-120}
    for pass in "memcheck --skip wgmma" "racecheck --skip wgmma" "memcheck wgmma"; do
        set -- $pass
        tool=$1
        shift
        step "compute-sanitizer --tool $tool bin/test-cuda $* (CLT_GPU_CASES=2)"
        CLT_GPU_CASES=2 run_within "$san_limit" "$san" --tool "$tool" --error-exitcode 99 \
            bin/test-cuda --test-threads=1 "$@"
        rc=$?
        # (A pass cut off by its limit is incomplete, not failed: the log says which.)
        if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ]; then
            status=1
        fi
    done
fi
step "exit status: $status"
exit $status
