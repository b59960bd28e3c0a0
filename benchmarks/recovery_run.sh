#!/usr/bin/env bash
# The recovery-training benchmark as recorded in docs/BENCHMARKS.md section 7 (one layout per process).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=benchmarks/results/recovery
$PY benchmarks/bench_recovery.py --layout shared25 --tokens 147456 --full-test --out $OUT "$@" 2>&1 | tee $OUT/shared25.log
$PY benchmarks/bench_recovery.py --layout e8k2 --tokens 98304 --full-test --out $OUT "$@" 2>&1 | tee $OUT/e8k2.log
$PY benchmarks/bench_recovery.py --layout shared50 --tokens 49152 --full-test --out $OUT "$@" 2>&1 | tee $OUT/shared50.log
