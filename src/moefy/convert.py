"""The conversion pipeline: dense model -> model whose FFNs are MoE FFNs (:class:`MoefyMLP`).

Layer-wise stage (llm-compressor's sequential pipeline): calibration activations enter
decoder layer 0; for each layer in turn, its FFN inputs (produced by the already-converted
layers below) and the dense FFN's outputs are collected, the layer's MoE is fitted
(:func:`moefy.layerwise.fit_layer`, in fp32 whatever the model's dtype), exported in the model's
dtype (:meth:`DotMoeLayer.to_moe_mlp`) and swapped in place, and the layer's outputs, computed by
that exported FFN, feed the next layer.

Where the layers live between their turns is a :class:`LayerHost`: the whole model in memory
(:class:`InMemoryHost`), or a meta-device skeleton whose layers are read from the checkpoint one
at a time (:class:`moefy.onload.OnloadHost`).  Each layer is fitted on the compute ``device``; the
carried activations (an :class:`moefy.activations.ActivationStore`) stay on the CPU, in memory or
spilled to disk.  Memory: one layer plus the activations of the calibration tokens.

The end-to-end stage is recovery training (:mod:`moefy.training`), shared with ``moefy train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .activations import ActivationStore
from .adapters import Adapter, get_adapter, passthrough_layer
from .config import BEST_INIT_CANDIDATES, DEFAULT_DRIFT_CORRECTION, ConvertConfig
from .dotmoe import DotMoeLayer
from .errors import ConfigError
from .layerwise import LayerReport, fit_layer
from .model_select import HeldOutKL, n_held_out
from .splits import (
    Split,
    act_cluster_split,
    activation_sample,
    choose_shared,
    obs_order,
    param_cluster_split,
    pruning_importance,
    random_split,
)

Progress = Callable[[str, int, int], None]
LayerDone = Callable[[int, LayerReport, nn.Module], None]


class _Stop(Exception):
    pass


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (tensors in dicts, tuples, lists) with every tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def capture_inputs(
    model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], sink: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Hidden states entering layer 0 for every batch, and the keyword arguments (masks,
    rotary embeddings) each layer receives (identical for every batch of the same shape).

    No decoder layer runs: each is replaced, for this forward, by a pass-through that records its
    arguments, so this works on a meta-device skeleton whose embeddings alone are loaded.  With
    ``sink`` each batch's hidden states go to ``sink(b, x)`` instead of the returned list."""
    layers = adapter.layers(model)
    layer_kwargs: list[dict[str, Any]] = [{} for _ in layers]
    inputs: list[torch.Tensor] = []
    stop_at = [len(layers) - 1]

    def hook(i: int) -> Callable[..., None]:
        def fn(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if i == 0:
                x = (args[0] if args else kwargs["hidden_states"]).detach()
                if sink is not None:
                    sink(len(inputs), x)
                    inputs.append(x.new_empty(0))
                else:
                    inputs.append(x)
            layer_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == stop_at[0]:
                raise _Stop

        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = passthrough_layer  # type: ignore[method-assign]
    try:
        for b, ids in enumerate(batches):
            stop_at[0] = len(layers) - 1 if b == 0 else 0
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            del layer.forward
    for kw in layer_kwargs:
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        kw.pop("cache", None)
    return ([] if sink is not None else inputs), layer_kwargs


@torch.no_grad()
def collect_ffn_io(
    layer: nn.Module, mlp: nn.Module, xs: Iterable[torch.Tensor], kwargs: dict[str, Any],
    layer_outputs: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FFN inputs and dense FFN outputs of one decoder layer, ``[sequences, seq, d]`` in fp32
    (what the fitting runs in).  With ``layer_outputs``, the decoder layer's outputs (fp32) are
    appended to it, one tensor per batch."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def fn(_mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        ins.append(args[0].detach().float())
        outs.append(_first_tensor(out).detach().float())

    handle = mlp.register_forward_hook(fn)
    try:
        for x in xs:
            o = layer(x, **kwargs)
            if layer_outputs is not None:
                layer_outputs.append(_first_tensor(o).detach().float())
    finally:
        handle.remove()
    x_in = torch.cat(ins)
    del ins
    return x_in, torch.cat(outs)


@torch.no_grad()
def advance_dense_stream(
    layer: nn.Module, dense: ActivationStore, kwargs: dict[str, Any], device: torch.device,
    moe_outputs: list[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Run the *dense* decoder ``layer`` on the dense model's own hidden states (``dense``, updated
    in place to the states after the layer).  With ``moe_outputs`` (the same layer's outputs on the
    converted model's states, dense FFN in place): returns the drift, dense minus converted stream
    after the layer, ``[sequences, seq, d]`` in fp32."""
    drift: list[torch.Tensor] = []
    for b in range(len(dense)):
        out = _first_tensor(layer(dense.get(b).to(device), **kwargs))
        if moe_outputs is not None:
            drift.append(out.float() - moe_outputs[b])
        dense.put(b, out)
    return torch.cat(drift) if moe_outputs is not None else None


def initial_split(
    method: str, init: str, ffn: Any, h: torch.Tensor, cfg: ConvertConfig, seed: int,
    order: torch.Tensor | None = None,
) -> Split:
    """The split a method starts from (the only thing that differs between methods).  ``order``
    (``--shared-by obs``: :func:`neuron_order`) ranks the neurons for the shared block, and for
    ``prune`` the kept ones."""
    d_ffn = ffn.d_ffn
    active = active_fraction(cfg, d_ffn)
    by_order = needs_order(cfg, method)
    if by_order and order is None:
        raise ValueError("--shared-by obs needs the neurons' OBS order (neuron_order)")
    if method == "prune":
        keep = int(round(active * d_ffn))
        if by_order:
            return Split(torch.sort(order[:keep].to(h.device)).values, [])
        imp = pruning_importance(h, ffn)
        return Split(torch.sort(imp.topk(keep).indices).values, [])
    if by_order:
        shared = torch.sort(order[: cfg.n_shared].to(h.device)).values
    elif cfg.shared_by == "importance" and cfg.n_shared > 0:
        shared = torch.sort(pruning_importance(h, ffn).topk(cfg.n_shared).indices).values
    else:
        shared = choose_shared(h, cfg.n_shared, active)
    kind = init if method in ("dot", "dot-frozen") else method
    if kind == "random":
        return random_split(d_ffn, cfg.n_experts, seed, shared, device=h.device)
    if kind == "param-cluster":
        return param_cluster_split(ffn, cfg.n_experts, seed, shared)
    return act_cluster_split(h, cfg.n_experts, cfg.top_k / cfg.n_experts, seed, shared)


def needs_order(cfg: ConvertConfig, method: str | None = None) -> bool:
    """Whether a layer's split by ``method`` (default ``cfg.method``) needs :func:`neuron_order`:
    ``--shared-by obs`` with shared neurons, or with ``prune``."""
    return cfg.shared_by == "obs" and ((method or cfg.method) == "prune" or cfg.n_shared > 0)


def make_layer(mlp: nn.Module, adapter: Adapter, config: Any, split: Split, cfg: ConvertConfig) -> DotMoeLayer:
    """The trainable DOT-MoE layer of ``mlp`` (fp32 copies of its weights, on their device)."""
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
    n_val = n_held_out(n_seq, val_fraction)
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


def drift_correction_for(cfg: ConvertConfig, adapter: Adapter) -> float:
    """The drift correction a conversion uses: ``cfg.drift_correction``, or when unset
    ``DEFAULT_DRIFT_CORRECTION`` for layouts with shared neurons where the architecture allows it,
    else 0.  (Measured on SmolLM2, docs/BENCHMARKS.md 6.9: with shared neurons it lowered the
    WikiText-2 raw-test PPL 10-15%; with 8 balanced experts and none shared it lowered unseen
    WikiText-2 valid 13% but raised the raw test 18%, so it stays off there unless asked for.)
    Set explicitly on an architecture whose FFN output is normalised before the residual add
    (Gemma 2/3): one line of :class:`ConfigError`."""
    if cfg.drift_correction is None:
        return DEFAULT_DRIFT_CORRECTION if adapter.residual_ffn and cfg.n_shared > 0 else 0.0
    if cfg.drift_correction > 0 and not adapter.residual_ffn:
        raise ConfigError(
            f"--drift-correction needs an FFN whose output is added to the residual stream as it is; "
            f"{adapter.family} normalises it first (post-FFN norm); use --drift-correction 0"
        )
    return float(cfg.drift_correction)


def mean_budget(cfg: ConvertConfig, n_converted: int) -> float:
    """Mean experts per token and layer: ``K / L`` (LapSum) or the top-k."""
    if cfg.router != "lapsum" or cfg.budget is None:
        return float(cfg.top_k)
    return float(cfg.budget) / n_converted


def layers_to_convert(cfg: ConvertConfig, n_layers: int) -> list[int]:
    return list(range(n_layers)) if cfg.layers is None else sorted(set(cfg.layers))


class LayerHost(Protocol):
    """Where the decoder layers are between their turns in the layer-wise stage."""

    def onload(self, i: int, dense: bool = False) -> nn.Module:
        """Decoder layer ``i``, its weights on the compute device (``dense``: as in the dense
        checkpoint, even when an earlier run converted it)."""
        ...

    def offload(self, i: int, layer: nn.Module) -> None:
        """Layer ``i`` has had its turn (converted, and its outputs computed)."""
        ...


class InMemoryHost:
    """The whole model in memory (on the CPU); each layer visits ``device`` for its turn."""

    def __init__(self, layers: nn.ModuleList, device: torch.device) -> None:
        self.layers, self.device = layers, device

    def onload(self, i: int, dense: bool = False) -> nn.Module:  # restored layers are swapped in by layerwise_stage
        return self.layers[i].to(self.device)

    def offload(self, i: int, layer: nn.Module) -> None:
        if self.device.type != "cpu":
            layer.to("cpu")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None else None


def layerwise_stage(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: ConvertConfig,
    batch: int = 8,
    progress: Progress | None = None,
    start_layer: int = 0,
    on_layer_done: LayerDone | None = None,
    restored: dict[int, nn.Module] | None = None,
    *,
    host: LayerHost | None = None,
    device: torch.device | str | None = None,
    spill_path: Path | None = None,
    finished: Collection[int] = (),
) -> list[LayerReport]:
    """Convert every chosen layer in order; returns one report per converted layer.

    Each converted layer's FFN becomes a :class:`MoefyMLP` in the model's dtype (the exported
    module; its outputs feed the layers above).  ``restored`` maps already-finished layers (from
    a resumed run) to their fitted FFN modules: they are swapped in without refitting, and still
    feed the layers above; ``finished`` names layers the ``host`` restores itself when it onloads
    them (:class:`moefy.onload.OnloadHost`).  ``device``: where each layer is fitted (default
    CPU); ``spill_path``: keep the carried activations in this file instead of in memory.
    ``on_layer_done(i, report, layer)`` runs once layer ``i`` is converted (before its outputs
    are computed).
    """
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    chosen = layers_to_convert(cfg, len(layers))
    restored = restored or {}
    todo = [i for i in chosen if i not in restored and i not in finished]
    scorer = None
    if cfg.select == "model" and todo:
        if host is not None and not isinstance(host, InMemoryHost):
            raise ConfigError("--select model needs the whole model in memory; convert without layer-by-layer onloading (--no-onload)")
        scorer = HeldOutKL(model, adapter, calib, cfg.val_fraction)  # the dense model's held-out logits, first
    alpha = drift_correction_for(cfg, adapter)
    # --drift-correction on a resumed run: the dense stream still goes through each restored layer's dense FFN
    dense_mlps = {i: layers[i].mlp for i in chosen if i in restored} if alpha > 0 else {}
    for i in chosen:
        if i in restored:
            layers[i].mlp = restored[i]
    if not todo:  # a resumed run with every layer already fitted: no calibration forward needed
        if progress is not None:
            progress("layer-wise", len(layers), len(layers))
        return []
    dev = torch.device(device) if device is not None else torch.device("cpu")
    host = host if host is not None else InMemoryHost(layers, dev)
    batches = list(calib.split(batch))
    rows = [int(b.shape[0]) for b in batches]
    store = ActivationStore(rows, spill_path)
    dense: ActivationStore | None = None
    if alpha > 0:
        dense = ActivationStore(rows, spill_path.with_name(spill_path.name + ".dense") if spill_path is not None else None)
    reports: list[LayerReport] = []

    def put(b: int, x: torch.Tensor) -> None:
        store.put(b, x)
        if dense is not None:
            dense.put(b, x)

    try:
        _, layer_kwargs = capture_inputs(model, adapter, batches, sink=put)
        for i in range(len(layers)):
            kwargs = to_device(layer_kwargs[i], dev)
            if dense is not None and i in finished:  # converted by an earlier run: its dense self, from the checkpoint
                advance_dense_stream(host.onload(i, dense=True), dense, kwargs, dev)
            layer = host.onload(i)
            if i in todo:
                select = None
                if scorer is not None:
                    select = _model_scorer(scorer, i, layer, store, batch, dev)
                reports.append(_convert_layer(layer, i, store, kwargs, adapter, model.config, cfg.for_layer(i), dev, len(chosen), select, dense, alpha))
                if on_layer_done is not None:
                    on_layer_done(i, reports[-1], layer)
            elif dense is not None and i not in finished:  # left dense, or restored: the dense stream takes the dense FFN
                moe = layer.mlp
                layer.mlp = dense_mlps.get(i, moe)
                try:
                    advance_dense_stream(layer, dense, kwargs, dev)
                finally:
                    layer.mlp = moe
            if i == todo[-1]:  # nothing above needs the calibration activations
                host.offload(i, layer)
                break
            with torch.no_grad():
                for b in range(len(store)):
                    store.put(b, _first_tensor(layer(store.get(b).to(dev), **kwargs)))
            host.offload(i, layer)
            if progress is not None:
                progress("layer-wise", i + 1, len(layers))
    finally:
        store.close()
        if dense is not None:
            dense.close()
    if progress is not None:
        progress("layer-wise", len(layers), len(layers))
    return reports


def held_out_inputs(scorer: HeldOutKL, store: ActivationStore, batch: int) -> Callable[[int], torch.Tensor]:
    """``hidden_in`` for :meth:`HeldOutKL.score`: held-out sequence ``j``'s hidden states in ``store``
    (``[1, seq, d_model]``; the store holds the calibration in batches of ``batch`` rows)."""

    def hidden_in(j: int) -> torch.Tensor:
        s = scorer.first + j
        return store.get(s // batch)[s % batch : s % batch + 1]

    return hidden_in


def _model_scorer(
    scorer: HeldOutKL, i: int, layer: nn.Module, store: ActivationStore, batch: int, device: torch.device,
) -> Callable[[], float]:
    """The model-level score of whatever FFN sits in decoder layer ``i`` now: held-out KL through
    the rest of the (in-memory) model, run where the other layers are."""
    home = scorer.model.get_input_embeddings().weight.device
    hidden_in = held_out_inputs(scorer, store, batch)

    def score() -> float:
        if device != home:
            layer.to(home)
        try:
            return scorer.score(i, hidden_in)
        finally:
            if device != home:
                layer.to(device)

    return score


def _best_initial_split(
    layer: nn.Module, mlp: nn.Module, adapter: Adapter, config: Any, ffn: Any, h_sample: torch.Tensor, cfg: ConvertConfig,
    i: int, n_converted: int, data: tuple[torch.Tensor, ...], select: Callable[[], float] | None,
    order: torch.Tensor | None = None,
) -> tuple[str, dict[str, float], dict[str, tuple[DotMoeLayer, LayerReport]]]:
    """``--init best``: each candidate heuristic split (``BEST_INIT_CANDIDATES``) fitted without
    training (least-squares router, the configured weight refit) and scored on held-out tokens:
    by the layer's held-out error, or with ``select`` by the model's held-out KL.  Returns the
    best kind, every candidate's score, and each candidate's fitted layer and report."""
    scores: dict[str, float] = {}
    fitted: dict[str, tuple[DotMoeLayer, LayerReport]] = {}
    for kind in BEST_INIT_CANDIDATES:
        split = initial_split(kind, kind, ffn, h_sample, cfg, cfg.seed + i, order)
        split = Split(split.shared.cpu(), [e.cpu() for e in split.experts])
        fixed = replace(cfg, method=kind, steps=0)
        cand = make_layer(mlp, adapter, config, split, fixed)
        cand.k_budget = mean_budget(cfg, n_converted)
        fitted[kind] = cand, fit_layer(cand, *data, fixed, i)
        cand.eval()
        if select is None:
            scores[kind] = fitted[kind][1].error_final
            continue
        layer.mlp = cand.to_moe_mlp(dtype=adapter.ffn_weights(mlp).gate.dtype)
        try:
            scores[kind] = select()
        finally:
            layer.mlp = mlp
    return min(scores, key=scores.__getitem__), scores, fitted


def _hidden(mlp: nn.Module, adapter: Adapter, ffn: Any, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN's neuron activations ``act(x W_gate) * (x W_up)`` on the tokens ``x`` (fp32)."""
    act = getattr(mlp, adapter.act_attr)
    return act(nn.functional.linear(x, _f32(ffn.gate), _f32(ffn.gate_bias))) * nn.functional.linear(x, _f32(ffn.up), _f32(ffn.up_bias))


@torch.no_grad()
def hidden_sample(mlp: nn.Module, adapter: Adapter, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The dense FFN's neuron activations on a sample of the tokens ``x`` (fp32): what the
    initial splits and the importance scores are computed from."""
    return activation_sample(_hidden(mlp, adapter, adapter.ffn_weights(mlp), x), seed=seed)


@torch.no_grad()
def neuron_order(mlp: nn.Module, adapter: Adapter, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Every neuron of the dense FFN ``mlp``, most worth keeping first, by greedy structured OBS
    (:func:`moefy.splits.obs_order`) for the target ``y`` on the inputs ``x`` (``--shared-by obs``).
    The Gram matrices are summed in fp32 over chunks of ``chunk`` tokens."""
    ffn = adapter.ffn_weights(mlp)
    bias = ffn.down_bias.float() if ffn.down_bias is not None else None
    gram = cross = None
    for s in range(0, x.shape[0], chunk):
        h = _hidden(mlp, adapter, ffn, x[s : s + chunk])
        ys = y[s : s + chunk].float()
        if bias is not None:
            ys = ys - bias
        gram = h.T @ h if gram is None else gram.add_(h.T @ h)
        cross = h.T @ ys if cross is None else cross.add_(h.T @ ys)
    assert gram is not None and cross is not None
    return obs_order(gram, cross, block=max(1, ffn.d_ffn // 96)).cpu()


def _convert_layer(
    layer: nn.Module, i: int, store: ActivationStore, kwargs: dict[str, Any], adapter: Adapter, config: Any,
    cfg: ConvertConfig, device: torch.device, n_converted: int, select: Callable[[], float] | None = None,
    dense: ActivationStore | None = None, alpha: float = 0.0,
) -> LayerReport:
    """Fit decoder layer ``i``'s MoE on its calibration FFN inputs and put it in place.

    With ``select`` (``--select model``): where the recipe trained something (DOT-MoE's assignment
    or router steps), the same layer is also fitted from its initial split without that training,
    and the layer keeps whichever fit ``select()`` scores lower (held-out KL of the model).

    With ``dense`` (``--drift-correction alpha``, the dense model's own hidden states entering the
    layer): the FFN's target is the dense FFN's output plus ``alpha`` x the drift, the dense stream
    minus the converted stream after this (still dense) layer.  At ``alpha = 1`` a perfect fit would
    put the converted stream back on the dense model's after every layer; the error of the layers
    below is then corrected where it lands instead of carried up.  ``dense`` is advanced past the
    layer."""
    mlp = layer.mlp
    dtype = adapter.ffn_weights(mlp).gate.dtype
    moe_outs: list[torch.Tensor] | None = [] if dense is not None else None
    x_in, y_out = collect_ffn_io(layer, mlp, (store.get(b).to(device) for b in range(len(store))), kwargs, moe_outs)
    if dense is not None:
        drift = advance_dense_stream(layer, dense, kwargs, device, moe_outs)
        del moe_outs
        assert drift is not None
        y_out.add_(drift, alpha=alpha)
        del drift
    x_tr, y_tr, x_val, y_val = _split_train_val(x_in, y_out, cfg.val_fraction)
    del x_in, y_out
    ffn = adapter.ffn_weights(mlp)
    h_sample = hidden_sample(mlp, adapter, x_tr, cfg.seed + i)
    order = neuron_order(mlp, adapter, x_tr, y_tr) if needs_order(cfg) else None
    data = (x_tr, y_tr, x_val, y_val)
    best = None
    if cfg.init == "best" and cfg.method in ("dot", "dot-frozen"):
        kind, init_scores, fitted = _best_initial_split(layer, mlp, adapter, config, ffn, h_sample, cfg, i, n_converted, data, select, order)
        best = kind, init_scores, fitted[kind]
        split = best[2][0].split()
    else:
        split = initial_split(cfg.method, cfg.init, ffn, h_sample, cfg, cfg.seed + i, order)
    split = Split(split.shared.cpu(), [e.cpu() for e in split.experts])  # index bookkeeping on the CPU
    del h_sample
    dot = make_layer(mlp, adapter, config, split, cfg)
    dot.k_budget = mean_budget(cfg, n_converted)
    report = fit_layer(dot, *data, cfg, i)
    if best is not None:
        report.init, report.init_scores = best[0], best[1]
    dot.eval()
    layer.mlp = dot.to_moe_mlp(dtype=dtype)
    if select is None or report.steps == 0:
        return report
    if best is not None:  # the chosen start, already fitted without training
        base, base_report = best[2]
    else:
        base = make_layer(mlp, adapter, config, split, cfg)
        base.k_budget = dot.k_budget
        base_report = fit_layer(base, *data, replace(cfg, steps=0), i)
        base.eval()
    trained_kl = select()
    layer.mlp = base.to_moe_mlp(dtype=dtype)
    initial_kl = select()
    kls = {"trained": trained_kl, "initial": initial_kl}
    if trained_kl <= initial_kl:
        layer.mlp = dot.to_moe_mlp(dtype=dtype)
        report.selected, report.model_kl = "trained", kls
        return report
    base_report.selected, base_report.model_kl = "initial", kls
    base_report.init, base_report.init_scores = report.init, report.init_scores
    base_report.seconds += report.seconds
    return base_report


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
