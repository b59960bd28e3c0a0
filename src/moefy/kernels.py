"""moefy's compiled CPU kernel for batch-1 MoE decode (``csrc/moe_decode_cpu.cpp``).

The kernel is built on first use with :func:`torch.utils.cpp_extension.load` (needs a C++
compiler and ``ninja``; about a minute on 2 cores, then cached under
``$TORCH_EXTENSIONS_DIR``); ``python -c "import moefy.kernels as k; k.main()"`` builds it ahead of
time, as ``scripts/setup.sh`` does.  Where it
cannot be built (no compiler, an unusual platform) moefy says so once and decode falls back
to PyTorch GEMV calls, which give the same results more slowly.  ``MOEFY_CPU_KERNEL=0``
turns it off.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ENV = "MOEFY_CPU_KERNEL"
SOURCE = Path(__file__).resolve().parent / "csrc" / "moe_decode_cpu.cpp"
# activation name (transformers' hidden_act) -> the kernel's code
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1, "gelu": 2, "relu": 3}

_LOCK = threading.Lock()
_MODULE: ModuleType | None = None
_FAILED: str | None = None


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512") and sys.platform.startswith("linux"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, building it on first call; ``None`` where it cannot be had."""
    global _MODULE, _FAILED
    if not enabled():
        return None
    if _MODULE is not None or _FAILED is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is not None or _FAILED is not None:
            return _MODULE
        try:
            from torch.utils import cpp_extension

            name = f"moefy_moe_decode_cpu_v2_{torch.backends.cpu.get_cpu_capability().lower()}"
            build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
            if not (build_dir / f"{name}.so").exists():
                print(f"moefy: building the CPU decode kernel once (about a minute), cached in {build_dir}", file=sys.stderr)
            _MODULE = cpp_extension.load(
                name=name, sources=[str(SOURCE)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"], verbose=verbose
            )
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
            _FAILED = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            warnings.warn(
                f"moefy: the CPU decode kernel could not be built ({_FAILED}); decode uses PyTorch GEMVs "
                f"(same results, slower). Set {ENV}=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _MODULE


def usable(x: torch.Tensor, activation: str) -> ModuleType | None:
    """The kernel module if it serves a token ``x`` with this activation (CPU, fp32/bf16/fp16,
    an activation it implements, built or buildable), else ``None``."""
    if activation not in ACTIVATIONS or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return load()


def moe_decode(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor,
    starts: list[int], ends: list[int], scales: list[float], activation: str,
) -> torch.Tensor | None:
    """``sum_r scales[r] * sum_{j in starts[r]:ends[r]} act(gate_j . x) * (up_j . x) * down_t[j]`` in
    fp32 for one token ``x`` (1-D); ``None`` when the kernel is unavailable for these inputs."""
    mod = usable(x, activation)
    if mod is None:
        return None
    return mod.moe_decode(x.contiguous(), gate, up, down_t, starts, ends, scales, ACTIVATIONS[activation])


def moe_decode_topk(
    x: torch.Tensor, router: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor,
    offsets: list[int], n_shared: int, top_k: int, gating: str, activation: str,
) -> torch.Tensor | None:
    """The whole batch-1 MoE FFN with mask gating in one call: router logits (rounded to ``x``'s
    dtype, as nn.Linear gives them), the top-``top_k`` experts by the rule of
    ``moefy.hf.modeling_moefy.topk_experts`` (ties: lower index), each weighted 1 (expert ``e`` =
    neurons ``offsets[e]:offsets[e+1]``), the always-active neurons ``0:n_shared`` and the FFN, in
    fp32; ``None`` when the kernel is unavailable for these inputs, or ``gating`` is not ``"mask"``:
    weighted gatings have one definition, in modeling_moefy, and run through :func:`moe_decode`.
    (``gating`` stays in the signature for the modeling files of checkpoints saved before, which
    pass it: they get ``None`` and route in Python.)"""
    mod = usable(x, activation)
    if mod is None or gating != "mask":
        return None
    return mod.moe_decode_topk(x.contiguous(), router, gate, up, down_t, offsets, n_shared, top_k, ACTIVATIONS[activation])


def status() -> dict[str, Any]:
    return {"enabled": enabled(), "loaded": _MODULE is not None, "error": _FAILED, "source": str(SOURCE)}


def main(verbose: bool = False) -> int:
    """Build the kernel ahead of time (``scripts/setup.sh`` does); 1 if it cannot be built."""
    mod = load(verbose=verbose)
    print("moefy CPU decode kernel:", "ready" if mod is not None else f"unavailable ({_FAILED or 'disabled'})")
    return 0 if mod is not None or not enabled() else 1
