#!/usr/bin/env bash
# Creates (or reuses) the project's pinned virtual environment in .venv and prints nothing on reuse.
# Usage: bash scripts/env.sh            -> ensures .venv is complete
# Pairs (torch <-> fbgemm-gpu): 2.13.0 <-> 1.8.0 (this pin), 2.12 <-> 1.7, 2.11 <-> 1.6, 2.10 <-> 1.5, 2.9 <-> 1.4.
# CPU machines get fbgemm-gpu-cpu; machines with an NVIDIA driver (nvidia-smi on PATH) get the CUDA wheels of
# torch and fbgemm-gpu from download.pytorch.org (set ZOO_CUDA_INDEX to pick another CUDA build, default cu128).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
py=${PYTHON:-python3}
TORCH=2.13.0
FBGEMM=1.8.0
TORCHREC=1.8.0
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "[env] needs Python 3.11 (torch 2.13.0's CPU wheel here is for 3.11); '$py' is $("$py" -V 2>&1). Set PYTHON=python3.11" >&2
  exit 1
fi
stamp_src=$(cat "$root/requirements/lock.txt" "$0" | sha256sum | cut -c1-16)
stamp="$venv/.zoo-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_src" ]; then exit 0; fi
echo "[env] creating $venv (torch $TORCH, fbgemm $FBGEMM, torchrec $TORCHREC)" >&2
rm -rf "$venv"
"$py" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  idx="https://download.pytorch.org/whl/${ZOO_CUDA_INDEX:-cu128}"
  "$pip" install -q "torch==$TORCH" "fbgemm-gpu==$FBGEMM" --index-url "$idx"
else
  "$pip" install -q "torch==$TORCH" "fbgemm-gpu-cpu==$FBGEMM"
fi
# torchrec's metadata pulls the CUDA fbgemm-gpu: install it alone, then its real dependencies from the lock.
# pip then reports that torchrec "requires fbgemm-gpu" and "torchmetrics==1.0.3": expected. fbgemm-gpu-cpu
# provides the fbgemm_gpu module; torchmetrics is pinned at 1.9.0 (the zoo uses torchmetrics' AUROC, not
# torchrec.metrics, and 1.0.3 predates numpy 2); the test suite runs against exactly these pins.
"$pip" install -q --no-deps "torchrec==$TORCHREC"
"$pip" install -q -r "$root/requirements/lock.txt"
"$venv/bin/python" -c "import torch, torchrec, fbgemm_gpu, torchx, pyarrow, omegaconf" 
echo "$stamp_src" > "$stamp"
echo "[env] ready" >&2
