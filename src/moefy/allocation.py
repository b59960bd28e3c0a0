"""Per-layer shared-neuron budgets (``moefy convert --allocate kl``).

A uniform layout gives every layer the same ``n_shared`` always-active neurons.  The layers do not
need them equally: on SmolLM2-135M, pruning one layer's FFN to 25% of its neurons (by importance,
``W_down`` refitted by ridge) with every other layer dense raises the model's held-out KL by 0.35
nats per token for layer 0, and by 0.03-0.06 for each of the other 29 (docs/BENCHMARKS.md 6.12).

``--allocate kl`` measures that curve for every converted layer before converting anything:

1. the calibration text goes through the dense model layer by layer (as the layer-wise stage does);
2. at each layer, for a few shared counts ``s`` (:data:`GRID` x ``n_shared``, and the most a layer
   can hold), the FFN is replaced by its ``s + k (d_ffn - s) / E`` first neurons (by importance, or
   with ``--shared-by obs`` in the OBS order the conversion will pick its shared block from) with
   ``W_down`` refitted (the same fit as ``--method prune``; the routed experts' neurons counted
   as if always on), and the model's KL to the dense model is measured on the held-out
   calibration sequences (:class:`moefy.model_select.HeldOutKL`, run from that layer up);
3. shared neurons are then handed out greedily, a step at a time, to the layer whose
   (interpolated) KL drops most, until the layers hold ``n_shared`` each on average.

The mean active fraction of the model is therefore exactly the uniform layout's (the active count
is linear in ``s``), and every layer keeps the same ``E`` routed experts and ``k``; only their sizes
and the shared block differ between layers.  The result is ``ConvertConfig.shared_per_layer``,
recorded in ``moefy.json``; a recipe that gives it converts without measuring again.  The KL per
layer is assumed additive, the usual first-order assumption of sensitivity-based allocation (as
in OWL's or BESA's layer-wise sparsity); the benchmark is the check.  moefy's own code: no library
allocates MoE layouts per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .activations import ActivationStore
from .adapters import Adapter, get_adapter
from .config import ConvertConfig
from .convert import (
    _first_tensor,
    _split_train_val,
    capture_inputs,
    collect_ffn_io,
    held_out_inputs,
    hidden_sample,
    layers_to_convert,
    make_layer,
    neuron_order,
    to_device,
)
from .layerwise import fit_layer
from .model_select import HeldOutKL
from .splits import Split, pruning_importance

# shared counts measured per layer, as multiples of the layout's n_shared (the most a layer can
# hold, d_ffn - E, is measured too)
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
# the greedy hands out shared neurons in steps of n_shared / STEPS_PER_MEAN
STEPS_PER_MEAN = 24
# KL below this counts as this (log interpolation)
KL_FLOOR = 1e-6

Log = Callable[[str], None]


def active_neurons(n_shared: float, d_ffn: int, n_experts: int, top_k: int) -> float:
    """Mean FFN neurons a token runs: the shared block plus ``k`` of ``E`` equal routed experts."""
    return n_shared + top_k * (d_ffn - n_shared) / n_experts


@dataclass
class LayerCurve:
    """One layer's measured held-out KL (nats per token) at each shared count, ``shared`` increasing."""

    layer: int
    shared: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    def at(self, s: float) -> float:
        """KL at ``s`` shared neurons: ``log KL`` linear between the measured counts (clamped at the
        ends).  The measured curves fall roughly exponentially; interpolating the KL itself linearly
        made every step within a segment worth the same, and the greedy then filled whole segments
        (on SmolLM2 one layer got 0 shared neurons and another 1,500; docs/BENCHMARKS.md 6.12)."""
        xs, ys = self.shared, [math.log(max(v, KL_FLOOR)) for v in self.kl]
        if s <= xs[0]:
            return math.exp(ys[0])
        for j in range(1, len(xs)):
            if s <= xs[j]:
                t = (s - xs[j - 1]) / (xs[j] - xs[j - 1])
                return math.exp(ys[j - 1] + t * (ys[j] - ys[j - 1]))
        return math.exp(ys[-1])


def grid_points(cfg: ConvertConfig, d_ffn: int) -> list[int]:
    """The shared counts measured in every layer."""
    top = d_ffn - cfg.n_experts
    return sorted({min(int(round(g * cfg.n_shared)), top) for g in GRID} | {top})


@torch.no_grad()
def measure(
    model: nn.Module, calib: torch.Tensor, cfg: ConvertConfig, batch: int = 8, log: Log | None = None,
) -> list[LayerCurve]:
    """Each converted layer's KL curve (see the module docstring), on the dense ``model`` as it is
    (whole, in memory; every layer where its embeddings are)."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    chosen = layers_to_convert(cfg, len(layers))
    dev = model.get_input_embeddings().weight.device
    scorer = HeldOutKL(model, adapter, calib, cfg.val_fraction)
    batches = list(calib.split(batch))
    store = ActivationStore([int(b.shape[0]) for b in batches])
    _, layer_kwargs = capture_inputs(model, adapter, batches, sink=store.put)
    hidden_in = held_out_inputs(scorer, store, batch)

    curves: list[LayerCurve] = []
    try:
        for i, layer in enumerate(layers):
            kwargs = to_device(layer_kwargs[i], dev)
            if i in chosen:
                curves.append(_layer_curve(layer, i, store, kwargs, adapter, model.config, cfg, dev, lambda: scorer.score(i, hidden_in)))
                if log is not None:
                    c = curves[-1]
                    log(f"allocate: layer {i}: held-out KL " + ", ".join(f"{k:.4f} at {s}" for s, k in zip(c.shared, c.kl)))
            if i == chosen[-1]:
                break
            for b in range(len(store)):
                store.put(b, _first_tensor(layer(store.get(b).to(dev), **kwargs)))
    finally:
        store.close()
    return curves


def _layer_curve(
    layer: nn.Module, i: int, store: ActivationStore, kwargs: dict[str, Any], adapter: Adapter, config: Any,
    cfg: ConvertConfig, device: torch.device, score: Callable[[], float],
) -> LayerCurve:
    mlp = layer.mlp
    ffn = adapter.ffn_weights(mlp)
    x, y = collect_ffn_io(layer, mlp, (store.get(b).to(device) for b in range(len(store))), kwargs)
    data = _split_train_val(x, y, cfg.val_fraction)
    del x, y
    if cfg.shared_by == "obs":  # the neurons the conversion will keep first
        order = neuron_order(mlp, adapter, data[0], data[1])
    else:
        order = pruning_importance(hidden_sample(mlp, adapter, data[0], cfg.seed + i), ffn).argsort(descending=True)
    fixed = replace(cfg, method="prune", steps=0, weights="ridge", shared_per_layer=None, allocate="uniform")
    curve = LayerCurve(i)
    for s in grid_points(cfg, ffn.d_ffn):
        keep = int(round(active_neurons(s, ffn.d_ffn, cfg.n_experts, cfg.top_k)))
        split = Split(torch.sort(order[:keep]).values.cpu(), [])
        cand = make_layer(mlp, adapter, config, split, fixed)
        fit_layer(cand, *data, fixed, i)
        cand.eval()
        layer.mlp = cand.to_moe_mlp(dtype=ffn.gate.dtype)
        try:
            curve.kl.append(float(score()))
        finally:
            layer.mlp = mlp
        curve.shared.append(s)
    return curve


def allocate(curves: list[LayerCurve], n_shared: int, top: int) -> dict[int, int]:
    """Shared counts per layer, ``n_shared`` on average (exactly: the sum is ``n_shared`` x layers),
    each within ``0..top``: greedy, a step of ``n_shared / STEPS_PER_MEAN`` neurons at a time to the
    layer whose KL drops most (ties: the layer holding fewer, then the lower layer)."""
    step = max(1, n_shared // STEPS_PER_MEAN)
    alloc = {c.layer: 0 for c in curves}
    left = n_shared * len(curves)
    while left > 0:
        inc = min(step, left)
        open_ = [c for c in curves if alloc[c.layer] + inc <= top]
        if not open_:  # cannot happen while n_shared <= top; kept for safety
            break
        best = max(open_, key=lambda c: (c.at(alloc[c.layer]) - c.at(alloc[c.layer] + inc), -alloc[c.layer], -c.layer))
        alloc[best.layer] += inc
        left -= inc
    return alloc


def shared_per_layer(
    model: nn.Module, calib: torch.Tensor, cfg: ConvertConfig, d_ffn: int, batch: int = 8, log: Log | None = None,
) -> tuple[list[int], list[LayerCurve]]:
    """``ConvertConfig.shared_per_layer`` for ``--allocate kl`` (one count per decoder layer; layers
    not converted keep ``n_shared``), and the curves it was chosen from."""
    curves = measure(model, calib, cfg, batch, log)
    alloc = allocate(curves, cfg.n_shared, d_ffn - cfg.n_experts)
    n_layers = len(get_adapter(model.config).layers(model))
    return [alloc.get(i, cfg.n_shared) for i in range(n_layers)], curves
