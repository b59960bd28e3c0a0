"""LapSum soft top-k routing (SoftMoE, arXiv 2606.17952): what training adds to the router.

For router scores ``r`` in ``R^n`` (one row per token, ``n`` experts), a temperature
``alpha > 0`` and a real budget ``k`` in ``(0, n)``, the LapSum weights are

    p_i = F((r_i - t) / alpha),    F(x) = 0.5 e^x           (x < 0)
                                   F(x) = 1 - 0.5 e^(-x)    (x >= 0)

(``F`` is the standard Laplace CDF) with the threshold ``t`` chosen so that
``sum_i p_i = k``.  Every ``p_i`` lies in ``[0, 1]``, the row sums to ``k`` exactly, and as
``alpha -> 0`` the weights tend to the hard top-k mask (for integer ``k``).

The forward rules have one definition, in the self-contained modeling file that every
checkpoint carries (:mod:`moefy.hf.modeling_moefy`): the closed-form threshold
(``lapsum_offsets``, an exact sort-based solve), the truncation (``lapsum_keep``: ``p >= threshold``,
always the best expert, at most ``max_active``) and the router (``lapsum_route``).  This module adds
what only training needs: the exact gradient of the solve (:func:`lapsum_topk`), the calibration
of the truncation threshold, and the learned per-layer budgets.

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

from typing import Any

import torch
from torch import Tensor

from .hf.modeling_moefy import Scalar, laplace_cdf, lapsum_keep, lapsum_offsets

__all__ = ["LapSumTopK", "calibrate_threshold", "lapsum_topk", "laplace_cdf", "layer_budgets"]


class LapSumTopK(torch.autograd.Function):
    """LapSum soft top-k: ``p = F((scores - t) / alpha)`` with ``sum(p, -1) = k``.

    ``scores``: ``[..., n]`` (any float dtype; float32 internally unless float64, output in the
    input dtype).  ``k`` and ``alpha``: Python numbers or tensors broadcastable to
    ``scores.shape[:-1]`` (one value per row), ``0 < k < n``, ``alpha > 0``.  The forward is
    :func:`moefy.hf.modeling_moefy.lapsum_offsets`; the backward is the exact implicit-function
    gradient w.r.t. ``scores``, ``k`` and ``alpha`` (see the module docstring); nothing is unrolled.
    """

    @staticmethod
    def forward(ctx: Any, scores: Tensor, k: Scalar, alpha: Scalar) -> Tensor:  # type: ignore[override]
        z, aa = lapsum_offsets(scores, k, alpha)
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


def calibrate_threshold(
    scores: Tensor,
    k: Scalar,
    alpha: Scalar,
    target_mean_active: float,
    max_active: int | None = None,
    n_iter: int = 40,
) -> float:
    """Bisection on ``[0, 1]`` for the truncation ``threshold`` at which the mean number of experts a
    row runs (by :func:`moefy.hf.modeling_moefy.lapsum_keep`: at least its best expert, at most
    ``max_active``) is closest to ``target_mean_active``; of the two final bracket ends the closer
    one (ties: the lower) is returned.  The mean is non-increasing in the threshold."""
    n = scores.shape[-1]
    if not 0.0 <= target_mean_active <= n:
        raise ValueError(f"target_mean_active must lie in [0, {n}], got {target_mean_active}")
    with torch.no_grad():
        kd = k.detach() if isinstance(k, Tensor) else k
        ad = alpha.detach() if isinstance(alpha, Tensor) else alpha
        p = lapsum_topk(scores.detach().float(), kd, ad)

    def mean_active(th: float) -> float:
        return float(lapsum_keep(p, th, max_active).float().sum(-1).mean())

    lo, hi = 0.0, 1.0
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        if mean_active(mid) > target_mean_active:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda t: abs(mean_active(t) - target_mean_active))


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
