#!/usr/bin/env bash
# Builds the GPU test binary here and packs it into .gpu/ (git-ignored) for the device machine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
bin=$(cargo test --test main --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "main" and m.get("executable"):
        print(m["executable"])')
xz -T2 -6 -c "$bin" > .gpu/ringjit-tests.xz
ls -la .gpu
