#!/usr/bin/env bash
# Recovery training on one GPU for a fixed token budget: tokens/s, peak GPU memory and the
# held-out curve (issue 12's GPU check). Prepared for a session lent a device machine: it runs
# under that image's python3 (torch with CUDA), with moefy from this tree and a checkpoint
# carried in (CKPT, a moefy convert output) and the dense teacher (TEACHER). Writes $OUT/.
#   bash benchmarks/gpu_recovery.sh CKPT TEACHER DATA [TOKENS]
set -euo pipefail
CKPT=$1; TEACHER=$2; DATA=$3; TOKENS=${4:-1048576}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m moefy.cli train "$CKPT" --teacher "$TEACHER" --data "$DATA" --out "$OUT/trained" \
  --tokens "$TOKENS" --seq-len 1024 --batch-size 16 --eval-every 16 --val-sequences 16 \
  --mixed-precision bf16 --overwrite 2>&1 | tee "$OUT/train.log"
python3 - "$OUT" <<'PY'
import json, sys
rec = json.load(open(f"{sys.argv[1]}/trained/moefy.json"))["training"][-1]
keep = {k: rec[k] for k in ("tokens", "steps", "kept_step", "tokens_per_second", "peak_gpu_mib", "peak_rss_mib", "seconds")}
keep["curve"] = [{"step": h["step"], "val_kl": h["val_kl"], "val_ppl": h["val_ppl"]} for h in rec["history"]]
json.dump(keep, open(f"{sys.argv[1]}/gpu_recovery.json", "w"), indent=1)
print(json.dumps(keep, indent=1))
PY
