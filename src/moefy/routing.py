"""What training adds to the top-k router: a straight-through estimator and auxiliary losses.

Which experts a token runs is defined once, by :func:`moefy.hf.modeling_moefy.topk_experts`
(as is how they are weighted, :func:`~moefy.hf.modeling_moefy.gating_weights`).  Forward uses
the hard top-k mask ``R`` (the experts actually run, each weighted 1, so k = E reproduces the
dense FFN exactly); backward uses the router probabilities ``P = softmax(logits)``:
``R_ste = R + (P - P.detach())``.
"""

from __future__ import annotations

import torch

from .hf.modeling_moefy import scatter_weights, topk_experts
from .ot import straight_through


def topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the experts :func:`~moefy.hf.modeling_moefy.topk_experts` chooses."""
    return scatter_weights(logits, topk_experts(logits, k), None)


def route_ste(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(R_ste, R, P)``."""
    probs = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
    hard = topk_mask(logits.detach(), k)
    return straight_through(hard, probs), hard, probs


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def load_balance_loss(probs: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``: 1 when perfectly balanced.

    ``f_e`` is the share of routed slots that went to expert ``e``, ``P_e`` its mean probability.
    """
    n_exp = probs.shape[-1]
    p = probs.reshape(-1, n_exp).float()
    f = hard.reshape(-1, n_exp).float()
    f = f.sum(dim=0) / f.sum().clamp(min=1.0)
    return n_exp * (f * p.mean(dim=0)).sum()


def expert_load(hard: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens that use each expert."""
    return hard.reshape(-1, hard.shape[-1]).float().mean(dim=0)
