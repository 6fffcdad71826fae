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
# stripped copies: the carry limit is 64 MiB for everything packed here
tmp=$(mktemp -d)
strip -o "$tmp/tests" "$bin"
strip -o "$tmp/ringjit" target/release/ringjit
xz -T2 -6 -c "$tmp/tests" > .gpu/ringjit-tests.xz
xz -T2 -6 -c "$tmp/ringjit" > .gpu/ringjit.xz
rm -rf "$tmp"
ls -la .gpu
