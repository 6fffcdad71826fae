#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there) from binaries built on the development machine:
#   scripts/gpu-pack.sh  builds the test binary and the release CLI and packs them (xz) into
#                        .gpu/, which the device tool's `carry` takes along.
# Then, in one call:  scripts/gpu-check.sh [parts]   (parts: a comma list of
#   route      Ring-mini decode b1/b8/b16 with the routing kernels apart, then folded
#   tests      every GPU test (GPU_TESTS=<filter> for some): each kernel alone against ir::kernel_eval, the tiny and small
#              models against the interpreter (f32/bf16/fp8 tiers), greedy generation,
#              prefill+decode = forward
#   sanitizer  compute-sanitizer memcheck of `ringjit forward --device cuda` on the tiny model
#   bench      `ringjit bench --device cuda` on Ring-mini (random bf16 weights made on the GPU)
#   ab         the same bench by .gpu/ringjit-base.xz (a release CLI of another commit, packed by
#              hand), right after, on the same card: before/after figures of one change
#   fold       decode with each RMSNorm folded into its GEMM (RINGJIT_FOLD_NORM=1, off on cuda by
#              default): compute-sanitizer memcheck of small decode b40, then the Ring-mini bench
#              (compare with `bench`: the same binary with the norms apart)
#   baseline   bench/torch_ring.py (strong PyTorch Ring-mini) and bench/kernels.py (torch.matmul,
#              SDPA, fla) on the same card; needs `.whl` carried too
# default: tests,sanitizer,bench,baseline). Full logs and JSON go to $OUT (or out/); a short
# table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=",${1:-tests,sanitizer,bench,baseline},"
out=${OUT:-out}
mkdir -p "$out" .gpu/bin
for f in .gpu/*.xz; do [ -e "$f" ] && xz -dkc "$f" > ".gpu/bin/$(basename "${f%.xz}")"; done
chmod +x .gpu/bin/* 2>/dev/null
card=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
echo "card: ${card:-none}"
summary=$(mktemp)
say() { echo "$*" >> "$summary"; }

if [[ $parts == *,tests,* ]]; then
  log="$out/tests.log"
  .gpu/bin/ringjit-tests "${GPU_TESTS:-gpu::}" --test-threads=1 --nocapture 2>&1 | tee "$log"
  st=${PIPESTATUS[0]}
  say "== tests (exit $st)"
  grep -E '^test gpu::' "$log" | sed -E 's/^test (gpu::[a-z0-9_]+) \.\.\. (.*)$/  \1 \2/' >> "$summary"
  grep -E '^gpu ' "$log" | sed 's/^/    /' >> "$summary"
  grep -E "panicked at|^thread '" -A3 "$log" | head -20 | sed 's/^/    /' >> "$summary"
fi

if [[ $parts == *,sanitizer,* ]]; then
  log="$out/sanitizer.log"
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 7 \
      .gpu/bin/ringjit forward --config tiny --device cuda --tokens 1,2,3,4,5,6,7,8,9,10,11 --decode-from 6 --out /tmp/sanitizer.npy \
      > "$log" 2>&1
    st=$?
    say "== compute-sanitizer memcheck, tiny forward (exit $st)"
    grep -E "ERROR SUMMARY|Invalid|error" "$log" | head -5 | sed 's/^/    /' >> "$summary"
    # decode at batch 40 on small: the decode plan's kernels (graph replay included) where
    # experts take several (token, slot) pairs and the attention splits 40 rows' keys
    log="$out/sanitizer-small.log"
    compute-sanitizer --tool memcheck --error-exitcode 7 \
      .gpu/bin/ringjit bench --config small --device cuda --prefill 16 --decode-batch 40 --context 16 --steps 1 --repeats 1 \
      > "$log" 2>&1
    st=$?
    say "== compute-sanitizer memcheck, small decode b40 (exit $st)"
    grep -E "ERROR SUMMARY|Invalid|error" "$log" | head -5 | sed 's/^/    /' >> "$summary"
  else
    say "== compute-sanitizer: not installed"
  fi
fi

if [[ $parts == *,bench,* ]]; then
  log="$out/bench.log"
  .gpu/bin/ringjit bench --config ring-mini-linear-2.0 --device cuda --json "$out/ringjit_mini.json" 2>&1 | tee "$log"
  st=${PIPESTATUS[0]}
  say "== ringjit bench, Ring-mini (exit $st)"
  sed -n '/^card /,$p' "$log" | sed 's/^/    /' >> "$summary"
fi

if [[ $parts == *,ab,* ]]; then
  log="$out/bench-base.log"
  if [ -x .gpu/bin/ringjit-base ]; then
    .gpu/bin/ringjit-base bench --config ring-mini-linear-2.0 --device cuda --json "$out/ringjit_mini_base.json" 2>&1 | tee "$log"
    st=${PIPESTATUS[0]}
    say "== ringjit bench, Ring-mini, base binary (exit $st)"
    sed -n '/^card /,$p' "$log" | sed 's/^/    /' >> "$summary"
  else
    say "== ab: no .gpu/ringjit-base.xz carried"
  fi
fi

if [[ $parts == *,fold,* ]]; then
  if command -v compute-sanitizer >/dev/null; then
    log="$out/sanitizer-fold.log"
    RINGJIT_FOLD_NORM=1 compute-sanitizer --tool memcheck --error-exitcode 7 \
      .gpu/bin/ringjit bench --config small --device cuda --prefill 16 --decode-batch 1,16,40 --context 16 --steps 1 --repeats 1 \
      > "$log" 2>&1
    st=$?
    say "== compute-sanitizer memcheck, small decode b1/b16/b40, norms folded (exit $st)"
    grep -E "ERROR SUMMARY|Invalid|error" "$log" | head -5 | sed 's/^/    /' >> "$summary"
  fi
  log="$out/bench-fold.log"
  RINGJIT_FOLD_NORM=1 .gpu/bin/ringjit bench --config ring-mini-linear-2.0 --device cuda --json "$out/ringjit_mini_fold.json" 2>&1 | tee "$log"
  st=${PIPESTATUS[0]}
  say "== ringjit bench, Ring-mini, norms folded into their GEMMs (exit $st)"
  sed -n '/^card /,$p' "$log" | sed 's/^/    /' >> "$summary"
fi

if [[ $parts == *,route,* ]]; then
  # A/B of passes::routegemm: Ring-mini decode at the folded plan's batches, the routing
  # kernels apart (RINGJIT_FOLD_ROUTE=0) then folded into the router GEMMs, back to back
  for fold in 0 1; do
    log="$out/bench-route$fold.log"
    RINGJIT_FOLD_ROUTE=$fold .gpu/bin/ringjit bench --config ring-mini-linear-2.0 --device cuda \
      --prefill 0 --decode-batch 1,8,16 --context 4096 2>&1 | tee "$log"
    st=${PIPESTATUS[0]}
    say "== ringjit bench, Ring-mini decode, RINGJIT_FOLD_ROUTE=$fold (exit $st)"
    sed -n '/^card /,$p' "$log" | grep -v "slowest" | sed 's/^/    /' >> "$summary"
  done
fi

if [[ $parts == *,baseline,* ]]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  log="$out/baseline.log"
  PYTHONUNBUFFERED=1 python3 bench/torch_ring.py --bench --json "$out/torch_ring_mini.json" 2>&1 | tee "$log"
  st1=${PIPESTATUS[0]}
  PYTHONUNBUFFERED=1 python3 bench/kernels.py --json "$out/kernels.json" 2>&1 | tee -a "$log"
  st2=${PIPESTATUS[0]}
  say "== PyTorch baselines (exit $st1/$st2): see $out/baseline.log"
  grep -E "decode|prefill|matmul|sdpa|chunk|recurrent|fla" "$log" | tail -30 | sed 's/^/    /' >> "$summary"
fi

echo
echo "== ringjit gpu-check: ${card:-no GPU} =========================="
cat "$summary"
