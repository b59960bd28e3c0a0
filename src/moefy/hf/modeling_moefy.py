"""Modeling code of a moefy Mixture-of-Experts checkpoint (self-contained: torch + transformers only).

A converted model is the dense base model with each chosen decoder layer's gated FFN replaced
by :class:`MoefyMLP`: the FFN's neurons are permuted so that ``n_shared`` always-active
neurons come first and each routed expert's neurons follow contiguously, so an expert is a
row slice of ``gate_proj``/``up_proj`` and a column slice of ``down_proj`` (a view, no copy).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN

try:  # relative import inside an exported checkpoint (trust_remote_code)
    from .configuration_moefy import MoefyConfig
except ImportError:  # pragma: no cover - plain import when vendored elsewhere
    from configuration_moefy import MoefyConfig  # type: ignore[no-redef]


# =========================================================================== routing and gating
# The one definition of routing: which experts a token runs and with what weight.  Everything
# that routes uses these functions: MoefyMLP below (prefill, batch-1 decode, forward_reference),
# moefy's training layer (moefy.dotmoe.DotMoeLayer, and moefy.routing, whose straight-through
# estimator only adds gradients) and moefy.lapsum (threshold calibration, per-layer budgets).
# The compiled decode kernel (moefy.kernels) cannot import Python: its route() mirrors
# topk_experts (same tie rule) and is used only for mask gating, where every weight is 1.
# tests/test_routing_agreement.py checks that all of them agree token by token.
#
# Routing is a function of the router logits.  The logits themselves are a matmul, whose last bit
# can depend on the summation order of the BLAS call (batch size, kernel), as in any model.

GATINGS = ("mask", "softmax", "softmax-renorm")  # weights of the top-k router's chosen experts
_TOPK_FAST_MIN_ROWS = 64  # CPU, many rows: torch.topk plus a tie check beats a stable sort


def topk_experts(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` of the ``k`` largest logits per row: the experts a token runs.

    Tie rule: among equal logits the lower expert index wins (``torch.topk`` leaves ties
    unspecified, and picked the higher index on CPU).  The chosen set is defined; the order of
    the returned indices is by logit, and unspecified among equal logits.
    """
    n = logits.shape[-1]
    if k >= n:
        return torch.arange(n, device=logits.device).expand(*logits.shape[:-1], n)
    if logits.device.type == "cpu" and logits.numel() >= _TOPK_FAST_MIN_ROWS * n:
        top = logits.topk(k, dim=-1)
        if not bool((logits >= top.values[..., -1:]).sum(-1).gt(k).any()):  # no tie at the k-th place
            return top.indices
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]


def gating_weights(logits: torch.Tensor, idx: torch.Tensor, gating: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Weights ``[..., k]`` of the chosen experts ``idx`` (``None`` for ``mask``: each weight is 1),
    computed in fp32 and rounded once to ``dtype``; differentiable in ``logits``.

    ``softmax``: the softmax over all experts at the chosen ones; ``softmax-renorm``: the softmax
    over the chosen logits only (Mixtral's, sums to 1).
    """
    if gating == "mask":
        return None
    if gating == "softmax":
        return torch.softmax(logits.float(), dim=-1).gather(-1, idx).to(dtype)
    if gating == "softmax-renorm":
        return torch.softmax(logits.float().gather(-1, idx), dim=-1).to(dtype)
    raise ValueError(f"unknown gating {gating!r}; choose one of {', '.join(GATINGS)}")


def topk_route(logits: torch.Tensor, k: int, gating: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top-k router: chosen experts ``[..., k]`` and their weights (``None``: all 1)."""
    idx = topk_experts(logits, k)
    return idx, gating_weights(logits, idx, gating, dtype)


def scatter_weights(logits: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor | None) -> torch.Tensor:
    """Dense ``[..., E]`` weights (logits' dtype) from chosen experts: ``vals`` there (1 if ``None``), 0 elsewhere."""
    src = torch.ones(idx.shape, dtype=logits.dtype, device=logits.device) if vals is None else vals.to(logits.dtype)
    return torch.zeros_like(logits).scatter(-1, idx, src)


# --------------------------------------------------------------------------- LapSum soft top-k
# SoftMoE's LapSum router.  For scores ``r`` (one row per token, ``n`` experts), a temperature
# ``alpha > 0`` and a real budget ``k`` in ``(0, n)`` the weights are ``p_i = F((r_i - t) / alpha)``,
# ``F`` the standard Laplace CDF, with the threshold ``t`` chosen so that ``sum_i p_i = k``.
#
# Closed-form threshold.  ``S(t) = sum_i F((r_i - t) / alpha)`` decreases strictly from ``n`` to 0.
# Sort the scores descending, ``s_1 >= ... >= s_n``, and write ``u_i = s_i / alpha``,
# ``tau = t / alpha``.  When ``s_{m+1} <= t <= s_m``,
#     S = m - 0.5 e^tau A + 0.5 e^-tau B,   A = sum_{i<=m} e^(-u_i),  B = sum_{i>m} e^(u_i),
# and ``S = k`` is the quadratic ``A z^2 - 2 d z - B = 0`` in ``z = e^tau`` (``d = m - k``), with
# positive root ``z = (d + sqrt(d^2 + AB)) / A`` (= ``B / (sqrt(d^2 + AB) - d)``, cancellation-free
# for ``d < 0``).  ``m`` is the number of sorted scores with ``S(s_j) <= k``, every ``S(s_j)`` from two
# cumulative sums.  The root is evaluated in the log domain relative to a pivot score next to ``t``,
# so nothing overflows however large the scores or small ``alpha``; a root outside its own interval
# (rounding, spread ~ alpha / eps) moves ``m`` until consistent, and one Newton step on ``tau``
# (residual accumulated in float64) removes the remaining rounding.  Ties are harmless:
# ``F(0) = 1/2`` from both sides.  The gradient is exact (implicit differentiation, :class:`LapSumTopK`).

Scalar = float | int | torch.Tensor


def laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard Laplace CDF ``F(x)``: ``0.5 e^x`` for ``x < 0``, ``1 - 0.5 e^-x`` otherwise."""
    half = 0.5 * torch.exp(-x.abs())
    return torch.where(x < 0, half, 1.0 - half)


def lapsum_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    """dtype for per-row sums and for ``k`` itself (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _as_row_param(value: Scalar, batch_shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``k`` / ``alpha`` as a ``[..., 1]`` tensor broadcast over the rows of ``scores``."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() > len(batch_shape):
        raise ValueError(
            f"k/alpha of shape {tuple(t.shape)} must broadcast to the batch shape {tuple(batch_shape)} "
            "(one value per row of scores)"
        )
    return t.expand(batch_shape).unsqueeze(-1)


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(e^a + e^b)``, the same in every row whatever the batch (``torch.logaddexp`` on CPU
    rounds differently in its vectorised body and its tail, so a token's LapSum weights would
    depend on which tokens share its batch)."""
    hi = torch.maximum(a, b)
    out = hi + torch.log1p(torch.exp(-(a - b).abs()))
    return torch.where(hi == -math.inf, hi, out)


def _piece_root(rs: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Root of the piece of ``S(t) = k`` that treats the top ``m`` sorted scores as upper:
    ``(pivot, tau)`` with ``t = pivot + alpha * tau``.  The pivot is ``s_m`` when ``d = m - k >= 0``,
    else ``s_{m+1}``, so ``|tau|`` stays small wherever ``z`` is not saturated.  Finite for every
    ``m`` in ``[0, n]`` when ``0 < k < n``."""
    n = rs.shape[-1]
    d = m.to(rs.dtype) - k
    pivot = torch.gather(rs, -1, torch.where(d >= 0, m - 1, m).clamp(0, n - 1))
    v = (rs - pivot) / alpha
    upper = torch.arange(n, device=rs.device) < m  # sorted positions counted above t
    neg_inf = torch.tensor(-math.inf, dtype=rs.dtype, device=rs.device)
    log_a = torch.logsumexp(torch.where(upper, -v, neg_inf), dim=-1, keepdim=True)
    log_b = torch.logsumexp(torch.where(upper, neg_inf, v), dim=-1, keepdim=True)
    log_d = torch.log(d.abs())
    log_root = _logaddexp(log_d, 0.5 * _logaddexp(2.0 * log_d, log_a + log_b))  # log(|d| + sqrt(d^2 + AB))
    tau = torch.where(d >= 0, log_root - log_a, log_b - log_root)
    return pivot, tau


def _partial_sums_log(us: torch.Tensor) -> torch.Tensor:
    """``S(s_j)`` from log-cumulative sums: any spread, slower on CPU."""
    n = us.shape[-1]
    head = torch.exp(us + torch.logcumsumexp(-us, dim=-1))  # sum_{i<=j} e^(u_j - u_i) in [1, j]
    tail_incl = torch.logcumsumexp(us.flip(-1), dim=-1).flip(-1)  # log sum_{i>=j} e^(u_i)
    tail_excl = torch.cat([tail_incl[..., 1:], torch.full_like(tail_incl[..., :1], -math.inf)], dim=-1)
    tail = torch.exp(tail_excl - us)  # sum_{i>j} e^(u_i - u_j) in [0, n - j]
    j = torch.arange(1, n + 1, dtype=us.dtype, device=us.device)
    return j - 0.5 * head + 0.5 * tail


def _sorted_partial_sums(us: torch.Tensor) -> torch.Tensor:
    """``S(s_j) = j - 0.5 sum_{i<=j} e^(u_j - u_i) + 0.5 sum_{i>j} e^(u_i - u_j)`` (non-decreasing in j).

    ``us``: ``[rows, n]`` sorted descending with ``us[:, 0] = 0``.  Rows whose spread ``R`` fits
    the dtype's exponent range use plain cumulative sums of ``e^(+-(u - c))`` around ``c = -R/2``;
    wider rows fall back to log-cumulative sums.
    """
    n = us.shape[-1]
    spread = -us[:, -1:]
    limit = 2.0 * (math.log(torch.finfo(us.dtype).max) - math.log(n) - 2.0)
    c = -0.5 * spread.clamp_max(limit)
    up = torch.exp(c - us)  # e^(c - u_i) in [e^(-R/2), e^(R/2)]
    down = torch.exp(us - c)  # e^(u_i - c)
    head = down * up.cumsum(dim=-1)
    tail_incl = down.flip(-1).cumsum(dim=-1).flip(-1)
    tail = up * torch.cat([tail_incl[:, 1:], torch.zeros_like(tail_incl[:, :1])], dim=-1)
    j = torch.arange(1, n + 1, dtype=us.dtype, device=us.device)
    s_at = j - 0.5 * head + 0.5 * tail
    wide = (spread > limit).squeeze(-1)
    if bool(wide.any()):
        s_at[wide] = _partial_sums_log(us[wide])
    return s_at


def _lapsum_z(r: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, m_guess: torch.Tensor | None = None) -> torch.Tensor:
    """``z_i = (r_i - t) / alpha`` for scores ``r`` (``[..., n]``, compute dtype), ``alpha``
    (``[..., 1]``, compute dtype) and ``k`` (``[..., 1]``, accumulation dtype), formed as
    ``(r - r_pivot) / alpha - tau`` so its rounding error scales with ``|z|``.  ``m_guess``
    (tests only) replaces the located interval, to exercise the repair loop."""
    n = r.shape[-1]
    k_acc, k = k, k.to(r.dtype)
    rs, _ = torch.sort(r, dim=-1, descending=True)
    us = (rs - rs[..., :1]) / alpha  # relative to the row max; the loop below repairs a wrong pick
    s_at = _sorted_partial_sums(us.reshape(-1, n)).reshape(us.shape)
    m = (s_at <= k).sum(dim=-1, keepdim=True)  # threshold lies in [s_{m+1}, s_m]
    if m_guess is not None:
        m = m_guess.expand_as(m)
    # Accept the piece if its root lies in its own interval (up to ``tol`` in z); otherwise move m
    # to the number of scores above that root (monotone towards the true interval, normally no pass).
    tol = math.sqrt(torch.finfo(r.dtype).eps)
    inf = torch.tensor(math.inf, dtype=r.dtype, device=r.device)
    for _ in range(n + 1):
        pivot, tau = _piece_root(rs, k, alpha, m)
        zs = (rs - pivot) / alpha - tau  # sorted, non-increasing
        z_last_up = torch.where(m > 0, torch.gather(zs, -1, (m - 1).clamp_min(0)), inf)
        z_first_low = torch.where(m < n, torch.gather(zs, -1, m.clamp_max(n - 1)), -inf)
        ok = (z_last_up >= -tol) & (z_first_low <= tol)
        if bool(ok.all()):
            break
        m = torch.where(ok, m, (zs >= 0).sum(dim=-1, keepdim=True))
    z = (r - pivot) / alpha - tau
    # One Newton step on tau (dS/dtau = -sum g), residual (#{z >= 0} - k) + sum_i sign_i g_i
    # accumulated in float64, clamped to ``tol``: the weights then sum to k up to their own rounding.
    above = z >= 0
    half = 0.5 * torch.exp(-z.abs())  # = g, the Laplace density at z
    resid = torch.where(above, -half, half).sum(dim=-1, keepdim=True, dtype=k_acc.dtype)
    resid = resid + (above.sum(dim=-1, keepdim=True).to(k_acc.dtype) - k_acc)
    step = resid.to(r.dtype) / half.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    return z - step.clamp(-tol, tol)


def lapsum_offsets(scores: torch.Tensor, k: Scalar, alpha: Scalar) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, alpha_rows)``: ``z = (scores - t) / alpha`` with ``sum_i F(z_i) = k`` per row, in the
    compute dtype (float32; float64 for float64 scores), and ``alpha`` as ``[..., 1]``.  ``k`` and
    ``alpha``: numbers or tensors broadcastable to ``scores.shape[:-1]``, ``0 < k < n``,
    ``alpha > 0``.  No autograd (:func:`lapsum_topk` adds the exact gradient)."""
    if scores.dim() < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have a non-empty last (expert) dim, got {tuple(scores.shape)}")
    n = scores.shape[-1]
    if not isinstance(k, torch.Tensor) and not 0.0 < float(k) < n:
        raise ValueError(f"k must lie in (0, n_experts) = (0, {n}), got {k}")
    if not isinstance(alpha, torch.Tensor) and not float(alpha) > 0.0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    cdt = lapsum_compute_dtype(scores.dtype)
    batch, dev = scores.shape[:-1], scores.device
    kk = _as_row_param(k.detach() if isinstance(k, torch.Tensor) else k, batch, _accumulate_dtype(dev), dev)
    aa = _as_row_param(alpha.detach() if isinstance(alpha, torch.Tensor) else alpha, batch, cdt, dev)
    with torch.no_grad():
        return _lapsum_z(scores.detach().to(cdt), kk, aa), aa


class LapSumTopK(torch.autograd.Function):
    """LapSum soft top-k: ``p = F((scores - t) / alpha)`` with ``sum(p, -1) = k``; output in the
    scores' dtype.  Forward: :func:`lapsum_offsets`.  Backward: the exact implicit-function
    gradient (nothing unrolled).  With ``z_i = (r_i - t) / alpha``, ``g_i = F'(z_i) = 0.5 e^-|z_i|``,
    ``h = g / sum(g) = softmax(-|z|)`` (finite even when every ``g_i`` underflows) and the upstream
    gradient ``v``: ``dL/dr_j = g_j (v_j - <v, h>) / alpha``, ``dL/dk = <v, h>``,
    ``dL/dalpha = sum_i g_i v_i (<h, z> - z_i) / alpha``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, k: Scalar, alpha: Scalar) -> torch.Tensor:  # type: ignore[override]
        z, aa = lapsum_offsets(scores, k, alpha)
        ctx.save_for_backward(z, aa)
        ctx.k_meta = (k.shape, k.dtype) if isinstance(k, torch.Tensor) else None
        ctx.alpha_meta = (alpha.shape, alpha.dtype) if isinstance(alpha, torch.Tensor) else None
        ctx.scores_dtype = scores.dtype
        return laplace_cdf(z).to(scores.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_p: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        z, aa = ctx.saved_tensors
        v = grad_p.to(z.dtype)
        absz = z.abs()
        g = 0.5 * torch.exp(-absz)  # Laplace density at z
        h = torch.softmax(-absz, dim=-1)  # g / sum(g), finite even if every g underflows
        vh = (v * h).sum(dim=-1, keepdim=True)
        grad_scores = grad_k = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_scores = (g * (v - vh) / aa).to(ctx.scores_dtype)
        if ctx.needs_input_grad[1] and ctx.k_meta is not None:
            shape, dtype = ctx.k_meta
            grad_k = vh.squeeze(-1).sum_to_size(shape).to(dtype)
        if ctx.needs_input_grad[2] and ctx.alpha_meta is not None:
            shape, dtype = ctx.alpha_meta
            zbar = (h * z).sum(dim=-1, keepdim=True)
            ga = (g * v * (zbar - z)).sum(dim=-1, keepdim=True) / aa
            grad_alpha = ga.squeeze(-1).sum_to_size(shape).to(dtype)
        return grad_scores, grad_k, grad_alpha


def lapsum_topk(scores: torch.Tensor, k: Scalar, alpha: Scalar = 1.0) -> torch.Tensor:
    """LapSum soft top-k weights ``p`` (``[..., n]`` in the scores' dtype, in ``[0, 1]``,
    ``p.sum(-1) == k``), differentiable in ``scores``, ``k`` and ``alpha``."""
    return LapSumTopK.apply(scores, k, alpha)


def lapsum_keep(p: torch.Tensor, threshold: float, max_active: int | None) -> torch.Tensor:
    """Experts a LapSum token runs (bool ``[..., n]``): ``p >= threshold``, always the token's best
    expert (a token never loses its whole FFN), at most the ``max_active`` largest; ties as in
    :func:`topk_experts` (lower index), so the best expert is always among the ``max_active``."""
    p = p.detach()
    keep = (p >= threshold).scatter(-1, topk_experts(p, 1), True)
    if max_active is not None and max_active < p.shape[-1]:
        keep = keep & torch.zeros_like(keep).scatter(-1, topk_experts(p, max_active), True)
    return keep


def lapsum_route(
    logits: torch.Tensor, k: Scalar, alpha: Scalar, threshold: float, max_active: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LapSum router: ``(weights, keep)``, both ``[..., n]``; ``weights`` are the soft top-k
    weights (fp32; fp64 for fp64 logits) where kept and exactly 0 elsewhere, not renormalised;
    differentiable (dropped weights are constants)."""
    p = lapsum_topk(logits.to(lapsum_compute_dtype(logits.dtype)), k, alpha)
    keep = lapsum_keep(p, threshold, max_active)
    return torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device)), keep


# --------------------------------------------------------------------------- batch-1 decode
# Decode is memory-bound: its speed is how fast the chosen experts' weights stream from memory.
# On CPU, moefy's compiled kernel (moefy.kernels: every active neuron's gate/up/down rows read
# once, contiguous, in one parallel region on torch's own threads) reaches the bytes limit at
# every expert granularity (docs/BENCHMARKS.md section 4); without it (moefy not importable, as
# in a trust_remote_code load, or no compiler) the same ranges run as PyTorch GEMV calls.
# Half-precision prefill on CPU: experts with at least this many tokens compute in fp32, since
# PyTorch's CPU bf16/fp16 GEMM without native half instructions is several times slower.
HALF_UPCAST_MIN_TOKENS = 16
# Several tokens with small experts: below this mean routed-expert size (neurons), compute every
# routed neuron for every token in two large GEMMs and zero the unused ones (MoefyMLP._masked)
# instead of one small GEMM per expert (MoefyMLP._grouped).  Measured on SmolLM2's 576 x 1536 at
# 50% active, 2 CPU threads, fp32 (benchmarks/bench_prefill_paths.py, docs/BENCHMARKS.md 6.13): at
# 512 tokens grouped is faster with experts of 48 neurons, level with 24, and level or slower with
# 12; masked is 2-3x faster with 6 and 3.  (At 8-64 tokens masked was faster at every size.)
MASKED_PREFILL_MAX_EXPERT_SIZE = 16
# rows per chunk of the masked path (bounds its [tokens, intermediate] activations)
MASKED_PREFILL_CHUNK = 1024

try:
    from moefy import kernels as _kernels
except ImportError:  # pragma: no cover - a checkpoint loaded without moefy installed
    _kernels = None  # type: ignore[assignment]


class MoefyMLP(nn.Module):
    """Gated FFN split into ``n_shared`` always-active neurons plus routed experts.

    ``forward`` computes only the experts each token uses; :meth:`forward_reference`
    computes every neuron and masks, which is the training-time definition (kept for tests).

    Fast path.  Expert ``e`` owns neurons ``offsets[e]:offsets[e+1]``: rows of ``gate_proj`` /
    ``up_proj`` and columns of ``down_proj``, always read through views (never gathered).
    Batch-1 decode collects the token's active neuron ranges (shared block and chosen experts,
    adjacent ones merged) and computes them in one call of moefy's compiled CPU kernel
    (:mod:`moefy.kernels`; ``use_kernel = False`` turns it off), else with PyTorch GEMV calls.
    Several tokens are sorted by expert and each used expert runs one matmul over its tokens;
    on CPU in bf16/fp16, an expert with many tokens computes in fp32 (upcast slices).  With small
    experts (mean routed size below :data:`MASKED_PREFILL_MAX_EXPERT_SIZE`) several tokens instead
    compute every neuron in two large GEMMs and zero the unused experts' neurons, the reference
    computation done in chunks; ``prefill_path`` (``None``: that choice, ``"grouped"``,
    ``"masked"``) forces one.

    ``transpose_down`` picks the memory layout of ``down_proj.weight`` for inference (its shape,
    values and state-dict key never change): ``True`` stores it as the transpose of a
    contiguous ``[intermediate, hidden]`` tensor, so an expert's down-projection is one
    contiguous block (a column-major GEMV) instead of ``hidden`` short strided rows; ``False``
    keeps nn.Linear's layout; ``None`` (default) transposes on CPU, where it measured fastest
    for decode in fp32 and bf16 alike.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: list[int],
        n_shared: int = 0,
        top_k: float = 2,
        hidden_act: str = "silu",
        bias: bool = False,
        router: str = "topk",
        gating: str = "mask",
        lapsum_alpha: float = 1.0,
        lapsum_threshold: float = 0.0,
        max_active: int | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.expert_sizes = [int(s) for s in expert_sizes]
        self.n_experts = len(self.expert_sizes)
        self.n_shared = int(n_shared)
        self.top_k = top_k
        self.router_type = router
        self.gating = gating
        self.lapsum_alpha = float(lapsum_alpha)
        self.lapsum_threshold = float(lapsum_threshold)
        self.max_active = max_active
        total = self.n_shared + sum(self.expert_sizes)
        self.intermediate_size = total
        self.gate_proj = nn.Linear(hidden_size, total, bias=bias)
        self.up_proj = nn.Linear(hidden_size, total, bias=bias)
        self.down_proj = nn.Linear(total, hidden_size, bias=bias)
        self.router = nn.Linear(hidden_size, self.n_experts, bias=False)
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        # batch-1 CPU decode through moefy's compiled kernel when it can be had (False: PyTorch GEMVs)
        self.use_kernel = True
        offsets = [self.n_shared]
        for s in self.expert_sizes:
            offsets.append(offsets[-1] + s)
        self.offsets = offsets
        self.transpose_down: bool | None = None
        self.prefill_path: str | None = None
        self._down_layout_key: tuple[Any, ...] | None = None
        # measured routing: set ``count_active = True`` to count (token, expert) pairs run
        self.count_active = False
        self.active_pairs = 0
        self.tokens_seen = 0

    # ----------------------------------------------------------------- routing
    def _topk_route(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chosen experts ``[tokens, k]`` and their weights (``None`` for mask gating: all 1)."""
        return topk_route(logits, int(self.top_k), self.gating, dtype)

    def _dense_weights(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.router_type == "lapsum":
            w, _ = lapsum_route(logits, float(self.top_k), self.lapsum_alpha, self.lapsum_threshold, self.max_active)
            return w.to(dtype)
        return scatter_weights(logits, *self._topk_route(logits, dtype))

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense ``[tokens, E]`` weights, zero for experts a token does not use."""
        return self._dense_weights(self.router(x), x.dtype)

    # ----------------------------------------------------------------- forward
    def _down_t(self) -> torch.Tensor:
        """``down_proj.weight.t()`` (``[intermediate, hidden]``): expert ``e`` is rows ``lo:hi``.

        Outside training, the weight's memory layout is chosen once per tensor (the choice is
        redone after a cast, a move, a reload or a new ``transpose_down``): see :attr:`transpose_down`.  Any layout
        computes the same values; shape, values and state-dict key never change.
        """
        w = self.down_proj.weight
        if self.training or "_hf_hook" in self.__dict__ or w.dim() != 2 or not w.numel() or w.device.type == "meta":
            return w.t()
        key = (w.data_ptr(), w.dtype, w.device, self.transpose_down)
        if key != self._down_layout_key:
            want = self.transpose_down
            if want is None:  # measured on CPU: contiguous expert blocks decode fastest in every dtype
                want = w.device.type == "cpu" and w.dtype.is_floating_point
            is_t = w.stride(0) == 1 and w.stride(1) == w.shape[0]
            if want != is_t:
                with torch.inference_mode(False), torch.no_grad():
                    w.data = w.data.t().contiguous().t() if want else w.data.contiguous()
            self._down_layout_key = (w.data_ptr(), w.dtype, w.device, self.transpose_down)
        return w.t()

    def _half_cpu(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)

    def _rows_down(self, h: torch.Tensor, lo: int, hi: int, down_t: torch.Tensor, upcast: bool) -> torch.Tensor:
        """``h @ down_t[lo:hi]`` for several tokens.  On CPU in half precision PyTorch's GEMM is
        very slow for a row-major ``[s, hidden]`` right operand (measured 60x): use fp32
        (``upcast``) or a column-major ``h``, which takes the fast kernel."""
        w = down_t[lo:hi]
        if upcast:
            return torch.mm(h.float(), w.float())
        if self._half_cpu(h) and w.stride(1) == 1:
            if h.shape[0] == 1:  # one token: a column-major GEMV (a [1, s] "column-major" h is still row-major)
                return torch.mv(w.t(), h[0])[None]
            return torch.mm(h.t().contiguous().t(), w)
        return torch.mm(h, w)

    def _rows(self, xe: torch.Tensor, lo: int, hi: int, down_t: torch.Tensor, w: torch.Tensor | float | None) -> torch.Tensor:
        """Output of neurons ``lo:hi`` for tokens ``xe`` (in fp32 when half precision on CPU)."""
        upcast = self._half_cpu(xe) and xe.shape[0] >= HALF_UPCAST_MIN_TOKENS
        gw, uw = self.gate_proj.weight[lo:hi], self.up_proj.weight[lo:hi]
        gb = self.gate_proj.bias[lo:hi] if self.gate_proj.bias is not None else None
        ub = self.up_proj.bias[lo:hi] if self.up_proj.bias is not None else None
        if upcast:
            xe, gw, uw = xe.float(), gw.float(), uw.float()
            gb, ub = (gb.float() if gb is not None else None), (ub.float() if ub is not None else None)
        h = self.act_fn(F.linear(xe, gw, gb)) * F.linear(xe, uw, ub)
        if w is not None:
            h = h * (w.to(h.dtype) if isinstance(w, torch.Tensor) else w)
        y = self._rows_down(h, lo, hi, down_t, upcast)
        return y.float() if self._half_cpu(xe) else y

    def _shared_out(self, x: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        if self.n_shared:
            return self._rows(x, 0, self.n_shared, down_t, None)
        return x.new_zeros(x.shape[0], self.hidden_size, dtype=torch.float32 if self._half_cpu(x) else x.dtype)

    def _kernel_ok(self, x: torch.Tensor, down_t: torch.Tensor) -> bool:
        """Whether batch-1 decode can take moefy's CPU kernel (else PyTorch GEMVs)."""
        if _kernels is None or not self.use_kernel or self.gate_proj.bias is not None:
            return False
        if _kernels.usable(x, self.hidden_act) is None:  # device, dtype, activation, a built kernel
            return False
        gw, uw, rw = self.gate_proj.weight, self.up_proj.weight, self.router.weight
        if not (gw.dtype == uw.dtype == down_t.dtype == x.dtype):
            return False
        if (gw.stride(1) != 1 and gw.shape[1] != 1) or (uw.stride(1) != 1 and uw.shape[1] != 1):
            return False
        if down_t.stride(1) != 1 and down_t.shape[1] != 1:
            return False
        # the kernel records no autograd graph
        return not torch.is_grad_enabled() or not (
            x.requires_grad or gw.requires_grad or uw.requires_grad or down_t.requires_grad or rw.requires_grad
        )

    def _decode(self, x: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        """One token: the active neuron ranges (shared block, chosen experts), GEMVs over views."""
        kernel = self._kernel_ok(x, down_t)
        r = self.router
        if (
            kernel
            and self.router_type == "topk"
            and self.gating == "mask"
            and not (r._forward_hooks or r._forward_pre_hooks)
            and r.weight.dtype == x.dtype
            and 1 <= int(self.top_k) <= self.n_experts
        ):  # routing inside the kernel too (its route() is topk_experts; every weight 1): one call
            fused = _kernels.moe_decode_topk(
                x[0], r.weight, self.gate_proj.weight, self.up_proj.weight, down_t, self.offsets,
                self.n_shared, int(self.top_k), "mask", self.hidden_act,
            )
            if fused is not None:
                if self.count_active:
                    self.active_pairs += int(self.top_k)
                    self.tokens_seen += 1
                return fused.to(x.dtype)[None]
        logits = self.router(x)
        vals: torch.Tensor | None
        if self.router_type == "lapsum":
            w = self._dense_weights(logits, x.dtype)[0]
            chosen = [e for e, v in enumerate(w.tolist()) if v != 0]
            vals = w[chosen]
        else:
            idx, vals = self._topk_route(logits, x.dtype)
            chosen = idx[0].tolist()
            vals = vals[0] if vals is not None else None
        # the kernel takes the weights as numbers (exact: they are in x's dtype); the PyTorch path
        # keeps them as tensors, which carry the router's gradient
        scales = vals.tolist() if vals is not None and kernel else vals
        if self.count_active:
            self.active_pairs += len(chosen)
            self.tokens_seen += 1
        offsets = self.offsets
        pieces: list[tuple[int, int, Any]] = [(0, self.n_shared, None)] if self.n_shared else []
        order = sorted(range(len(chosen)), key=chosen.__getitem__) if scales is None else range(len(chosen))
        for j in order:
            e = chosen[j]
            lo, hi = offsets[e], offsets[e + 1]
            if lo == hi:
                continue
            if scales is None and pieces and pieces[-1][1] == lo and pieces[-1][2] is None:
                pieces[-1] = (pieces[-1][0], hi, None)  # adjacent experts: one range
            else:
                pieces.append((lo, hi, scales[j] if scales is not None else None))
        if not pieces:
            return x.new_zeros(1, self.hidden_size)
        if kernel:
            out = _kernels.moe_decode(
                x[0], self.gate_proj.weight, self.up_proj.weight, down_t, [p[0] for p in pieces],
                [p[1] for p in pieces], [1.0 if p[2] is None else float(p[2]) for p in pieces], self.hidden_act,
            )
            if out is not None:
                return out.to(x.dtype)[None]
        # PyTorch fallback: the multi-token path, one neuron range at a time (fp32 sums for half on CPU)
        out = None
        for lo, hi, scale in pieces:
            y = self._rows(x, lo, hi, down_t, scale)
            out = y if out is None else out + y
        return out.to(x.dtype)  # type: ignore[union-attr]

    def _grouped(self, x: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        """Many tokens: sort the (token, expert) pairs by expert (one host sync for the counts),
        then per used expert gather its tokens, run its rows of gate/up and down (views) and
        scatter-add the result.  Gathering per expert keeps each chunk cache-hot (measured
        1.5x faster prefill than gathering all pairs at once with 64 experts)."""
        logits = self.router(x)
        if self.router_type == "lapsum":
            w = self._dense_weights(logits, x.dtype)
            expert, tok = torch.nonzero(w.t(), as_tuple=True)  # sorted by expert, then token
            ws: torch.Tensor | None = w[tok, expert]
        else:
            idx, vals = self._topk_route(logits, x.dtype)
            k = idx.shape[1]
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            expert = flat.index_select(0, order)
            tok = torch.div(order, k, rounding_mode="floor")
            ws = vals.reshape(-1).index_select(0, order) if vals is not None else None
        counts = torch.bincount(expert, minlength=self.n_experts).tolist()
        if self.count_active:
            self.active_pairs += int(expert.numel())
            self.tokens_seen += int(x.shape[0])
        out = self._shared_out(x, down_t)
        offsets = self.offsets
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            lo, hi = offsets[e], offsets[e + 1]
            sl = slice(start, start + c)
            start += c
            if lo == hi:
                continue
            t = tok[sl]
            y = self._rows(x.index_select(0, t), lo, hi, down_t, ws[sl, None] if ws is not None else None)
            out.index_add_(0, t, y)
        return out.to(x.dtype)

    def _masked(self, x: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        """Many tokens, small experts: every neuron of every token in two large GEMMs per chunk of
        tokens, each routed neuron scaled by its expert's weight (0 where unused); the
        computation :meth:`forward_reference` defines, with :meth:`_rows`' half-precision care."""
        outs = []
        for xc in x.split(MASKED_PREFILL_CHUNK):
            w = self.routing_weights(xc)
            if self.count_active:
                self.active_pairs += int(torch.count_nonzero(w))
                self.tokens_seen += int(xc.shape[0])
            outs.append(self._rows(xc, 0, self.intermediate_size, down_t, self.neuron_mask(w)))
        return torch.cat(outs).to(x.dtype)

    def _use_masked(self) -> bool:
        """Whether several tokens take :meth:`_masked` (else :meth:`_grouped`)."""
        if self.prefill_path is not None:
            if self.prefill_path not in ("grouped", "masked"):
                raise ValueError(f"prefill_path must be None, 'grouped' or 'masked', got {self.prefill_path!r}")
            return self.prefill_path == "masked"
        routed = self.intermediate_size - self.n_shared
        return routed < MASKED_PREFILL_MAX_EXPERT_SIZE * self.n_experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        down_t = self._down_t()
        if self.n_experts == 0:
            out = self._shared_out(x, down_t).to(x.dtype)
        elif x.shape[0] == 1:
            out = self._decode(x, down_t)
        elif self._use_masked():
            out = self._masked(x, down_t)
        else:
            out = self._grouped(x, down_t)
        if self.down_proj.bias is not None:
            out = out + self.down_proj.bias
        return out.reshape(shape)

    def neuron_mask(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-neuron multipliers ``[tokens, intermediate]`` from expert weights."""
        sizes = torch.tensor(self.expert_sizes, device=weights.device)
        routed = weights.repeat_interleave(sizes, dim=-1)
        shared = torch.ones(*weights.shape[:-1], self.n_shared, dtype=weights.dtype, device=weights.device)
        return torch.cat([shared, routed], dim=-1)

    def forward_reference(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every neuron computed, unused experts masked to zero (the training-time path)."""
        h = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        if self.n_experts == 0:
            return self.down_proj(h)
        return self.down_proj(h * self.neuron_mask(self.routing_weights(hidden_states)))


class MoefyPreTrainedModel(PreTrainedModel):
    config_class = MoefyConfig
    base_model_prefix = "moefy"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        std = float(self.config.base_config.get("initializer_range", 0.02))
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()


def build_moe_mlp(config: MoefyConfig, layer_idx: int, hidden_size: int, bias: bool) -> MoefyMLP | None:
    spec = config.moe_layers[layer_idx] if layer_idx < len(config.moe_layers) else None
    if spec is None:
        return None
    alpha = spec.get("lapsum_alpha", config.lapsum_alpha[layer_idx] if config.lapsum_alpha else 1.0)
    return MoefyMLP(
        hidden_size,
        spec["expert_sizes"],
        n_shared=spec.get("n_shared", 0),
        top_k=spec["top_k"],
        hidden_act=config.hidden_act,
        bias=bias,
        router=config.router,
        gating=config.gating,
        lapsum_alpha=alpha,
        lapsum_threshold=spec.get("lapsum_threshold", config.lapsum_threshold),
        max_active=config.max_active,
    )


class MoefyForCausalLM(MoefyPreTrainedModel, GenerationMixin):
    """The base causal LM (held as ``self.model``) with MoE FFNs; forward and generate delegate to it."""

    def __init__(self, config: MoefyConfig, base_model: PreTrainedModel | None = None) -> None:
        """Build from ``config``; or, with ``base_model`` (whose FFNs are already
        :class:`MoefyMLP`), wrap that model in place without allocating a new one."""
        super().__init__(config)
        if base_model is None:
            base_cfg = config.to_base_config()
            # the dtype from_pretrained(dtype=...) is building in (else from_config would use the
            # base config's saved dtype and leave everything but the MoE layers in it)
            dtype = torch.get_default_dtype()
            try:
                base_model = AutoModelForCausalLM.from_config(
                    base_cfg, attn_implementation=config._attn_implementation, dtype=dtype
                )
            except ValueError:  # the base family does not support that attention kernel
                base_model = AutoModelForCausalLM.from_config(base_cfg, attn_implementation="eager", dtype=dtype)
            bias = bool(config.base_config.get("mlp_bias", False))
            for i, layer in enumerate(base_model.model.layers):
                mlp = build_moe_mlp(config, i, base_cfg.hidden_size, bias)
                if mlp is not None:
                    layer.mlp = mlp
        else:
            for module in base_model.modules():  # trained weights: never re-initialise them
                module._is_hf_initialized = True
        self.model = base_model
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("generation_config", self.generation_config)
        return self.model.generate(*args, **kwargs)
