#!/usr/bin/env bash
# The project's one test command (README.md, .ci/run): installs what the tests need, then runs formatting,
# clippy with warnings denied, and the whole test suite in release mode (the training tests need the speed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared ]; then
    echo "error: ../shared (models, references, corpus) is missing; the tests need it" >&2
    exit 1
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The viewer's browser test (tests/viewer.rs) drives headless Chromium through chromedriver.
bash scripts/install-browser.sh

echo "== Open MPI and libclang (the mpi feature's build and tests)"
bash scripts/install-mpi.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings denied)"
cargo clippy --all-targets --release -- -D warnings
cargo clippy --all-targets --release --features mpi -- -D warnings
# One release build for the whole suite: with the mpi feature, so tests/mpi.rs runs under mpirun -n 2 and 3
# (every other test is the same with or without it; clippy above checks the build without it).
echo "== cargo test --release --features mpi"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo test --release --features mpi

# The CUDA backend: install the pinned compiler, compile every kernel to PTX (build.rs), record ptxas -v
# (registers, spills) per kernel in target/ptxas-report.txt and fail if any kernel spills; clippy and the
# CUDA tests with the feature (without a GPU they check the no-driver error, and the GPU property tests print
# that they were skipped).
echo "== CUDA: kernels, ptxas report, clippy and tests with --features cuda"
NVCC=$(bash scripts/install-nvcc.sh)
export NVCC CLT_DENY_SPILLS=1 CLT_PTXAS_REPORT="$PWD/target/ptxas-report.txt"
cargo clippy --all-targets --release --features cuda -- -D warnings
# (build.rs writes the report whenever it compiles the kernels; if they were up to date, take the last one.)
[ -f target/ptxas-report.txt ] || cp "$(ls -t target/release/build/clt-*/out/ptxas-report.txt | head -n1)" target/ptxas-report.txt
cat target/ptxas-report.txt
if grep -E "spill (stores|loads)" target/ptxas-report.txt | grep -vqE "0 bytes spill stores, 0 bytes spill loads"; then
    echo "error: a CUDA kernel spills registers (target/ptxas-report.txt)" >&2
    exit 1
fi
# (The FFI layout is checked at compile time by the clippy build above; its unit test runs on the GPU machine.)
cargo test --release --features cuda --test cuda -- --nocapture
# The same tests again on the CPU emulator of the CUDA driver (kernels/emu/README.md): every kernel compiled
# as host C++ and run, block by block with each thread a fiber, through the unchanged cudarc backend; with
# CLT_REQUIRE_GPU=1 they fail rather than skip if the emulator is not the driver they find. Then the bench's
# code paths (`clt bench --cuda --preset tiny`; its times on the emulator mean nothing).
echo "== CUDA on the CPU emulator: the kernel tests and the bench's code paths"
emu=$(bash scripts/build-emu.sh)
LD_LIBRARY_PATH="$emu" CLT_REQUIRE_GPU=1 cargo test --release --features cuda --test cuda -- --nocapture
# The emulator defers each stream's work until something waits for it (a missing wait between the copy and
# compute streams fails above); side-first runs the side streams' work as early as their waits allow
# instead (a copy that overwrites what queued compute work has yet to read fails here).
LD_LIBRARY_PATH="$emu" CLT_EMU_STREAMS=side-first CLT_REQUIRE_GPU=1 cargo test --release --features cuda --test cuda
# As a device of compute capability 8.0: the wgmma encoders are refused with a typed error (the trainer
# test checks it) and their kernel tests say they skip.
LD_LIBRARY_PATH="$emu" CLT_EMU_CC=8.0 CLT_REQUIRE_GPU=1 cargo test --release --features cuda --test cuda wgmma -- --nocapture
LD_LIBRARY_PATH="$emu" cargo run --release --features cuda --bin clt -- bench --cuda --preset tiny \
    --json target/bench-cuda-tiny.json
# Its JSON record, as docs/perf.md's tables (scripts/gpu-figures.py: what the GPU session's figures go through).
python3 scripts/gpu-figures.py --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    target/bench-cuda-tiny.json > target/bench-cuda-tiny.md
for row in "| sparse decode, tiled |" "| ↳ tiled, in batch order |" "| resident step (+ clip, Adam) |" "- dense / sparse step time"; do
    grep -qF -- "$row" target/bench-cuda-tiny.md || { echo "gpu-figures: no '$row' in target/bench-cuda-tiny.md" >&2; exit 1; }
done

# NCCL bootstrapped by MPI (dist::nccl) exists only with both features: clippy, and its test (without a GPU
# it checks the clear error; with one, a one-rank all-reduce).
echo "== NCCL: clippy and test with --features cuda,mpi"
cargo clippy --all-targets --release --features cuda,mpi -- -D warnings
cargo test --release --features cuda,mpi --test nccl --test dist_cuda -- --nocapture
# ... and on the CPU emulator, whose libnccl.so sums between processes: one rank, and two under mpirun; and
# data-parallel training on the CUDA step (cuda-host), two ranks under mpirun against one process.
LD_LIBRARY_PATH="$emu" CLT_REQUIRE_GPU=1 cargo test --release --features cuda,mpi --test nccl --test dist_cuda -- --nocapture
# The trainer's NCCL sums (on a stream of their own with overlap) with the side streams first.
LD_LIBRARY_PATH="$emu" CLT_EMU_STREAMS=side-first CLT_REQUIRE_GPU=1 cargo test --release --features cuda,mpi \
    --test dist_cuda -- ranks_on_cuda_host the_resident_loop
