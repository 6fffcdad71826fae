#!/usr/bin/env bash
# Installs what ringjit needs on Debian 12 (idempotent; quick when everything is there):
#   - LLVM 19 development packages (the PTX backend links LLVM statically) and their C deps
#   - python3-venv, and .venv/ with numpy (the independent reference in tests/reference/)
#     and the nvidia-cuda-nvcc-cu12 wheel (ptxas, to check emitted PTX without a GPU)
# Writes .venv/ptxas-path with the ptxas location (tests read RINGJIT_PTXAS, else this file).
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(llvm-19-dev libpolly-19-dev libzstd-dev zlib1g-dev libxml2-dev libffi-dev libedit-dev
      libncurses-dev python3-venv pkg-config)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import numpy" 2>/dev/null; then
  echo "setup: installing numpy into .venv"
  .venv/bin/pip install -q --disable-pip-version-check numpy
fi
ptxas=$(ls .venv/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas 2>/dev/null | head -1 || true)
if [ -z "$ptxas" ]; then
  echo "setup: installing the ptxas wheel (nvidia-cuda-nvcc-cu12) into .venv"
  .venv/bin/pip install -q --disable-pip-version-check nvidia-cuda-nvcc-cu12
  ptxas=$(ls .venv/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas | head -1)
fi
echo "$PWD/$ptxas" > .venv/ptxas-path
echo "setup: ok (ptxas: $ptxas; export RINGJIT_PTXAS to use another)"
