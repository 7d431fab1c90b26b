#!/usr/bin/env bash
# The GPU check in one call (<= 10 minutes on an H100/H200): random-weight models built on the GPU,
# our step against raw HF generate + forward/backward, prefill sharing, static KV cache, tokens/s,
# peak memory. Writes gpu.md (ready for docs/results/) and gpu.json to $OUT (default outputs/gpu).
#
#   bash scripts/gpu_check.sh                 # on the GPU node, from the repository root
#   bash scripts/gpu_check.sh --device cpu --tiny    # the CPU smoke test (what CI can run)
#
# Python: the project's .venv if it runs (`uv sync --offline` first where uv is present), else the
# node's python3 with this checkout on PYTHONPATH and any wheels in ./wheels (bitsandbytes)
# installed into a scratch folder, offline. Without bitsandbytes the shapes run in bf16 (said in the table).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
mkdir -p "$OUT"
PY=""
if command -v uv >/dev/null 2>&1; then
  uv sync --offline --frozen >/dev/null 2>&1 || true
fi
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, transformers, peft" >/dev/null 2>&1; then
  PY=.venv/bin/python
else
  PY=python3
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if ls wheels/*.whl >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/gfodg-site"
    "$PY" -m pip install --quiet --no-index --no-deps --find-links wheels --target "$SITE" wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
fi
"$PY" -c "import torch; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# 540 s of measuring at most: the runner skips a shape once half of it is spent
timeout 570 "$PY" -m gf_odg.bench.gpu --gpu-budget-s 540 --out "$OUT" "$@" 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/gpu.log"
