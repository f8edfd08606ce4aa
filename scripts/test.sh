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
