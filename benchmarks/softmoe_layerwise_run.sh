#!/usr/bin/env bash
# issue 4: LapSum routing with the layer-wise stage only (fixed k_l = 2), to isolate the router
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/moefy convert smollm2-135m --calib ../shared/data/wikitext2/wiki.valid.tokens --calib-tokens 16384 --experts 8 --top-k 2 --router lapsum --max-active 4 --out runs/softmoe/lapsum_lw --overwrite
.venv/bin/moefy eval smollm2-135m runs/softmoe/lapsum_lw --ppl ../shared/data/wikitext2/wiki.test.raw --seq-len 1024 --max-windows 40 --json runs/softmoe/eval_lw.json
