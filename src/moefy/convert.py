"""The conversion pipeline: dense model -> model whose FFNs are :class:`DotMoeLayer`.

Layer-wise stage (llm-compressor's sequential pipeline): calibration activations enter
decoder layer 0; for each layer in turn, its FFN inputs (produced by the already-converted
layers below) and the dense FFN's outputs are collected, the layer's MoE is fitted
(:func:`moefy.layerwise.fit_layer`), the layer is swapped in place, and its outputs feed the
next layer.  Memory: one layer plus the cached hidden states of the calibration tokens.

The end-to-end stage is recovery training (:mod:`moefy.training`), shared with ``moefy train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .config import ConvertConfig
from .dotmoe import DotMoeLayer
from .layerwise import LayerReport, fit_layer
from .splits import (
    Split,
    act_cluster_split,
    activation_sample,
    choose_shared,
    param_cluster_split,
    pruning_importance,
    random_split,
)

Progress = Callable[[str, int, int], None]


class _Stop(Exception):
    pass


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering layer 0 for every batch, and the keyword arguments (masks,
    rotary embeddings) each layer receives (identical for every batch of the same shape)."""
    layers = adapter.layers(model)
    layer_kwargs: list[dict[str, Any]] = [{} for _ in layers]
    inputs: list[torch.Tensor] = []
    stop_at_first = [False]

    def hook(i: int) -> Callable[..., None]:
        def fn(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if i == 0:
                inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
            layer_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if stop_at_first[0]:
                raise _Stop

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for b, ids in enumerate(batches):
            stop_at_first[0] = b > 0
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    for kw in layer_kwargs:
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
    return inputs, layer_kwargs


@torch.no_grad()
def collect_ffn_io(layer: nn.Module, mlp: nn.Module, xs: list[torch.Tensor], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """FFN inputs and dense FFN outputs of one decoder layer, per batch ``[b, seq, d]``."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def fn(_mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        ins.append(args[0].detach())
        outs.append(_first_tensor(out).detach())

    handle = mlp.register_forward_hook(fn)
    try:
        for x in xs:
            layer(x, **kwargs)
    finally:
        handle.remove()
    return torch.cat(ins), torch.cat(outs)


def initial_split(
    method: str, init: str, ffn: Any, h: torch.Tensor, cfg: ConvertConfig, seed: int
) -> Split:
    """The split a method starts from (the only thing that differs between methods)."""
    d_ffn = ffn.d_ffn
    active = active_fraction(cfg, d_ffn)
    if method == "prune":
        keep = int(round(active * d_ffn))
        imp = pruning_importance(h, ffn)
        return Split(torch.sort(imp.topk(keep).indices).values, [])
    if cfg.shared_by == "importance" and cfg.n_shared > 0:
        shared = torch.sort(pruning_importance(h, ffn).topk(cfg.n_shared).indices).values
    else:
        shared = choose_shared(h, cfg.n_shared, active)
    kind = init if method in ("dot", "dot-frozen") else method
    if kind == "random":
        return random_split(d_ffn, cfg.n_experts, seed, shared)
    if kind == "param-cluster":
        return param_cluster_split(ffn, cfg.n_experts, seed, shared)
    return act_cluster_split(h, cfg.n_experts, cfg.top_k / cfg.n_experts, seed, shared)


def make_layer(mlp: nn.Module, adapter: Adapter, config: Any, split: Split, cfg: ConvertConfig) -> DotMoeLayer:
    ffn = adapter.ffn_weights(mlp)
    return DotMoeLayer(
        ffn,
        getattr(mlp, adapter.act_attr),
        adapter.act_name(config),
        split,
        cfg.top_k,
        learn_assignment=cfg.method == "dot",
        rounding=cfg.rounding,
        sinkhorn_iters=cfg.sinkhorn_iters,
        router_type=cfg.router,
        max_active=cfg.max_active,
        gating=cfg.gating,
    )


def _split_train_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, ...]:
    """Hold out the last sequences (not random tokens: neighbours would leak)."""
    n_seq = x.shape[0]
    n_val = min(max(1, int(round(n_seq * val_fraction))), n_seq - 1) if n_seq > 1 else 0
    d = x.shape[-1]
    if n_val == 0:
        flat_x, flat_y = x.reshape(-1, d), y.reshape(-1, d)
        half = flat_x.shape[0] // 8
        return flat_x[half:], flat_y[half:], flat_x[:half], flat_y[:half]
    return (
        x[: n_seq - n_val].reshape(-1, d),
        y[: n_seq - n_val].reshape(-1, d),
        x[n_seq - n_val :].reshape(-1, d),
        y[n_seq - n_val :].reshape(-1, d),
    )


def mean_budget(cfg: ConvertConfig, n_converted: int) -> float:
    """Mean experts per token and layer: ``K / L`` (LapSum) or the top-k."""
    if cfg.router != "lapsum" or cfg.budget is None:
        return float(cfg.top_k)
    return float(cfg.budget) / n_converted


def layers_to_convert(cfg: ConvertConfig, n_layers: int) -> list[int]:
    return list(range(n_layers)) if cfg.layers is None else sorted(set(cfg.layers))


def layerwise_stage(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: ConvertConfig,
    batch: int = 8,
    progress: Progress | None = None,
    start_layer: int = 0,
    on_layer_done: Callable[[int, LayerReport], None] | None = None,
    restored: dict[int, DotMoeLayer] | None = None,
) -> list[LayerReport]:
    """Convert every chosen layer in order; returns one report per converted layer.

    ``restored`` maps already-finished layers (from a resumed run) to their fitted modules:
    they are swapped in without refitting, and still feed the layers above.
    """
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    chosen = layers_to_convert(cfg, len(layers))
    restored = restored or {}
    for i in chosen:
        if i in restored:
            layers[i].mlp = restored[i]
    todo = [i for i in chosen if i not in restored]
    if not todo:  # a resumed run with every layer already fitted: no calibration forward needed
        if progress is not None:
            progress("layer-wise", len(layers), len(layers))
        return []
    batches = list(calib.split(batch))
    xs, layer_kwargs = capture_inputs(model, adapter, batches)
    reports: list[LayerReport] = []
    for i, layer in enumerate(layers):
        if i in todo:
            mlp = layer.mlp
            x_in, y_out = collect_ffn_io(layer, mlp, xs, layer_kwargs[i])
            x_tr, y_tr, x_val, y_val = _split_train_val(x_in, y_out, cfg.val_fraction)
            ffn = adapter.ffn_weights(mlp)
            with torch.no_grad():
                h_sample = activation_sample(
                    getattr(mlp, adapter.act_attr)(nn.functional.linear(x_tr, ffn.gate, ffn.gate_bias))
                    * nn.functional.linear(x_tr, ffn.up, ffn.up_bias),
                    seed=cfg.seed + i,
                )
            split = initial_split(cfg.method, cfg.init, ffn, h_sample, cfg, cfg.seed + i)
            del h_sample
            dot = make_layer(mlp, adapter, model.config, split, cfg)
            dot.k_budget = mean_budget(cfg, len(chosen))
            report = fit_layer(dot, x_tr, y_tr, x_val, y_val, cfg, i)
            dot.eval()
            layer.mlp = dot
            reports.append(report)
            if on_layer_done is not None:
                on_layer_done(i, report)
        if i == todo[-1]:  # nothing above needs the calibration activations
            break
        with torch.no_grad():
            xs = [_first_tensor(layer(x, **layer_kwargs[i])) for x in xs]
        if progress is not None:
            progress("layer-wise", i + 1, len(layers))
    if progress is not None:
        progress("layer-wise", len(layers), len(layers))
    return reports


def active_fraction(cfg: ConvertConfig, d_ffn: int) -> float:
    """Share of FFN neurons a token runs: the shared block plus ``k`` of ``E`` routed experts
    (for ``prune``, the kept neurons: the same count)."""
    routed = d_ffn - cfg.n_shared
    return (cfg.n_shared + cfg.top_k * routed / cfg.n_experts) / d_ffn


def summary(reports: list[LayerReport]) -> dict[str, float]:
    def mean(key: str) -> float:
        vals = [getattr(r, key) for r in reports if not math.isnan(getattr(r, key))]
        return float(sum(vals) / len(vals)) if vals else math.nan

    return {
        "mean_error_init": mean("error_init"),
        "mean_error_routed": mean("error_routed"),
        "mean_error_final": mean("error_final"),
        "seconds": float(sum(r.seconds for r in reports)),
    }
