"""Layer-wise calibration: fit one FFN's split, router and (optionally) weights to its dense output.

For one decoder layer, given the FFN inputs ``x`` seen on calibration text (produced by the
already-converted layers below) and the dense FFN's outputs ``y`` for those inputs:

1. an initial split (a heuristic, or the DOT-MoE initialisation) and a router initialised by
   ridge regression onto each expert's contribution norm (so routing starts near the oracle
   routing of the initial split instead of at random);
2. Adam on the router (and, for DOT-MoE, the affinity ``A`` through Sinkhorn + STE) against
   the relative output error plus z-loss and load balance, temperature annealed, keeping the
   state with the best held-out error;
3. weight adaptation with the split frozen: a ridge refit of ``W_down`` shrunk toward the
   dense ``W_down`` (closed form, exact optimum for the fixed routing) and/or gradient training
   of gate/up/down with early stopping on held-out tokens (``ridge+grad``: the refit first, the
   gradient steps from it, the refit again; ``grad+ridge``, the other order, was measured worse,
   docs/BENCHMARKS.md section 6.11).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import RIDGE_GAMMAS, ConvertConfig
from .dotmoe import DotMoeLayer
from .errors import NonFiniteLossError
from .ot import geometric_schedule
from .routing import expert_load


def relative_error(y_hat: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """``sum_t w_t ||y_hat_t - y_t||^2 / sum_t w_t ||y_t||^2`` (normalised MSE; ``w = 1`` if absent)."""
    return float(_relative_loss(y_hat, y, w))


def token_weights(y: torch.Tensor, ref: torch.Tensor | None, clip: float) -> torch.Tensor:
    """Per-token loss weights that cap a token's energy ``||y_t||^2`` at ``clip`` x the median
    energy of ``ref`` (default ``y``): ``w_t = min(1, clip * median / ||y_t||^2)``.

    Measured on SmolLM2-135M (WikiText-2, 512-token windows): in layers 11 and 28 the first token
    of each window (the attention sink) carries 89% and 82% of the FFN output energy, and 1% of
    the tokens carry 46-100% in layers 1, 2, 9, 10, 11 and 28.  An unweighted summed MSE then fits
    those few tokens and ignores the rest; capped weights keep the outliers important (each
    counts as ``clip`` typical tokens) without letting them own the loss.
    """
    e = y.float().pow(2).sum(-1)
    med = (ref.float().pow(2).sum(-1) if ref is not None else e).median().clamp(min=1e-12)
    return (clip * med / e.clamp(min=1e-12)).clamp(max=1.0)


@dataclass
class LayerReport:
    layer: int
    error_init: float = math.nan
    error_routed: float = math.nan
    error_final: float = math.nan
    neurons_moved: int = 0
    expert_load: list[float] = field(default_factory=list)
    steps: int = 0
    weight_steps: int = 0  # gradient steps of --weights grad run (== cfg.weight_steps: stopped by the cap, not early)
    seconds: float = 0.0
    weight_mode: str = "none"
    ridge_gamma: float | None = None
    mean_active: float = math.nan  # experts run per held-out token
    k_budget: float = math.nan
    init: str | None = None  # --init best: the initial split chosen for this layer
    init_scores: dict[str, float] | None = None  # --init best: each candidate's held-out score
    selected: str | None = None  # --select model: "trained" or "initial" (the fit kept)
    model_kl: dict[str, float] | None = None  # --select model: held-out KL of the model with each fit

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@torch.no_grad()
def _eval_error(
    layer: DotMoeLayer,
    x: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor | None,
    w: torch.Tensor | None = None,
    chunk: int = 8192,
) -> float:
    num = torch.zeros((), device=x.device)
    den = torch.zeros((), device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs, ys = x[s : s + chunk], y[s : s + chunk]
        hs = h[s : s + chunk] if h is not None else None
        ws = w[s : s + chunk, None] if w is not None else 1.0
        out = layer(xs, hs)
        num += ((out - ys).pow(2) * ws).sum()
        den += (ys.pow(2) * ws).sum()
    return float(num / den.clamp(min=1e-12))


def _plus_diagonal(gram: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """``gram + lam * I`` (the same values) without materialising ``I`` and ``lam * I``: at
    ``d_ffn = 11008`` each of those is 485 MB."""
    out = gram.clone()
    out.diagonal().add_(lam)
    return out


@torch.no_grad()
def router_factor(x: torch.Tensor, ridge: float = 1e-2, w: torch.Tensor | None = None) -> torch.Tensor:
    """The Cholesky factor of the least-squares router's normal matrix ``X^T diag(w) X + lam I``.

    It depends only on the layer's calibration inputs, so a layer computes it once and reuses it
    for every router refit (measured on SmolLM2 at the main job's layout: the Gram matrix was
    recomputed 6 times per layer, a tenth of the layer's fitting time)."""
    xx = x.float()
    xw = xx * w[:, None] if w is not None else xx
    gram = xw.T @ xx
    lam = ridge * gram.diagonal().mean()
    return torch.linalg.cholesky(_plus_diagonal(gram, lam))


@torch.no_grad()
def init_router(
    layer: DotMoeLayer, x: torch.Tensor, h: torch.Tensor, ridge: float = 1e-2, w: torch.Tensor | None = None,
    factor: torch.Tensor | None = None,
) -> None:
    """Least-squares router: logits ~ log of each expert's output norm (centred per token),
    rows weighted by ``w`` when given.  ``factor``: :func:`router_factor` of the same ``x``,
    ``ridge`` and ``w`` (computed here when not given)."""
    split = layer.split()
    # ||h_e D_e^T|| per token through each expert's small Gram matrix D_e^T D_e (the same norm
    # at n_e / d_model of the cost of forming every token's output), the columns of h and D
    # gathered once in expert order: 8-10x faster than a gather and an output per expert
    # (measured at SmolLM2's shapes, 14k tokens x 26 experts: 0.24 s against 1.9-2.4 s)
    order = torch.cat([torch.as_tensor(idx, dtype=torch.long) for idx in split.experts]).to(h.device)
    hp, dp = h.index_select(1, order), layer.down.index_select(1, order)
    targets, start = [], 0
    for idx in split.experts:
        n = len(idx)
        hi, de = hp[:, start : start + n], dp[:, start : start + n]
        start += n
        sq = ((hi @ (de.T @ de)) * hi).sum(dim=-1)
        targets.append(sq.clamp(min=0).sqrt())
    del hp, dp
    t = torch.log(torch.stack(targets, dim=-1) + 1e-6)
    t = t - t.mean(dim=-1, keepdim=True)
    if factor is None:
        factor = router_factor(x, ridge, w)
    xw = x.float() * w[:, None] if w is not None else x.float()
    sol = torch.cholesky_solve(xw.T @ t, factor)
    layer.router.weight.copy_(sol.T)


def _relative_loss(y_hat: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    ws = w[:, None] if w is not None else 1.0
    return ((y_hat - y).pow(2) * ws).sum() / (y.pow(2) * ws).sum().clamp(min=1e-12)


def _check_finite(loss: torch.Tensor, layer_idx: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss in layer {layer_idx} at step {step}; lower the learning rates")


def _step(
    layer: DotMoeLayer,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor | None,
    w: torch.Tensor | None,
    cfg: ConvertConfig,
    layer_idx: int,
    step: int,
) -> None:
    """One Adam step on (token-weighted) relative output error + z-loss + load balance."""
    out = layer(x, h)
    zl, lb = layer.aux_losses()
    loss = _relative_loss(out, y, w) + cfg.z_loss_weight * zl + cfg.balance_weight * lb
    _check_finite(loss, layer_idx, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


FFN_WEIGHTS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def snapshot(layer: DotMoeLayer) -> dict[str, torch.Tensor]:
    """A copy of the state training can change: all of it but the frozen FFN weights (which
    make up nearly all of a layer's bytes; copying them at every kept step doubled its memory)."""
    frozen = {n for n in FFN_WEIGHTS if getattr(layer, n) is not None and not getattr(layer, n).requires_grad}
    return {k: v.detach().clone() for k, v in layer.state_dict().items() if k not in frozen}


def restore(layer: DotMoeLayer, state: dict[str, torch.Tensor]) -> None:
    """Back to a :func:`snapshot` (the frozen weights it left out have not changed)."""
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(FFN_WEIGHTS), (missing, unexpected)


@dataclass
class _Data:
    """One layer's calibration tensors: train and held-out FFN inputs/outputs, optional
    precomputed intermediate activations ``h`` and token weights ``w``."""

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    w: torch.Tensor | None = None
    w_val: torch.Tensor | None = None
    h: torch.Tensor | None = None
    h_val: torch.Tensor | None = None

    factor: torch.Tensor | None = None

    def val_error(self, layer: DotMoeLayer) -> float:
        return _eval_error(layer, self.x_val, self.y_val, self.h_val, self.w_val)

    def init_router(self, layer: DotMoeLayer) -> None:
        """The least-squares router on the training tokens (the normal matrix factored once)."""
        assert self.h is not None
        if self.factor is None:
            self.factor = router_factor(self.x, w=self.w)
        init_router(layer, self.x, self.h, w=self.w, factor=self.factor)

    def batch(self, size: int, gen: torch.Generator, with_h: bool) -> tuple[torch.Tensor, ...]:
        # a CPU generator: the same batches on every device
        idx = torch.randint(0, self.x.shape[0], (min(size, self.x.shape[0]),), generator=gen).to(self.x.device)
        h = self.h[idx] if with_h and self.h is not None else None
        w = self.w[idx] if self.w is not None else None
        return self.x[idx], self.y[idx], h, w


def _keep_best(
    layer: DotMoeLayer,
    opt: torch.optim.Optimizer,
    data: _Data,
    cfg: ConvertConfig,
    layer_idx: int,
    gen: torch.Generator,
    steps: int,
    with_h: bool,
    patience: int | None = None,
    before_eval: Callable[[int], Callable[[], None] | None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Adam steps with a held-out evaluation every ``cfg.eval_every`` steps; the layer ends in
    its best held-out state (the starting state included).  Stops early after ``patience``
    evaluations without improvement when given.  ``before_eval`` may change the layer into the
    candidate to score and return a function that undoes the change before training goes on.
    Returns (best error, steps run)."""
    best = data.val_error(layer)
    best_state = snapshot(layer)
    best_tau = layer.tau
    bad = 0
    step = 0
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x, y, h, w = data.batch(cfg.batch_tokens, gen, with_h)
        _step(layer, opt, x, y, h, w, cfg, layer_idx, step)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            undo = before_eval(step) if before_eval is not None else None
            err = data.val_error(layer)
            if err < best:
                best, best_state, best_tau, bad = err, snapshot(layer), layer.tau, 0
            else:
                bad += 1
            if undo is not None:
                undo()
            if patience is not None and bad >= patience:
                break
    restore(layer, best_state)
    layer.tau = best_tau
    return best, step + 1 if steps else 0


def train_routing(layer: DotMoeLayer, data: _Data, cfg: ConvertConfig, layer_idx: int, gen: torch.Generator) -> tuple[float, int]:
    """Train router (and affinity) with weights frozen and ``h`` precomputed; keep the best
    held-out state.  Returns (best held-out error, steps run)."""
    params = [{"params": list(layer.router.parameters()), "lr": cfg.lr_router}]
    if layer.router_type == "lapsum":
        params[0]["params"].append(layer.log_alpha)
    if layer.learn_assignment:
        params.append({"params": [layer.affinity], "lr": cfg.lr_affinity})
    opt = torch.optim.Adam(params)

    def anneal(step: int) -> None:
        layer.tau = geometric_schedule(cfg.tau_start, cfg.tau_end, step, cfg.steps)

    def candidate(step: int) -> Callable[[], None] | None:
        """Score the current assignment with whichever router is better on held-out tokens: the
        STE-trained one or the least-squares router refitted to this assignment.  Without the
        refit a good assignment is rejected whenever the STE router lags behind it (measured:
        at k = E/2 on SmolLM2 no assignment step was ever kept)."""
        layer.calibrate_threshold(data.x[:8192])
        if not (cfg.ls_router_eval and layer.learn_assignment):
            return None
        trained = copy.deepcopy(layer.router.state_dict())
        err_ste = data.val_error(layer)
        data.init_router(layer)
        layer.calibrate_threshold(data.x[:8192])
        if data.val_error(layer) >= err_ste:
            layer.router.load_state_dict(trained)
            layer.calibrate_threshold(data.x[:8192])
            return None

        def undo() -> None:
            layer.router.load_state_dict(trained)
            layer.calibrate_threshold(data.x[:8192])

        return undo

    return _keep_best(
        layer, opt, data, cfg, layer_idx, gen, cfg.steps, with_h=True, before_step=anneal, before_eval=candidate,
    )


@torch.no_grad()
def ridge_refit_down(
    layer: DotMoeLayer,
    data: _Data,
    gammas: tuple[float, ...] = RIDGE_GAMMAS,
    chunk: int = 8192,
) -> tuple[float, float | None]:
    """Refit ``W_down`` for the fixed routing: ``min sum_t w_t ||z_t W - y_t||^2 + lam ||W - W_down||^2``
    with ``Z = H * mask``; ``lam = gamma * tr(Z^T diag(w) Z)/n``, gamma chosen on held-out
    tokens (keeping the current weights if no gamma helps).  Returns (held-out error, gamma)."""
    x, y = data.x, data.y
    n = layer.d_ffn
    gram = zty = None  # the first chunk's products are the sums so far (no zeros, no second n x n buffer)
    bias = layer.down_bias if layer.down_bias is not None else torch.zeros(y.shape[1], device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        z = layer.hidden(xs) * layer.neuron_mask(xs)
        zw = z * data.w[s : s + chunk, None] if data.w is not None else z
        gram = zw.T @ z if gram is None else gram.add_(zw.T @ z)
        zty = zw.T @ (y[s : s + chunk] - bias) if zty is None else zty.add_(zw.T @ (y[s : s + chunk] - bias))
        del z, zw
    assert gram is not None and zty is not None
    w0 = layer.down.detach().T.clone()
    scale = gram.diagonal().mean()
    saved_h, data.h_val = data.h_val, None
    best = data.val_error(layer)
    best_w, best_gamma = w0, None
    for gamma in gammas:
        lam = gamma * scale
        w = torch.linalg.solve(_plus_diagonal(gram, lam), zty + lam * w0)
        layer.down.copy_(w.T)
        err = data.val_error(layer)
        if err < best:
            best, best_w, best_gamma = err, w, gamma
    layer.down.copy_(best_w.T)
    data.h_val = saved_h
    return best, best_gamma


def train_weights(
    layer: DotMoeLayer, data: _Data, cfg: ConvertConfig, layer_idx: int, gen: torch.Generator, patience: int = 3
) -> tuple[float, int]:
    """Gradient training of gate/up/down and router with the split frozen; early stopping
    on held-out error (the best state is kept).  Returns (best held-out error, steps run)."""
    weights = [layer.gate, layer.up, layer.down]
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.Adam(
        [{"params": weights, "lr": cfg.lr_weights}, {"params": layer.router.parameters(), "lr": cfg.lr_router / 3}]
    )
    saved = data.h_val
    data.h_val = None  # the weights change, so h must be recomputed
    try:
        best, steps = _keep_best(layer, opt, data, cfg, layer_idx, gen, cfg.weight_steps, with_h=False, patience=patience)
    finally:
        data.h_val = saved
        for w in weights:
            w.requires_grad_(False)
    return best, steps


def fit_layer(
    layer: DotMoeLayer,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: ConvertConfig,
    layer_idx: int,
) -> LayerReport:
    """Run the whole layer-wise recipe on one layer (see the module docstring).

    Measured on SmolLM2-135M (layers 15 and 25, E=8, k=2): the least-squares router is within
    0.03-0.04 of the greedy oracle routing of its split, while STE training of a linear router
    from it made the held-out error *worse* (0.55 -> 0.59, 0.45 -> 0.51), so after the
    assignment is learned the router is refitted by least squares and kept only if it beats
    the STE-trained one on held-out tokens.

    All errors are token-weighted (:func:`token_weights`) when ``cfg.token_weighting == "clip"``.
    """
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + layer_idx)
    report = LayerReport(layer=layer_idx, weight_mode=cfg.weights)
    data = _Data(x, y, x_val, y_val)
    if cfg.token_weighting == "clip":
        data.w = token_weights(y, None, cfg.token_clip)
        data.w_val = token_weights(y_val, y, cfg.token_clip)
    with torch.no_grad():
        data.h = layer.hidden(x)
        data.h_val = layer.hidden(x_val)
    init_assign = layer.fixed_assign.clone()
    if layer.n_experts > 0:
        data.init_router(layer)
        layer.calibrate_threshold(x[:8192])
    report.error_init = data.val_error(layer)
    report.error_routed = report.error_init
    # dot-frozen is the paper's sequential ablation: the assignment frozen at its initialisation,
    # only the router trained (STE); the best held-out state is kept, the LS router included
    train = layer.learn_assignment or layer.router_type == "lapsum" or cfg.method == "dot-frozen"
    if cfg.steps > 0 and train and layer.n_experts > 0:
        report.error_routed, report.steps = train_routing(layer, data, cfg, layer_idx, gen)
    layer.freeze_assignment()
    report.neurons_moved = int((layer.fixed_assign != init_assign).sum())
    if layer.n_experts > 0 and report.neurons_moved > 0:
        trained = snapshot(layer)
        data.init_router(layer)
        layer.calibrate_threshold(x[:8192])
        err = data.val_error(layer)
        if err < report.error_routed:
            report.error_routed = err
        else:
            restore(layer, trained)
    data.h = data.h_val = None
    err = report.error_routed
    gammas = RIDGE_GAMMAS if cfg.ridge_gamma is None else (float(cfg.ridge_gamma),)
    if cfg.weights == "ridge+grad":
        # the closed-form optimum of W_down first, so the gradient steps start from it (and, keeping
        # the best held-out state, can only improve on it); then W_down again for the new gate/up
        err, report.ridge_gamma = ridge_refit_down(layer, data, gammas)
    if cfg.weights in ("grad", "grad+ridge", "ridge+grad"):
        err, report.weight_steps = train_weights(layer, data, cfg, layer_idx, gen)
    if cfg.weights in ("ridge", "grad+ridge", "ridge+grad"):
        err, report.ridge_gamma = ridge_refit_down(layer, data, gammas)
    report.error_final = err
    with torch.no_grad():
        layer(x_val[:8192])
    if layer.n_experts > 0:
        report.expert_load = [round(v, 4) for v in expert_load(layer.aux["hard"]).tolist()]
        report.mean_active = float(layer.aux["hard"].sum(-1).mean())
        report.k_budget = float(layer.k_budget)
    report.seconds = time.time() - t0
    return report
