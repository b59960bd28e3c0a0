"""Memory sizes and budgets: parsing ``--max-memory`` / ``--max-shard-size``, what one layer of the
layer-wise stage needs, and what the whole-model stages need.

The estimates are deliberately simple sums of the large tensors each step holds at its peak
(measured against peak RSS in docs/BENCHMARKS.md section 8); they decide two things only: whether a
``--max-memory`` budget can hold one layer at all (else a one-line :class:`MemoryBudgetError`), and
whether the calibration activations carried between layers stay in memory or are spilled to disk.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .errors import ConfigError, MemoryBudgetError, OutOfMemoryError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_size(text: str | int, option: str = "size") -> int:
    """Bytes in ``text``: ``"24GB"`` (10^9), ``"20GiB"`` / ``"20G"`` (2^30), ``"512MiB"``, ``"1.5e9"``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{option} must be a size such as 24GB, 20GiB or 512MiB, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{option} must be positive, got {text!r}")
    return value


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _meminfo() -> dict[str, int]:
    try:
        with open("/proc/meminfo") as fh:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:]}
    except OSError:  # pragma: no cover - not Linux
        return {}


def available_memory() -> int:
    """Memory a new allocation can have now (``MemAvailable``), or total physical memory."""
    info = _meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def total_memory() -> int:
    """Physical memory plus swap: more than this can never be had."""
    info = _meminfo()
    if "MemTotal" in info:
        return info["MemTotal"] + info.get("SwapTotal", 0)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


RUNTIME_BYTES = 512 << 20  # Python, torch and transformers themselves (about 0.4-0.5 GiB resident)


@dataclass(frozen=True)
class LayerShape:
    """What the memory of one layer-wise step depends on."""

    d_model: int
    d_ffn: int
    layer_params: int  # one decoder layer's weights (attention, FFN, norms)
    resident_params: int  # weights held for the whole stage (the embeddings, or the whole model)
    itemsize: int  # bytes per weight / activation element in the conversion dtype


def layer_shape(model: torch.nn.Module, layers: torch.nn.ModuleList, d_ffn: int, itemsize: int, whole: bool) -> LayerShape:
    """The :class:`LayerShape` of a (possibly meta-device) model: ``whole`` when every layer stays
    in memory, else only the tensors outside the decoder layers do."""
    n_all = sum(p.numel() for p in model.parameters())
    n_layer = sum(p.numel() for p in layers[0].parameters())
    resident = n_all if whole else n_all - n_layer * len(layers)
    return LayerShape(int(model.config.hidden_size), d_ffn, n_layer, resident, itemsize)  # type: ignore[union-attr]


def fit_bytes(shape: LayerShape, tokens: int, batch_tokens: int = 2048, chunk: int = 8192) -> int:
    """Peak bytes of converting one layer over ``tokens`` calibration tokens, activations carried
    between layers not included: the layer in the conversion dtype, its FFN copied to fp32 for
    fitting (and the exported MoE FFN beside it), the FFN inputs/outputs and intermediate
    activations in fp32, the ridge refit's ``d_ffn x d_ffn`` system and one STE training batch."""
    d, f, s = shape.d_model, shape.d_ffn, shape.itemsize
    weights = shape.layer_params * s + 3 * d * f * 4 + 3 * d * f * s
    io = 2 * 2 * tokens * d * 4 + tokens * f * 4  # FFN inputs/outputs in fp32 (collected, then joined); h
    ridge = 3 * f * f * 4 + 5 * f * d * 4 + 4 * min(tokens, chunk) * f * 4  # Z^T Z, its + lam I, the solve's LU
    ste = 6 * min(tokens, batch_tokens) * f * 4
    return RUNTIME_BYTES + weights + io + max(ridge, ste) + shape.resident_params * s


def activation_bytes(shape: LayerShape, tokens: int) -> int:
    """The hidden states carried from layer to layer, in the conversion dtype."""
    return tokens * shape.d_model * shape.itemsize


@dataclass(frozen=True)
class MemoryPlan:
    layer_bytes: int  # one layer-wise step (fit_bytes)
    activation_bytes: int
    budget: int | None  # --max-memory, or None
    spill: bool  # activations go to a file on disk

    def describe(self) -> str:
        where = "spilled to disk" if self.spill else "in memory"
        budget = f" of --max-memory {format_size(self.budget)}" if self.budget is not None else ""
        return (f"about {format_size(self.layer_bytes)} per layer{budget}; calibration activations "
                f"{format_size(self.activation_bytes)} {where}")


def plan_memory(shape: LayerShape, tokens: int, budget: int | None, batch_tokens: int = 2048, streams: int = 1) -> MemoryPlan:
    """Check ``budget`` (bytes; None: what is available now, without refusing) against one layer's
    needs and decide whether the carried activations spill to disk.  ``streams``: 2 when the dense
    model's own hidden states are carried too (``--drift-correction``), whose layer step also holds
    the converted stream's layer outputs and the drift in fp32."""
    layer = fit_bytes(shape, tokens, batch_tokens) + (streams - 1) * 2 * tokens * shape.d_model * 4
    acts = streams * activation_bytes(shape, tokens)
    if budget is not None and budget < layer:
        raise MemoryBudgetError(
            f"--max-memory {format_size(budget)} is too small for one layer of this model: converting a layer "
            f"over {tokens} calibration tokens needs about {format_size(layer)} (lower --calib-tokens, or raise --max-memory)"
        )
    limit = budget if budget is not None else available_memory()
    return MemoryPlan(layer, acts, budget, spill=layer + acts > limit)


def check_whole_model(what: str, need: int, hint: str = "use a machine with more memory", log: object = None) -> None:
    """Refuse (one line) a whole-model stage that cannot fit in this machine's memory plus swap;
    say what it needs when it is more than is available now."""
    total, avail = total_memory(), available_memory()
    if need > total:
        raise OutOfMemoryError(
            f"{what} needs the whole model in memory, about {format_size(need)}, but this machine has "
            f"{format_size(total)} (memory and swap); {hint}"
        )
    if need > avail and callable(log):
        log(f"{what} needs about {format_size(need)} of memory; {format_size(avail)} is available now")
