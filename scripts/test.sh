#!/usr/bin/env bash
# The test suite: setup, formatting and lints, the Rust tests (unit + tests/main.rs, which
# include the parity tests against the numpy reference), and the reference's own self-test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export RINGJIT_PYTHON="$PWD/.venv/bin/python"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace -q
"$RINGJIT_PYTHON" tests/reference/selftest.py
echo "all tests passed"
