"""LapSum soft top-k routing (SoftMoE, arXiv 2606.17952): what training adds to it.

For router scores ``r`` in ``R^n`` (one row per token, ``n`` experts), a temperature
``alpha > 0`` and a real budget ``k`` in ``(0, n)``, the LapSum weights are
``p_i = F((r_i - t) / alpha)`` (``F`` the standard Laplace CDF) with the threshold ``t`` chosen so
that ``sum_i p_i = k``; as ``alpha -> 0`` they tend to the hard top-k mask (integer ``k``).

The routing itself has one definition, in the self-contained modeling file every checkpoint
carries (:mod:`moefy.hf.modeling_moefy`, re-exported here): the closed-form, sort-based solve for
``t`` with its exact implicit-function gradient (:func:`lapsum_topk`), and the truncation
(``lapsum_keep``: ``p >= threshold``, always the best expert, at most ``max_active``).  This
module adds what only training needs: calibrating the truncation threshold to a target number of
active experts, and the learned per-layer budgets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hf.modeling_moefy import LapSumTopK, Scalar, laplace_cdf, lapsum_keep, lapsum_topk

__all__ = ["LapSumTopK", "calibrate_threshold", "lapsum_topk", "laplace_cdf", "layer_budgets"]


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
