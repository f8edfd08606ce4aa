#!/usr/bin/env bash
# Installs what tests/viewer.rs drives: Debian's headless-capable Chromium and its WebDriver (chromedriver).
# Idempotent and quiet: does nothing when both are already on PATH. Needs root (CI runs as root) on Debian.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: chromium and chromedriver are missing and this is not a Debian system; install them" \
         "(or set CHROMIUM and CHROMEDRIVER for tests/viewer.rs)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "== installing chromium and chromium-driver (apt-get)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
