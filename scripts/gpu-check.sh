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
run_limited() {
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "== timed out after $limit s: $*" | tee -a "$LOG"
    fi
    return "$rc"
}
for t in bin/test-*; do
    echo "== $t" | tee -a "$LOG"
    filter=()
    # The library's unit tests: only the CUDA ones (the others need ../shared, and ran in CI).
    [ "$t" = bin/test-clt ] && filter=(backend::cuda)
    if ! run_limited "$t" --test-threads=1 "${filter[@]}"; then
        status=1
    fi
done
# The per-kernel bench (`clt bench --cuda`): the small shape, then the Llama-3.2-1B shape
# (CLT_BENCH_PRESETS overrides the list: scripts/emu-check.sh runs "tiny" on the CPU emulator).
for preset in ${CLT_BENCH_PRESETS:-small large}; do
    echo "== bin/clt bench --cuda --preset $preset" | tee -a "$LOG"
    if ! run_limited bin/clt bench --cuda --preset "$preset"; then
        status=1
    fi
done
echo "== exit status: $status" | tee -a "$LOG"
exit $status
