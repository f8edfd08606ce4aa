#!/usr/bin/env bash
# Installs what the `mpi` feature needs to build and its tests need to run: Open MPI (library, headers,
# mpirun) and libclang (rsmpi generates its bindings with bindgen), from Debian's packages. Idempotent: does
# nothing when they are already there. Needs root (CI runs as root) and fails loudly otherwise.
set -euo pipefail

have() {
    command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 &&
        ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1
}

if have; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: Open MPI and libclang are missing and installing them needs root:" >&2
    echo "       apt-get install libopenmpi-dev openmpi-bin libclang-dev clang" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends libopenmpi-dev openmpi-bin libclang-dev clang >/dev/null
if ! have; then
    echo "error: Open MPI or libclang still missing after apt-get install" >&2
    exit 1
fi
echo "installed Open MPI $(mpirun --version 2>/dev/null | head -1) and libclang"
