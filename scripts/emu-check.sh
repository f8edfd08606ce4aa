#!/usr/bin/env bash
# A dry run of the GPU session on this machine: builds gpu-pack/ as for the GPU machine
# (scripts/gpu-build.sh), builds the CPU emulator of the CUDA driver (scripts/build-emu.sh), and runs
# gpu-pack/gpu-check.sh against the emulator, with few property cases and the tiny bench shape. It proves
# the pack and every code path of the GPU session run to the end (no GPU figure comes from it: see
# kernels/emu/README.md), so the scarce GPU minutes are not spent on a script or wrapper bug.
# Writes gpu-pack/gpu-log.txt, the bench's JSON and gpu-pack/figures.md. Usage: bash scripts/emu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/gpu-build.sh
emu=$(bash scripts/build-emu.sh)
# (The emulator is far slower than a GPU: each executable gets 30 minutes instead of gpu-check.sh's 5.)
LD_LIBRARY_PATH="$emu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" CLT_GPU_CASES=${CLT_GPU_CASES:-4} \
    CLT_BENCH_PRESETS=tiny CLT_GPU_STEP_TIMEOUT=${CLT_GPU_STEP_TIMEOUT:-1800} bash gpu-pack/gpu-check.sh
# The bench's JSON, as the GPU session will turn it into docs/perf.md's tables.
python3 scripts/gpu-figures.py gpu-pack/bench-tiny-no-wgmma.json gpu-pack/bench-tiny-encoders.json \
    > gpu-pack/figures.md
echo "gpu-pack/figures.md: $(grep -c '^| ' gpu-pack/figures.md) table lines"
