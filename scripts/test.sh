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

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings denied)"
cargo clippy --all-targets --release -- -D warnings
echo "== cargo test --release"
cargo test --release
