"""LapSum soft top-k routing (SoftMoE, arXiv 2606.17952).

For router scores ``r`` in ``R^n`` (one row per token, ``n`` experts), a temperature
``alpha > 0`` and a real budget ``k`` in ``(0, n)``, the LapSum weights are

    p_i = F((r_i - t) / alpha),    F(x) = 0.5 e^x           (x < 0)
                                   F(x) = 1 - 0.5 e^(-x)    (x >= 0)

(``F`` is the standard Laplace CDF) with the threshold ``t`` chosen so that
``sum_i p_i = k``.  Every ``p_i`` lies in ``[0, 1]``, the row sums to ``k`` exactly, and as
``alpha -> 0`` the weights tend to the hard top-k mask (for integer ``k``).

Closed-form threshold
---------------------
``S(t) = sum_i F((r_i - t) / alpha)`` is continuous and strictly decreasing from ``n`` to
``0``.  Sort the scores in descending order, ``s_1 >= ... >= s_n``, and write
``u_i = s_i / alpha``, ``tau = t / alpha``.  When ``s_{m+1} <= t <= s_m`` the top ``m`` scores
lie above the threshold, so

    S = m - 0.5 e^tau A + 0.5 e^-tau B,   A = sum_{i<=m} e^(-u_i),  B = sum_{i>m} e^(u_i).

``S = k`` is the quadratic ``A z^2 - 2 d z - B = 0`` in ``z = e^tau`` with ``d = m - k``, whose
positive root is

    z = (d + sqrt(d^2 + A B)) / A        (used when d >= 0)
      = B / (sqrt(d^2 + A B) - d)        (the same root, cancellation-free for d < 0).

The interval ``m`` is the number of sorted scores with ``S(s_j) <= k``; every ``S(s_j)`` is
obtained at once from two cumulative sums,
``S(s_j) = j - 0.5 sum_{i<=j} e^(u_j - u_i) + 0.5 sum_{i>j} e^(u_i - u_j)`` (plain cumsums of
``e^(+-(u - c))`` around the row's mid-range ``c`` when the spread fits the exponent range,
log-cumulative sums otherwise).  The root is evaluated in the log domain relative to a pivot
score next to ``t`` (``s_m`` if ``d >= 0``, else ``s_{m+1}``), where ``A`` and ``B`` are sums of
terms ``<= 1``, so nothing overflows however large the scores or however small ``alpha``, and
``z_i = (r_i - t) / alpha`` is formed as ``(r_i - pivot) / alpha - tau`` with full relative
precision.  A root that falls outside its own interval (possible only through rounding when
the spread is ~``alpha / eps``) moves ``m`` towards the right interval until it is consistent,
and one Newton step on ``tau`` (residual accumulated in float64) removes the remaining
rounding, so a float32 row sums to ``k`` up to the float32 rounding of the weights themselves.
Ties are harmless: ``F(0) = 1/2`` from both sides, so ``S`` is the same whichever side a tied
score is counted on.

Exact backward (implicit differentiation)
-----------------------------------------
With ``z_i = (r_i - t) / alpha`` and ``g_i = F'(z_i) = 0.5 e^{-|z_i|}``, differentiating the
constraint ``sum_i F(z_i) = k`` gives

    dt = (sum_i g_i dr_i - alpha dk - (sum_i g_i z_i) dalpha) / sum_i g_i,

so with ``h = g / sum(g) = softmax(-|z|)`` and the upstream gradient ``v = dL/dp``:

    dL/dr_j   = g_j (v_j - <v, h>) / alpha
    dL/dk     = <v, h>
    dL/dalpha = sum_i g_i v_i (<h, z> - z_i) / alpha.

Using ``h`` (a softmax) instead of ``g / sum(g)`` keeps the backward finite even when every
``g_i`` underflows (tiny ``alpha``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LapSumRouter",
    "LapSumTopK",
    "calibrate_threshold",
    "lapsum_topk",
    "laplace_cdf",
    "layer_budgets",
    "truncated_lapsum",
]

Scalar = float | int | Tensor


def laplace_cdf(x: Tensor) -> Tensor:
    """Standard Laplace CDF ``F(x)``: ``0.5 e^x`` for ``x < 0``, ``1 - 0.5 e^-x`` otherwise."""
    half = 0.5 * torch.exp(-x.abs())
    return torch.where(x < 0, half, 1.0 - half)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    """dtype for per-row sums and for ``k`` itself (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _as_row_param(value: Scalar, batch_shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``k`` / ``alpha`` as a ``[..., 1]`` tensor broadcast over the rows of ``scores``."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() > len(batch_shape):
        raise ValueError(
            f"k/alpha of shape {tuple(t.shape)} must broadcast to the batch shape {tuple(batch_shape)} "
            "(one value per row of scores)"
        )
    return t.expand(batch_shape).unsqueeze(-1)


def _check_scalar_args(n: int, k: Scalar, alpha: Scalar) -> None:
    if not isinstance(k, Tensor) and not 0.0 < float(k) < n:
        raise ValueError(f"k must lie in (0, n_experts) = (0, {n}), got {k}")
    if not isinstance(alpha, Tensor) and not float(alpha) > 0.0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def _piece_root(rs: Tensor, k: Tensor, alpha: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Root of the piece of ``S(t) = k`` that treats the top ``m`` sorted scores as upper.

    Returns ``(pivot, tau)`` with ``t = pivot + alpha * tau``, evaluated in the log domain
    relative to the pivot so that ``A`` and ``B`` are sums of terms ``<= 1``.  The pivot is the
    score on the side of ``t`` that carries the fractional mass: ``s_m`` when ``d = m - k >= 0``
    (then ``t`` is within O(log n) * alpha of ``s_m`` unless every weight saturates) and
    ``s_{m+1}`` when ``d < 0``, so ``|tau|`` stays small wherever ``z = (r - t) / alpha`` is
    not saturated and ``z`` keeps full precision.  Finite for every ``m`` in ``[0, n]`` when
    ``0 < k < n`` (``d >= 0`` implies ``m >= 1``; ``d < 0`` implies ``m < n``).
    """
    n = rs.shape[-1]
    d = m.to(rs.dtype) - k
    pivot = torch.gather(rs, -1, torch.where(d >= 0, m - 1, m).clamp(0, n - 1))
    v = (rs - pivot) / alpha
    upper = torch.arange(n, device=rs.device) < m  # sorted positions counted above t
    neg_inf = torch.tensor(-math.inf, dtype=rs.dtype, device=rs.device)
    log_a = torch.logsumexp(torch.where(upper, -v, neg_inf), dim=-1, keepdim=True)
    log_b = torch.logsumexp(torch.where(upper, neg_inf, v), dim=-1, keepdim=True)
    log_d = torch.log(d.abs())
    log_root = torch.logaddexp(log_d, 0.5 * torch.logaddexp(2.0 * log_d, log_a + log_b))  # log(|d| + sqrt(d^2 + AB))
    tau = torch.where(d >= 0, log_root - log_a, log_b - log_root)
    return pivot, tau


def _partial_sums_log(us: Tensor) -> Tensor:
    """``S(s_j)`` from log-cumulative sums: any spread, slower on CPU."""
    n = us.shape[-1]
    head = torch.exp(us + torch.logcumsumexp(-us, dim=-1))  # sum_{i<=j} e^(u_j - u_i) in [1, j]
    tail_incl = torch.logcumsumexp(us.flip(-1), dim=-1).flip(-1)  # log sum_{i>=j} e^(u_i)
    tail_excl = torch.cat([tail_incl[..., 1:], torch.full_like(tail_incl[..., :1], -math.inf)], dim=-1)
    tail = torch.exp(tail_excl - us)  # sum_{i>j} e^(u_i - u_j) in [0, n - j]
    j = torch.arange(1, n + 1, dtype=us.dtype, device=us.device)
    return j - 0.5 * head + 0.5 * tail


def _sorted_partial_sums(us: Tensor) -> Tensor:
    """``S(s_j) = j - 0.5 sum_{i<=j} e^(u_j - u_i) + 0.5 sum_{i>j} e^(u_i - u_j)`` (non-decreasing in j).

    ``us``: ``[rows, n]`` sorted descending with ``us[:, 0] = 0``.  Rows whose spread ``R``
    fits the dtype's exponent range use plain cumulative sums of ``e^(+-(u - c))`` around the
    mid-point ``c = -R/2`` (every factor stays within ``e^(+-R/2)``); wider rows fall back to
    log-cumulative sums.
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


def _lapsum_z(r: Tensor, k: Tensor, alpha: Tensor, m_guess: Tensor | None = None) -> Tensor:
    """Normalised offsets ``z_i = (r_i - t) / alpha`` for scores ``r``.

    ``r``: ``[..., n]`` and ``alpha``: ``[..., 1]`` in the compute dtype; ``k``: ``[..., 1]`` in
    the accumulation dtype (float64 where the device has it, so a Python ``k`` is met
    without first rounding it to float32).  ``z`` is
    formed as ``(r - r_pivot) / alpha - tau`` so its rounding error scales with ``|z|``, not
    with ``|r| / alpha``.  ``m_guess`` (``[..., 1]`` int64, tests only) replaces the located
    interval, to exercise the repair loop.
    """
    n = r.shape[-1]
    k_acc, k = k, k.to(r.dtype)
    rs, _ = torch.sort(r, dim=-1, descending=True)
    # Locate the interval from S(s_j) at every sorted score.  The scaled scores are relative
    # to the row max; their rounding error (~eps * |r - max| / alpha) only matters when the
    # spread exceeds ~alpha / eps, and the consistency loop below repairs a wrong pick.
    us = (rs - rs[..., :1]) / alpha
    s_at = _sorted_partial_sums(us.reshape(-1, n)).reshape(us.shape)
    m = (s_at <= k).sum(dim=-1, keepdim=True)  # threshold lies in [s_{m+1}, s_m]
    if m_guess is not None:
        m = m_guess.expand_as(m)

    # Accept the piece if its root lies in its own interval (up to ``tol`` in z, where the two
    # neighbouring pieces differ by ~tol^2/2 per score).  Otherwise move m to the number of
    # scores above that root: each piece under-/over-estimates S outside its interval, so this
    # moves m monotonically towards the true interval (normally zero extra passes).
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
    # One Newton step on tau (dS/dtau = -sum g) removes the O(eps * log(n) * sum g) rounding
    # left by the closed form.  The residual S - k is formed as
    # (#{z >= 0} - k) + sum_i sign_i * g_i (every term <= 1/2).  The step is clamped to
    # ``tol``, so it can never move t materially.
    # The sum is accumulated in float64 (a per-row reduction; float32 on MPS), so the final
    # weights sum to k up to their own float32 rounding, even for n tied scores.
    above = z >= 0
    half = 0.5 * torch.exp(-z.abs())  # = g, the Laplace density at z
    resid = torch.where(above, -half, half).sum(dim=-1, keepdim=True, dtype=k_acc.dtype)
    resid = resid + (above.sum(dim=-1, keepdim=True).to(k_acc.dtype) - k_acc)
    step = resid.to(r.dtype) / half.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    return z - step.clamp(-tol, tol)


class LapSumTopK(torch.autograd.Function):
    """LapSum soft top-k: ``p = F((scores - t) / alpha)`` with ``sum(p, -1) = k``.

    ``scores``: ``[..., n]`` (any float dtype; float32 internally unless float64, output in the
    input dtype).  ``k`` and ``alpha``: Python numbers or tensors broadcastable to
    ``scores.shape[:-1]`` (one value per row), ``0 < k < n``, ``alpha > 0``.  The backward is
    the exact implicit-function gradient w.r.t. ``scores``, ``k`` and ``alpha`` (see the
    module docstring); nothing is unrolled.
    """

    @staticmethod
    def forward(ctx: Any, scores: Tensor, k: Scalar, alpha: Scalar) -> Tensor:  # type: ignore[override]
        if scores.dim() < 1 or scores.shape[-1] < 1:
            raise ValueError(f"scores must have a non-empty last (expert) dim, got {tuple(scores.shape)}")
        n = scores.shape[-1]
        _check_scalar_args(n, k, alpha)
        cdt = _compute_dtype(scores.dtype)
        batch = scores.shape[:-1]
        acc = _accumulate_dtype(scores.device)
        kk = _as_row_param(k.detach() if isinstance(k, Tensor) else k, batch, acc, scores.device)
        aa = _as_row_param(alpha.detach() if isinstance(alpha, Tensor) else alpha, batch, cdt, scores.device)
        r = scores.detach().to(cdt)
        z = _lapsum_z(r, kk, aa)
        ctx.save_for_backward(z, aa)
        ctx.k_meta = (k.shape, k.dtype) if isinstance(k, Tensor) else None
        ctx.alpha_meta = (alpha.shape, alpha.dtype) if isinstance(alpha, Tensor) else None
        ctx.scores_dtype = scores.dtype
        return laplace_cdf(z).to(scores.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_p: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
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


def lapsum_topk(scores: Tensor, k: Scalar, alpha: Scalar = 1.0) -> Tensor:
    """LapSum soft top-k weights ``p`` (``[..., n]``, in ``[0, 1]``, ``p.sum(-1) == k``).

    See :class:`LapSumTopK` for the argument conventions.
    """
    return LapSumTopK.apply(scores, k, alpha)


def truncated_lapsum(
    scores: Tensor,
    k: Scalar,
    alpha: Scalar = 1.0,
    threshold: float = 0.0,
    max_active: int | None = None,
) -> tuple[Tensor, Tensor]:
    """LapSum weights with small entries dropped, for sparse dispatch.

    ``p = lapsum_topk(scores, k, alpha)``; an expert is active iff ``p_i >= threshold`` and it
    is among the ``max_active`` largest ``p`` of its row (``None``: no cap).  Dropped weights are
    exactly ``0`` and constant, so no gradient flows through them (the scores of dropped
    experts still get gradient through the shared threshold ``t`` if kept weights are used).
    Kept weights are not renormalised, so a row sums to ``<= k``.

    Returns ``(weights, active_mask)``, both ``[..., n]``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    p = lapsum_topk(scores, k, alpha)
    n = p.shape[-1]
    mask = p >= threshold
    if max_active is not None:
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1 or None, got {max_active}")
        if max_active < n:
            idx = torch.topk(p.detach(), max_active, dim=-1).indices
            mask = mask & torch.zeros_like(mask).scatter_(-1, idx, True)
    return torch.where(mask, p, torch.zeros((), dtype=p.dtype, device=p.device)), mask


def calibrate_threshold(
    scores: Tensor,
    k: Scalar,
    alpha: Scalar,
    target_mean_active: float,
    max_active: int | None = None,
    n_iter: int = 64,
) -> float:
    """Bisection for the ``threshold`` at which the mean active experts per row hits a target.

    ``mean_active(th) = mean_rows(min(max_active, #{i : p_i >= th}))`` is a non-increasing
    step function of ``th`` in ``[0, 1]``; the threshold whose mean is closest to
    ``target_mean_active`` (ties: the smaller threshold) is returned.
    """
    n = scores.shape[-1]
    cap = n if max_active is None else min(n, max_active)
    if not 0.0 <= target_mean_active <= cap:
        raise ValueError(f"target_mean_active must lie in [0, {cap}], got {target_mean_active}")
    with torch.no_grad():
        kd = k.detach() if isinstance(k, Tensor) else k
        ad = alpha.detach() if isinstance(alpha, Tensor) else alpha
        p = lapsum_topk(scores.detach(), kd, ad).reshape(-1, n).float()

    def mean_active(th: float) -> float:
        return float((p >= th).sum(dim=-1).clamp_max(cap).float().mean())

    lo, hi = 0.0, math.nextafter(float(p.max()), math.inf)  # mean(lo) = cap, mean(hi) = 0
    m_lo, m_hi = mean_active(lo), mean_active(hi)
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        m_mid = mean_active(mid)
        if m_mid >= target_mean_active:
            lo, m_lo = mid, m_mid
        else:
            hi, m_hi = mid, m_mid
        if m_lo == target_mean_active:
            break
    return lo if abs(m_lo - target_mean_active) <= abs(m_hi - target_mean_active) else hi


def layer_budgets(eta: Tensor, total_budget: float) -> Tensor:
    """Per-layer budgets ``k_l = softmax(eta)_l (K - L) + 1`` (shape of ``eta``).

    ``L = eta.numel()`` layers share a global budget ``K = total_budget``: the ``k_l`` sum to
    ``K`` (up to floating point), each is ``>= 1``, and they are differentiable in ``eta``.
    Computed in at least float32.  Raises ``ValueError`` if ``K < L``.
    """
    n_layers = eta.numel()
    if n_layers == 0:
        raise ValueError("eta must contain at least one layer logit")
    if total_budget < n_layers:
        raise ValueError(
            f"global budget K={total_budget} is smaller than the number of layers L={n_layers}; "
            "every layer needs k_l >= 1, so K >= L is required"
        )
    dtype = torch.promote_types(eta.dtype, torch.float32)
    w = torch.softmax(eta.reshape(-1).to(dtype), dim=0)
    return (w * (total_budget - n_layers) + 1.0).reshape(eta.shape)


class LapSumRouter(nn.Module):
    """Token router with LapSum soft top-k weights.

    ``scores = x W^T`` (``W``: ``[n_experts, hidden]``, no bias), ``alpha = exp(log_alpha)``
    (learnable unless ``learn_alpha=False``), and
    ``weights = F((scores - t) / alpha)`` with ``sum_e weights_e = k`` per token, where ``k``
    is given per call (a float, or a tensor such as a learned per-layer ``k_l`` from
    :func:`layer_budgets`, which then receives gradient).  With ``threshold > 0`` or
    ``max_active`` set, the weights are truncated as in :func:`truncated_lapsum`.
    """

    def __init__(
        self,
        hidden_size: int,
        n_experts: int,
        alpha: float = 1.0,
        threshold: float = 0.0,
        max_active: int | None = None,
        learn_alpha: bool = True,
    ) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.n_experts = n_experts
        self.threshold = threshold
        self.max_active = max_active
        self.proj = nn.Linear(hidden_size, n_experts, bias=False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=learn_alpha)

    @property
    def alpha(self) -> Tensor:
        """Current temperature ``exp(log_alpha)``."""
        return self.log_alpha.exp()

    def forward(self, x: Tensor, k: Scalar) -> tuple[Tensor, Tensor]:
        """``x``: ``[..., hidden]`` -> ``(weights, active_mask)``, both ``[..., n_experts]``."""
        scores = self.proj(x)
        alpha = self.alpha
        if self.threshold > 0.0 or self.max_active is not None:
            return truncated_lapsum(scores, k, alpha, self.threshold, self.max_active)
        weights = lapsum_topk(scores, k, alpha)
        return weights, torch.ones_like(weights, dtype=torch.bool)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, threshold={self.threshold}, max_active={self.max_active}"
