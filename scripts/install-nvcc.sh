#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, headers) from PyPI into .venv-cuda (git-ignored) and
# prints the path of nvcc. Idempotent: a second run only checks the pinned versions are there.
# Pin 13.0: PTX from a newer compiler carries an ISA version the GPU machine's 13.0 driver may refuse.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLT_CUDA_VENV:-.venv-cuda}
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
      nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" >&2 || {
        echo "error: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
        exit 1
    }
fi
if ! "$VENV/bin/python" -m pip show -q "${PKGS[@]%%==*}" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PKGS[@]}" >&2
fi
NVCC=$(ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1)
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    echo "error: nvcc not found under $VENV after installing ${PKGS[*]}" >&2
    exit 1
fi
echo "$(cd "$(dirname "$NVCC")" && pwd)/nvcc"
