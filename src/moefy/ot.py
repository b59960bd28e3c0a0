"""Balanced optimal transport for neuron-to-expert assignment (the DOT-MoE core).

The assignment of ``n`` FFN neurons to ``E`` experts is an entropic optimal-transport plan
between a source with mass 1 per neuron and a sink with mass ``c_e`` per expert
(``sum_e c_e = n``).  With a learnable affinity ``A`` (``n x E``) and temperature ``tau``,
log-domain Sinkhorn-Knopp finds potentials ``u``, ``v`` such that

    M_soft[i, e] = exp(A[i, e] / tau + u_i + v_e)

has row sums 1 and column sums ``c``.  ``M_soft`` is then rounded to a hard 0/1 matrix that
meets every capacity exactly: greedily in descending ``M_soft`` order (the paper), or
exactly, by solving the transportation LP whose optimum is integral.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def capacities(n: int, n_experts: int) -> list[int]:
    """Expert sizes for ``n`` neurons split into ``n_experts`` experts.

    Sizes differ by at most one neuron and sum to ``n`` (the first ``n % E`` experts get
    the extra neuron), so ``d_ffn = 172, E = 8`` gives ``[22, 22, 22, 22, 21, 21, 21, 21]``.
    """
    if n_experts < 1:
        raise ValueError(f"number of experts must be >= 1, got {n_experts}")
    if n_experts > n:
        raise ValueError(f"cannot split {n} neurons into {n_experts} experts (E > d_ffn)")
    base, extra = divmod(n, n_experts)
    return [base + 1 if e < extra else base for e in range(n_experts)]


def sinkhorn_log(
    affinity: torch.Tensor,
    caps: torch.Tensor | list[int],
    tau: float = 1.0,
    n_iter: int = 50,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Log-domain Sinkhorn-Knopp; returns ``log M_soft`` (``n x E``).

    Row marginals are 1 and column marginals are ``caps``; iterations alternate exact
    row and column normalisations in log space, so the result never under/overflows.
    The last update is a row normalisation, so rows sum to exactly 1; columns match
    ``caps`` to within ``tol`` (relative) once converged.  Differentiable (autograd
    unrolls the iterations); ``tol`` only stops early, it never skips the final row step.
    """
    if affinity.dim() != 2:
        raise ValueError(f"affinity must be 2-D (neurons x experts), got shape {tuple(affinity.shape)}")
    n, n_exp = affinity.shape
    c = torch.as_tensor(caps, dtype=affinity.dtype, device=affinity.device)
    if c.numel() != n_exp:
        raise ValueError(f"{c.numel()} capacities for {n_exp} experts")
    if abs(float(c.sum()) - n) > 1e-3 * max(1.0, n):
        raise ValueError(f"capacities sum to {float(c.sum())}, not to the {n} neurons")
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    # float64 inside: with large A/tau the potentials reach thousands and float32 cancellation
    # would cost the marginals their accuracy; the result is cast back to the input dtype.
    work = torch.float64 if affinity.dtype in (torch.float32, torch.float64) else torch.float32
    c = c.to(work)
    log_c = torch.log(c)
    logits = affinity.to(work) / tau
    v = torch.zeros(n_exp, dtype=work, device=affinity.device)
    u = -torch.logsumexp(logits + v, dim=1, keepdim=True)
    for _ in range(n_iter):
        v = log_c - torch.logsumexp(logits + u, dim=0)
        u = -torch.logsumexp(logits + v, dim=1, keepdim=True)
        with torch.no_grad():
            col = torch.logsumexp(logits + u + v, dim=0)
            if float((col - log_c).abs().max()) < tol:
                break
    return (logits + u + v).to(affinity.dtype)


def round_greedy(soft: torch.Tensor, caps: list[int]) -> torch.Tensor:
    """The paper's rounding: visit entries in descending ``soft`` order and assign neuron
    ``i`` to expert ``e`` when ``i`` is unassigned and ``e`` still has room.

    Returns ``assign`` (``n``,) with the expert index of every neuron; every expert gets
    exactly ``caps[e]`` neurons.  Ties are broken by flat index, so it is deterministic.
    """
    s = soft.detach().float().cpu().numpy()
    n, n_exp = s.shape
    order = np.argsort(-s, axis=None, kind="stable")
    assign = np.full(n, -1, dtype=np.int64)
    room = np.asarray(caps, dtype=np.int64).copy()
    left = n
    for flat in order:
        i, e = divmod(int(flat), n_exp)
        if assign[i] < 0 and room[e] > 0:
            assign[i] = e
            room[e] -= 1
            left -= 1
            if left == 0:
                break
    return torch.from_numpy(assign)


def round_exact(score: torch.Tensor, caps: list[int]) -> torch.Tensor:
    """Exact rounding: the 0/1 assignment maximising ``sum_i score[i, assign(i)]`` under the
    capacities, as a transportation LP (its constraint matrix is totally unimodular, so the
    simplex optimum is integral).  Solved with HiGHS through SciPy."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    s = score.detach().double().cpu().numpy()
    n, n_exp = s.shape
    idx = np.arange(n * n_exp)
    rows = coo_matrix((np.ones(n * n_exp), (idx // n_exp, idx)), shape=(n, n * n_exp))
    cols = coo_matrix((np.ones(n * n_exp), (idx % n_exp, idx)), shape=(n_exp, n * n_exp))
    a_eq = vstack([rows, cols]).tocsr()
    b_eq = np.concatenate([np.ones(n), np.asarray(caps, dtype=np.float64)])
    res = linprog(-s.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"exact rounding LP failed: {res.message}")
    x = res.x.reshape(n, n_exp)
    assign = x.argmax(axis=1)
    # The simplex vertex is integral; repair any tolerance-level fractional row greedily.
    counts = np.bincount(assign, minlength=n_exp)
    if (counts != np.asarray(caps)).any() or not np.allclose(x.max(axis=1), 1.0, atol=1e-6):
        return round_greedy(torch.from_numpy(x), caps)
    return torch.from_numpy(assign.astype(np.int64))


def assignment_matrix(assign: torch.Tensor, n_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 matrix ``M`` (``n x E``) from expert indices."""
    m = torch.zeros(assign.numel(), n_experts, dtype=dtype, device=assign.device)
    m[torch.arange(assign.numel(), device=assign.device), assign] = 1.0
    return m


def rounding_objective(soft: torch.Tensor, assign: torch.Tensor) -> float:
    """``sum_i soft[i, assign(i)]``: how much transport mass the hard plan keeps."""
    return float(soft.detach()[torch.arange(assign.numel()), assign.to(soft.device)].sum())


@dataclass
class RoundingGap:
    greedy: float
    exact: float

    @property
    def relative_gap(self) -> float:
        """How far greedy is below the exact optimum, as a fraction of the optimum."""
        return (self.exact - self.greedy) / max(abs(self.exact), 1e-12)


def rounding_gap(soft: torch.Tensor, caps: list[int]) -> RoundingGap:
    """Objective of greedy and exact rounding on the same transport plan."""
    return RoundingGap(
        greedy=rounding_objective(soft, round_greedy(soft, caps)),
        exact=rounding_objective(soft, round_exact(soft, caps)),
    )


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value ``hard`` (exactly: ``hard + soft - soft.detach()`` rounds ``hard + soft``,
    which left a 1 off by an ulp in a quarter of entries), gradient of ``soft``."""
    return hard + (soft - soft.detach())


def geometric_schedule(start: float, end: float, step: int, total: int) -> float:
    """Temperature annealed geometrically from ``start`` to ``end`` over ``total`` steps."""
    if total <= 1:
        return end
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return float(math.exp(math.log(start) + frac * (math.log(end) - math.log(start))))
