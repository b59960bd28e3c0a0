#!/usr/bin/env bash
# Issue 16, for a session lent a GPU: convert a LLaMA-2-7B-shaped model of 4 layers (random bf16
# weights, written by bench_scale.py) layer by layer on the GPU, and report the time per layer and
# the GPU's peak allocation (moefy.json "loading.cuda_peak_bytes"). About 1 GB of disk; a few minutes.
#
#   bash benchmarks/gpu_scale.sh            # writes benchmarks/results/scale_gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a session lent a GPU"
print(torch.cuda.get_device_name(0), torch.version.cuda)
EOF
"$PY" benchmarks/bench_scale.py --part scale --layers 4 --paths layer --device cuda \
    --calib-tokens "${CALIB_TOKENS:-8192}" --seq-len 512 --steps 40 --work "${WORK:-/tmp/moefy-bench-scale-gpu}" \
    --json "$OUT/scale_gpu.json"
"$PY" - "$OUT/scale_gpu.json" <<'EOF'
import json, sys
res = json.load(open(sys.argv[1]))
for r in res["rows"]:
    print(f"{r['layers']} layers on {res['settings']['device']}: {r['fit_seconds_per_layer']} s fit per layer, "
          f"wall {r['wall_seconds']} s, peak RSS {r['peak_rss_gib']} GiB, GPU peak {r.get('cuda_peak_gib')} GiB")
EOF
