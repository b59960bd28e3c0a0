"""The conversion pipeline: dense model -> model whose FFNs are :class:`DotMoeLayer`.

Layer-wise stage (llm-compressor's sequential pipeline): calibration activations enter
decoder layer 0; for each layer in turn, its FFN inputs (produced by the already-converted
layers below) and the dense FFN's outputs are collected, the layer's MoE is fitted
(:func:`moefy.layerwise.fit_layer`), the layer is swapped in place, and its outputs feed the
next layer.  Memory: one layer plus the cached hidden states of the calibration tokens.

End-to-end stage: all assignments and routers (optionally all FFN weights) trained jointly on
KL(dense || MoE) over the logits plus LM cross-entropy, the dense FFNs acting as teacher.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .config import ConvertConfig
from .dotmoe import DotMoeLayer
from .errors import NonFiniteLossError
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
    routed_n = d_ffn - cfg.n_shared
    active_fraction = (cfg.n_shared + cfg.top_k * routed_n / cfg.n_experts) / d_ffn
    if method == "prune":
        keep = int(round(active_fraction * d_ffn))
        imp = pruning_importance(h, ffn)
        return Split(torch.sort(imp.topk(keep).indices).values, [])
    if cfg.shared_by == "importance" and cfg.n_shared > 0:
        shared = torch.sort(pruning_importance(h, ffn).topk(cfg.n_shared).indices).values
    else:
        shared = choose_shared(h, cfg.n_shared, active_fraction)
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


def dot_layers(model: nn.Module) -> list[DotMoeLayer]:
    return [m for m in model.modules() if isinstance(m, DotMoeLayer)]


@dataclass
class E2EResult:
    """What the end-to-end stage did: training KL per step, held-out KL at each evaluation
    (``(step, kl)``; step 0 is the layer-wise result) and the step whose state was kept."""

    losses: list[float]
    val_kl: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None


def e2e_stage(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: ConvertConfig,
    teacher_mlps: dict[int, nn.Module],
    progress: Progress | None = None,
    checkpoint: Callable[[int, dict[str, torch.Tensor], dict[str, Any], list[float]], None] | None = None,
    checkpoint_every: int = 25,
    resume: tuple[int, dict[str, torch.Tensor], dict[str, Any], list[float]] | None = None,
) -> E2EResult:
    """Joint training of all assignments and routers (and weights if ``e2e_lr_weights > 0``)
    on KL(dense || MoE) + LM cross-entropy + z-loss + load balance.

    The last ``e2e_val_sequences`` calibration sequences are held out. Every ``e2e_eval_every``
    steps the KL on them is measured (with the hard routing the exported model uses), and the
    best state is kept, the layer-wise result included: the stage never makes held-out KL worse.

    Every ``checkpoint_every`` steps ``checkpoint(step, layer_states, optimizer_state, losses)``
    is called; ``resume`` (the same tuple) continues from such a checkpoint, replaying the batch
    sampler so the result equals an uninterrupted run."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    dots = {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, DotMoeLayer)}
    for d in dots.values():
        if cfg.method == "dot":
            d.learn_assignment = True
            d.affinity.requires_grad_(True)
            with torch.no_grad():
                d.affinity.copy_(3.0 * d.affinity.new_zeros(d.affinity.shape).scatter_(1, d.fixed_assign[:, None], 1.0))
            d.tau = cfg.tau_end
        d.train()
    groups = [{"params": [p for d in dots.values() for p in d.router.parameters()], "lr": cfg.e2e_lr_router}]
    if cfg.method == "dot":
        groups.append({"params": [d.affinity for d in dots.values()], "lr": cfg.e2e_lr_affinity})
    if cfg.e2e_lr_weights > 0:
        ws = [w for d in dots.values() for w in (d.gate, d.up, d.down)]
        for w in ws:
            w.requires_grad_(True)
        groups.append({"params": ws, "lr": cfg.e2e_lr_weights})
    lapsum = cfg.router == "lapsum"
    learn_budget = lapsum and cfg.budget_mode == "learned" and len(dots) > 1
    order = sorted(dots)
    total_budget = float(cfg.budget) if cfg.budget is not None else float(cfg.top_k) * len(dots)
    eta = nn.Parameter(torch.zeros(len(dots)), requires_grad=learn_budget)
    if lapsum:
        groups[0]["params"] = groups[0]["params"] + [d.log_alpha for d in dots.values()]
    if learn_budget:
        groups.append({"params": [eta], "lr": cfg.lr_budget})
    opt = torch.optim.Adam(groups)
    n_val = min(cfg.e2e_val_sequences, calib.shape[0] // 2)
    val_ids = calib[calib.shape[0] - n_val:]
    calib = calib[: calib.shape[0] - n_val]
    # what training changes: trainable tensors, LapSum thresholds and the budget logits
    trainable = {id(q) for g in groups for q in g["params"]}
    tracked = {f"{i}.{n}": p for i, d in dots.items() for n, p in d.named_parameters() if id(p) in trainable}
    tracked.update({f"{i}.threshold": d.threshold for i, d in dots.items()})
    tracked["budget.eta"] = eta
    best: dict[str, torch.Tensor] = {}
    history: list[tuple[int, float]] = []
    start_step, losses = 0, []
    if resume is not None:
        start_step, states, opt_state, losses = resume[0], resume[1], resume[2], list(resume[3])
        for i, d in dots.items():
            d.load_state_dict({k.split(".", 1)[1]: v for k, v in states.items() if k.split(".", 1)[0] == str(i)})
        if "budget.eta" in states:
            with torch.no_grad():
                eta.copy_(states["budget.eta"])
        best = {k[5:]: v for k, v in states.items() if k.startswith("best.") and k != "best.history"}
        if "best.history" in states:
            history = [(int(s), float(v)) for s, v in states["best.history"].tolist()]
        opt.load_state_dict(opt_state)
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    for _ in range(start_step):  # replay the sampler so a resumed run sees the same batches
        torch.randint(0, calib.shape[0], (min(cfg.e2e_batch, calib.shape[0]),), generator=gen)
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)
    from .lapsum import layer_budgets

    def set_budgets(detach: bool = False) -> None:
        if not lapsum:
            return
        k_l = layer_budgets(eta, total_budget) if learn_budget else torch.full((len(order),), total_budget / len(order))
        for j, i in enumerate(order):
            dots[i].k_budget = float(k_l[j].detach()) if detach else k_l[j]

    recalib_ids = calib[: min(4, calib.shape[0])]

    def recalibrate() -> None:
        if not lapsum:
            return
        set_budgets(detach=True)
        xs: dict[int, torch.Tensor] = {}
        handles = [layers[i].mlp.register_forward_hook(
            lambda m, a, o, i=i: xs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).detach())) for i in order]
        with torch.no_grad():
            model(input_ids=recalib_ids, use_cache=False)
        for h in handles:
            h.remove()
        for i in order:
            dots[i].calibrate_threshold(xs[i])

    @torch.no_grad()
    def teacher_logp(ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the dense model: its FFNs swapped in for one forward."""
        for i in dots:
            layers[i].mlp = teacher_mlps[i]
        try:
            return torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        finally:
            for i, d in dots.items():
                layers[i].mlp = d

    def val_kl() -> float:
        """Mean per-token KL(dense || MoE) on the held-out sequences, hard routing, no grad."""
        recalibrate()
        for d in dots.values():
            d.eval()
        total = 0.0
        with torch.no_grad():
            for j in range(0, n_val, cfg.e2e_batch):
                ids = val_ids[j : j + cfg.e2e_batch]
                t_logp = teacher_logp(ids)
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
                total += float((t_logp.exp() * (t_logp - logp)).sum(-1).sum())
        for d in dots.values():
            d.train()
        return total / max(1, val_ids.numel())

    def evaluate(step: int) -> None:
        """Score the current state on held-out text; keep it if it is the best so far."""
        if not n_val:
            return
        score = val_kl()
        if not math.isfinite(score):
            raise NonFiniteLossError(f"non-finite held-out KL in the end-to-end stage at step {step}; lower the learning rates")
        if not history or score < min(v for _, v in history):
            best.clear()
            best.update({k: v.detach().clone() for k, v in tracked.items()})
        history.append((step, score))

    if n_val and start_step == 0:
        evaluate(0)  # the layer-wise result is the state to beat
    for step in range(start_step, cfg.e2e_steps):
        if lapsum and step % 10 == 0:
            recalibrate()
        set_budgets()
        ids = calib[torch.randint(0, calib.shape[0], (min(cfg.e2e_batch, calib.shape[0]),), generator=gen)]
        t_logp = teacher_logp(ids)
        out = model(input_ids=ids, use_cache=False)
        logits = out.logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        kl = (t_logp.exp() * (t_logp - logp)).sum(-1).mean()
        ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        aux = [d.aux_losses() for d in dots.values()]
        zl = torch.stack([a[0] for a in aux]).mean()
        lb = torch.stack([a[1] for a in aux]).mean()
        loss = cfg.kl_weight * kl + cfg.ce_weight * ce + cfg.z_loss_weight * zl + cfg.balance_weight * lb
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss in the end-to-end stage at step {step}; lower the learning rates")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(kl.detach()))
        if (step + 1) % cfg.e2e_eval_every == 0 or step + 1 == cfg.e2e_steps:
            evaluate(step + 1)
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0) and step + 1 < cfg.e2e_steps:
            states = {f"{i}.{k}": v for i, d in dots.items() for k, v in d.state_dict().items()}
            states["budget.eta"] = eta.detach().clone()
            states.update({f"best.{k}": v for k, v in best.items()})
            if history:
                states["best.history"] = torch.tensor(history, dtype=torch.float64)
            checkpoint(step + 1, states, opt.state_dict(), losses)
        if progress is not None:
            progress("end-to-end", step + 1, cfg.e2e_steps)
    best_step = None
    if best:
        best_step = min(history, key=lambda sv: sv[1])[0]
        with torch.no_grad():
            for k, v in best.items():
                tracked[k].copy_(v)
    set_budgets(detach=True)
    for d in dots.values():
        d.freeze_assignment()
        for w in (d.gate, d.up, d.down):
            w.requires_grad_(False)
        d.log_alpha.requires_grad_(False)
        d.eval()
    if best_step is None:
        recalibrate()  # the kept state's thresholds were calibrated when it was scored
    return E2EResult(losses, history, best_step)


def active_fraction(cfg: ConvertConfig, d_ffn: int) -> float:
    if cfg.method == "prune":
        routed = d_ffn - cfg.n_shared
        return (cfg.n_shared + cfg.top_k * routed / cfg.n_experts) / d_ffn
    split_sizes = d_ffn - cfg.n_shared
    return (cfg.n_shared + cfg.top_k * split_sizes / cfg.n_experts) / d_ffn


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


def now() -> float:
    return time.time()
