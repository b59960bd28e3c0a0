#!/usr/bin/env bash
# Every speed table of docs/BENCHMARKS.md (sections 4 and 6.5), one after the other on a quiet
# machine (two torch jobs at once on 2 cores oversubscribe the threads). Needs the main job's
# checkpoint (bash scripts/main_job.sh) for the whole-model rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MOE=${MOE:-out/smollm2-135m-dot-E8k2}
$PY benchmarks/bench_speed.py --threads 2 --repeats 30 --prefill-repeats 3 --warmup 3 --default-layout-only \
  --json benchmarks/results/speed.json
$PY benchmarks/bench_speed.py --threads 2 --repeats 5 --warmup 1 --skip-ffn \
  --model-dense smollm2-135m --model-moe "$MOE" --json benchmarks/results/speed_model.json
$PY benchmarks/bench_speed.py --threads 2 --repeats 30 --prefill-repeats 3 --warmup 3 --shapes llama2-7b --dtypes fp32 bf16 \
  --configs 8:2 26:2:2064 8:4 20:4:4128 64:16 --default-layout-only --json benchmarks/results/speed_shared_llama2.json
$PY benchmarks/bench_speed.py --threads 2 --repeats 20 --warmup 3 --shapes smollm2=576x1536 --dtypes fp32 bf16 \
  --configs 8:2 26:2:288 8:4 20:4:576 --default-layout-only --json benchmarks/results/speed_shared_smollm2.json
