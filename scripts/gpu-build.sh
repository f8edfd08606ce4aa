#!/usr/bin/env bash
# Builds the GPU test executables and clt (whose `clt bench --cuda` is the per-kernel bench) here (no GPU
# needed; PTX embedded) and packs them, stripped,
# with scripts/gpu-check.sh into gpu-pack/ (git-ignored, kept under 64 MiB) for the GPU machine, which has
# no Rust toolchain. Then, on the GPU machine: `bash gpu-pack/gpu-check.sh` (see docs/cuda.md).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=$(bash scripts/install-nvcc.sh)
export NVCC CLT_DENY_SPILLS=1 CLT_PTXAS_REPORT="$PWD/target/ptxas-report.txt"

rm -rf gpu-pack
mkdir -p gpu-pack/bin
# Test executables: the CUDA property tests and the library's unit tests (FFI layout) with the feature.
cargo test --release --features cuda --lib --test cuda --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' > gpu-pack/tests.txt
while read -r name exe; do
    cp "$exe" "gpu-pack/bin/test-$name"
done < gpu-pack/tests.txt
# The command line: `clt bench --cuda` (the per-kernel bench, the same code as `cargo bench --bench cuda`)
# and `clt train --backend cuda`.
cargo build --release --features cuda --bin clt
cp target/release/clt gpu-pack/bin/clt
strip gpu-pack/bin/* 2>/dev/null || true
cp scripts/gpu-check.sh gpu-pack/
cp target/ptxas-report.txt gpu-pack/
git rev-parse HEAD > gpu-pack/COMMIT 2>/dev/null || echo unknown > gpu-pack/COMMIT
size=$(du -sb gpu-pack | cut -f1)
echo "gpu-pack: $((size / 1024 / 1024)) MiB"
ls -la gpu-pack gpu-pack/bin
if [ "$size" -ge $((64 * 1024 * 1024)) ]; then
    echo "error: gpu-pack is over 64 MiB" >&2
    exit 1
fi
