#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M -> 8-expert top-2 DOT-MoE, evaluated
# against its dense self on WikiText-2 (first 40 windows of 1024 tokens, to stay within ~20 min
# on 2 CPU cores; benchmarks/bench_convert.py runs the full test set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED=../shared/data
OUT=${OUT:-out/smollm2-135m-dot-E8k2}
CALIB=()
if [ -f "$SHARED/wikitext2/wiki.valid.tokens" ]; then
  CALIB=(--calib "$SHARED/wikitext2/wiki.valid.tokens")
fi
.venv/bin/moefy convert smollm2-135m --experts 8 --top-k 2 --out "$OUT" "${CALIB[@]}" \
  --calib-tokens 16384 --seq-len 512 --overwrite
if [ -f "$SHARED/wikitext2/wiki.test.raw" ]; then
  EVAL="$SHARED/wikitext2/wiki.test.raw"
else
  # No data files on this machine: evaluate on held-out text sampled from the dense model.
  EVAL=out/dense_samples.txt
  .venv/bin/python - "$EVAL" <<'PY'
import sys, torch
from moefy.models import load
from moefy.calibration import sample_from_model
L = load("smollm2-135m")
s = sample_from_model(L.model, L.tokenizer, 8192, 512, seed=12345)
open(sys.argv[1], "w").write("\n\n".join(L.tokenizer.decode(r, skip_special_tokens=True) for r in s.ids))
print("evaluation text: 8192 tokens sampled from the dense model (seed 12345, not the calibration seed)")
PY
fi
.venv/bin/moefy eval smollm2-135m "$OUT" --ppl "$EVAL" --seq-len 1024 --max-windows 40 --json "$OUT.eval.json"
