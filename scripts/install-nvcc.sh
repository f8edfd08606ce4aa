#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, headers) from PyPI into .venv-cuda (git-ignored) and
# prints the path of nvcc. Idempotent: a second run only checks that the pinned set is there.
# Pin 13.0: PTX from a newer compiler carries an ISA version the GPU machine's 13.0 driver may refuse.
# A virtual environment when python3-venv is available, else `pip install --target` into the same folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLT_CUDA_VENV:-.venv-cuda}
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
      nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88)
STAMP="$VENV/.pinned"

find_nvcc() {
    ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1 || true
}

NVCC=$(find_nvcc)
if [ -z "$NVCC" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PKGS[*]}" ]; then
    if [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PKGS[@]}" >&2
    else
        rm -rf "$VENV"
        target="$VENV/lib/python3/site-packages"
        pip=(python3 -m pip)
        "${pip[@]}" --version >/dev/null 2>&1 || pip=(pip3)
        "${pip[@]}" install -q --disable-pip-version-check --target "$target" "${PKGS[@]}" >&2 ||
            "${pip[@]}" install -q --disable-pip-version-check --break-system-packages --target "$target" \
                "${PKGS[@]}" >&2
    fi
    echo "${PKGS[*]}" > "$STAMP"
    NVCC=$(find_nvcc)
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    echo "error: nvcc not found under $VENV after installing ${PKGS[*]}" >&2
    exit 1
fi
echo "$(cd "$(dirname "$NVCC")" && pwd)/nvcc"
