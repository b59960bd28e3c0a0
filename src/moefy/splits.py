"""Neuron splits: the heuristic baselines DOT-MoE is compared with, and its initialisation.

A :class:`Split` names, in the dense FFN's neuron numbering, the always-active shared
neurons and the neurons of each routed expert.  Every function here is deterministic given
its seed and meets the capacities of :func:`moefy.ot.capacities` exactly.

- ``random``: random balanced split (LLaMA-MoE).
- ``param-cluster``: balanced spherical k-means on the concatenated, normalised gate/up
  weight rows (MoEfication; LLaMA-MoE clustering).
- ``act-cluster``: balanced k-means on which tokens each neuron is among the most active
  for (co-activation; LLaMA-MoE-v2 / CMoE).
- shared neurons by activation rate (CMoE), structured-pruning importance
  ``E|h_i| * ||W_down[:, i]||``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import FFNWeights
from .ot import capacities, round_greedy


@dataclass
class Split:
    shared: torch.Tensor  # long, always-active neuron indices
    experts: list[torch.Tensor]  # long, neuron indices of each routed expert (sorted)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def expert_sizes(self) -> list[int]:
        return [int(e.numel()) for e in self.experts]

    def permutation(self) -> torch.Tensor:
        """New neuron order: shared neurons, then each expert's neurons contiguously."""
        return torch.cat([self.shared, *self.experts])

    @staticmethod
    def from_assignment(shared: torch.Tensor, routed: torch.Tensor, assign: torch.Tensor, n_experts: int) -> "Split":
        """``assign[j]`` is the expert of neuron ``routed[j]``."""
        experts = [torch.sort(routed[assign == e]).values for e in range(n_experts)]
        return Split(torch.sort(shared).values, experts)


def activation_sample(h: torch.Tensor, max_tokens: int = 8192, seed: int = 0) -> torch.Tensor:
    """At most ``max_tokens`` rows of intermediate activations ``h`` (tokens x d_ffn)."""
    if h.shape[0] <= max_tokens:
        return h
    g = torch.Generator().manual_seed(seed)  # a CPU generator: the same sample on every device
    return h[torch.randperm(h.shape[0], generator=g)[:max_tokens].to(h.device)]


def activation_rate(h: torch.Tensor, active_fraction: float) -> torch.Tensor:
    """Per neuron, the fraction of tokens for which it is among the ``active_fraction``
    largest-magnitude neurons of that token."""
    n = h.shape[1]
    k = max(1, int(round(active_fraction * n)))
    top = h.abs().topk(k, dim=1).indices
    counts = torch.zeros(n, device=h.device)
    counts.index_add_(0, top.flatten(), torch.ones(top.numel(), device=h.device))
    return counts / h.shape[0]


def choose_shared(h: torch.Tensor, n_shared: int, active_fraction: float) -> torch.Tensor:
    """CMoE's shared neurons: the ``n_shared`` neurons active for the most tokens."""
    if n_shared <= 0:
        return torch.zeros(0, dtype=torch.long, device=h.device)
    rate = activation_rate(h, active_fraction)
    return torch.sort(rate.topk(n_shared).indices).values


def balanced_kmeans(features: torch.Tensor, caps: list[int], seed: int = 0, iters: int = 25) -> torch.Tensor:
    """Spherical k-means whose assignment step is a capacity-exact rounding of the
    cosine similarities; returns the cluster of every row."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[: len(caps)].to(x.device)].clone()
    assign = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for _ in range(iters):
        new = round_greedy(x @ centroids.T, caps).to(x.device)
        if torch.equal(new, assign):
            break
        assign = new
        for e in range(len(caps)):
            centroids[e] = x[assign == e].mean(dim=0)
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    return assign


def _routed(n: int, shared: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=shared.device)
    keep[shared] = False
    return torch.nonzero(keep).flatten()


def random_split(
    n: int, n_experts: int, seed: int = 0, shared: torch.Tensor | None = None, device: torch.device | str | None = None
) -> Split:
    shared = shared if shared is not None else torch.zeros(0, dtype=torch.long, device=device)
    routed = _routed(n, shared)
    g = torch.Generator().manual_seed(seed)
    perm = routed[torch.randperm(routed.numel(), generator=g).to(routed.device)]
    caps = capacities(routed.numel(), n_experts)
    assign = torch.empty(routed.numel(), dtype=torch.long, device=routed.device)
    start = 0
    for e, c in enumerate(caps):
        assign[torch.searchsorted(routed, perm[start : start + c])] = e
        start += c
    return Split.from_assignment(shared, routed, assign, n_experts)


def param_cluster_split(ffn: FFNWeights, n_experts: int, seed: int = 0, shared: torch.Tensor | None = None) -> Split:
    shared = shared if shared is not None else torch.zeros(0, dtype=torch.long, device=ffn.gate.device)
    routed = _routed(ffn.d_ffn, shared)
    gate = torch.nn.functional.normalize(ffn.gate.detach().float()[routed], dim=1)
    up = torch.nn.functional.normalize(ffn.up.detach().float()[routed], dim=1)
    assign = balanced_kmeans(torch.cat([gate, up], dim=1), capacities(routed.numel(), n_experts), seed)
    return Split.from_assignment(shared, routed, assign, n_experts)


def act_cluster_split(
    h: torch.Tensor, n_experts: int, active_fraction: float, seed: int = 0, shared: torch.Tensor | None = None
) -> Split:
    """Cluster neurons by the tokens they fire for: each neuron's feature is its 0/1 column of
    "among this token's top ``active_fraction`` neurons", centred, so co-active neurons meet."""
    shared = shared if shared is not None else torch.zeros(0, dtype=torch.long, device=h.device)
    routed = _routed(h.shape[1], shared)
    hr = h[:, routed].abs()
    k = max(1, int(round(active_fraction * routed.numel())))
    top = hr.topk(k, dim=1).indices
    pattern = torch.zeros_like(hr).scatter_(1, top, 1.0)
    feats = (pattern - pattern.mean(dim=0, keepdim=True)).T.contiguous()
    assign = balanced_kmeans(feats, capacities(routed.numel(), n_experts), seed)
    return Split.from_assignment(shared, routed, assign, n_experts)


def pruning_importance(h: torch.Tensor, ffn: FFNWeights) -> torch.Tensor:
    """Structured-pruning score of each neuron: mean |activation| times its down-column norm."""
    return h.abs().mean(dim=0) * ffn.down.detach().float().norm(dim=0)


def obs_order(gram: torch.Tensor, cross: torch.Tensor, keep: int = 0, damp: float = 1e-3, block: int = 8) -> torch.Tensor:
    """Neurons from most to least worth keeping, by greedy structured Optimal Brain Surgeon
    (the structured OBS of ZipLM / OBC, applied to whole FFN neurons).

    ``gram`` is ``H^T H`` and ``cross`` is ``H^T Y`` over calibration tokens (``H`` the neuron
    activations, ``Y`` the layer's target).  Starting from all neurons with the least-squares
    ``W = (H^T H + lam I)^-1 H^T Y``, it removes, ``block`` at a time, the neurons whose removal
    raises ``||H W - Y||^2`` least *after* the others' down-projections are refitted to make up
    for them (``||W_i||^2 / [G^-1]_ii``), updating ``G^-1`` and ``W`` in closed form.  Unlike
    :func:`pruning_importance`, which scores each neuron alone, it sees that two correlated
    neurons can stand in for each other.  Measured at SmolLM2-135M layer 15 (50% kept, held-out
    error after moefy's ridge refit): 0.122 against importance's 0.142 (docs/BENCHMARKS.md 6.13).

    The first ``keep`` entries of the result are the greedy choice of ``keep`` neurons, and
    removal stops there (the rest follow in their importance order at that point), so one call
    with ``keep = 0`` orders every neuron.  Runs in float64 on ``gram``'s device: ``O(n^3)``,
    about ``d_ffn^3`` multiply-adds in all (``d_ffn / block`` rank-``block`` updates of ``G^-1``)."""
    n = gram.shape[0]
    home = gram.device
    # float64 for the rank updates; Apple's MPS has none, so there the (d_ffn x d_ffn) work runs on the CPU
    g = gram.to("cpu" if home.type == "mps" else home).double()
    cross = cross.to(g.device)
    lam = damp * float(g.diagonal().mean()) if n else 0.0
    g_inv = torch.cholesky_inverse(torch.linalg.cholesky(g + lam * torch.eye(n, dtype=g.dtype, device=g.device)))
    w = g_inv @ cross.double()
    alive = torch.ones(n, dtype=torch.bool, device=g.device)
    removed: list[torch.Tensor] = []
    n_alive = n
    while n_alive > keep:
        cost = w.pow(2).sum(1) / g_inv.diagonal().clamp_min(1e-300)
        cost[~alive] = float("inf")
        b = min(block, n_alive - keep)
        drop = cost.topk(b, largest=False).indices
        gib = g_inv[:, drop]
        inv_bb = torch.linalg.inv(gib[drop])
        w -= gib @ (inv_bb @ w[drop])
        g_inv -= gib @ inv_bb @ gib.T
        alive[drop] = False
        w[drop] = 0.0
        g_inv[drop, :] = 0.0
        g_inv[:, drop] = 0.0
        g_inv[drop, drop] = 1.0
        removed.append(drop)
        n_alive -= b
    survivors = alive.nonzero().squeeze(1)
    if survivors.numel():
        # the survivors' order: least removal cost last
        cost = w[survivors].pow(2).sum(1) / g_inv.diagonal()[survivors]
        survivors = survivors[cost.argsort(descending=True)]
    if not removed:
        return survivors.to(home)
    return torch.cat([survivors, torch.cat(removed).flip(0)]).to(home)  # the last removed first
