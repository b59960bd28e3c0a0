#!/usr/bin/env bash
# issue 4: DOT-MoE + top-2 vs DOT-MoE + LapSum (learned per-layer budget), both with the e2e stage
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
set -euo pipefail
cd "$(dirname "$0")/.."
C="--calib ../shared/data/wikitext2/wiki.valid.tokens --calib-tokens 16384 --experts 8 --top-k 2 --stage both --e2e-steps 30 --e2e-val-sequences 0"
# --e2e-val-sequences 0: these figures predate the end-to-end keep-best (docs/BENCHMARKS.md §2.1); drop it for the current default
.venv/bin/moefy convert smollm2-135m $C --out runs/softmoe/top2 --overwrite
.venv/bin/moefy convert smollm2-135m $C --router lapsum --budget 60 --budget-mode learned --max-active 4 --out runs/softmoe/lapsum --overwrite
.venv/bin/moefy eval smollm2-135m runs/softmoe/top2 runs/softmoe/lapsum --ppl ../shared/data/wikitext2/wiki.test.raw --seq-len 1024 --max-windows 40 --json runs/softmoe/eval.json
.venv/bin/python benchmarks/softmoe_budgets.py runs/softmoe/top2 runs/softmoe/lapsum --eval runs/softmoe/eval.json
