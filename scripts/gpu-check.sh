#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there) from binaries built here:
#   cargo test --test main --no-run --message-format=json  →  the test binary
#   scripts/gpu-pack.sh packs it (xz) into .gpu/ for the device tool's `carry`.
# It runs every GPU test, then prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/bin
for f in .gpu/*.xz; do [ -e "$f" ] && xz -dkc "$f" > ".gpu/bin/$(basename "${f%.xz}")"; done
chmod +x .gpu/bin/* 2>/dev/null
card=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "card: ${card:-none}"
log=$(mktemp)
.gpu/bin/ringjit-tests gpu:: --test-threads=1 --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
echo
echo "== ringjit gpu-check =========================================="
printf '%-50s %s\n' "card" "${card:-none}"
grep -E '^test gpu::' "$log" | sed -E 's/^test (gpu::[a-z0-9_]+) \.\.\. (.*)$/\1 \2/' | while read -r name res; do
  printf '%-50s %s\n' "$name" "$res"
done
grep -E '^gpu ' "$log" | sed 's/^/  /'
exit $status
