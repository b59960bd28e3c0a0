#!/usr/bin/env bash
# Flakiness check: the full suite N times in a row from a fresh clone of this checkout's HEAD.
#   bash scripts/suite_repeat.sh [N] [CLONE_DIR]     (defaults: 5, ../moefy-suite-clone)
# The clone sits beside this checkout so ../shared is found as in CI. Threads: set OMP_NUM_THREADS
# (e.g. 1), or run it beside another CPU job, to check the suite under those conditions.
# Each run's exit status, wall time and pytest summary line go to CLONE_DIR/suite_runs.txt; the
# script exits non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-5}
CLONE=${2:-../moefy-suite-clone}
rm -rf "$CLONE"
git clone -q . "$CLONE" || exit 1
cd "$CLONE"
LOG=suite_runs.txt
echo "commit $(git rev-parse --short HEAD), OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}, $(date -u +%FT%TZ)" > "$LOG"
fails=0
for i in $(seq 1 "$N"); do
  t0=$(date +%s)
  bash scripts/test.sh -p no:cacheprovider > "run_$i.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || fails=$((fails + 1))
  echo "run $i: exit $rc, $(( $(date +%s) - t0 )) s, $(tail -1 "run_$i.log")" | tee -a "$LOG"
done
echo "$fails of $N runs failed" | tee -a "$LOG"
[ "$fails" -eq 0 ]
