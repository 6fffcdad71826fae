#!/usr/bin/env bash
# Builds the GPU test binary and the release CLI here and packs them (xz) into .gpu/
# (git-ignored) for the device machine, which has no Rust: run there with
#   carry: [".gpu", ".whl"]   command: scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
bin=$(cargo test --test main --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "main" and m.get("executable"):
        print(m["executable"])')
cargo build --release --bin ringjit
xz -T2 -6 -c "$bin" > .gpu/ringjit-tests.xz
xz -T2 -6 -c target/release/ringjit > .gpu/ringjit.xz
ls -la .gpu
