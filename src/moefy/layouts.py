"""The measured-best MoE layout for an active FFN fraction (``moefy convert --active``).

Measured on SmolLM2-135M (d_ffn 1536; layer-wise stage, 40 steps per layer, the first 16,384
tokens of WikiText-2 valid as 32 x 512; docs/BENCHMARKS.md section 6.1), the best layouts at a
given active fraction were (WikiText-2 test PPL, first 24 windows of 1,024 tokens):

======  =========  =====  ============  ==================================  ==========================
active  --experts  top-k  --shared      routed experts                      PPL (DOT-MoE)
======  =========  =====  ============  ==================================  ==========================
25%     26         2      288 (18.75%)  1248 neurons / 26 = 48 each, 2 on   110.06 (E8k2 192.90, prune 155.97)
50%     20         4      576 (37.5%)   960 neurons / 20 = 48 each, 4 on    56.83 (E8k4 76.48, prune 66.15)
======  =========  =====  ============  ==================================  ==========================

both with ``--shared-by importance`` (and, since docs/BENCHMARKS.md 6.9, with the default drift
correction of shared layouts, 0.5: 95.10 and 51.25 on the first 16 test windows, against 111.41
and 56.80 without it; :func:`moefy.convert.drift_correction_for`).  Since 6.13 the shared neurons
are chosen by greedy structured OBS (``--shared-by obs``): 93.06 and 50.87 there, and 3.5% lower
on unseen WikiText-2 valid at both fractions.  The common rule: three quarters of the active budget are
always-active shared neurons, the other quarter comes from routed
experts of about 48 neurons.  :func:`layout_for` scales that rule to any FFN width:

1. ``s0 = round(0.75 * f * d_ffn)`` shared neurons (chosen by OBS); the target expert size
   is 48 neurons, or the routed quarter of the budget ``f * d_ffn - s0`` when that is smaller
   (tiny models), so one expert never exceeds it;
2. where possible, every token runs ``f * d_ffn`` neurons within one: among layouts with experts
   within about 1.5x of the target size and the shared count within one expert's worth of
   ``s0`` (a token runs ``shared`` + its ``k`` experts, whose sizes differ by at most one when
   ``E`` does not divide the routed neurons), the one with experts nearest the target size,
   then the least spread between tokens (equal experts first), then shared nearest ``s0``;
3. otherwise (no such layout: e.g. 1536 at 0.4, 614.4 neurons) the rule as stated:
   ``E = max(2, round(routed / size))``, ``k`` with ``shared + k * routed / E`` closest to
   ``f * d_ffn``, and ``shared`` moved from ``s0`` until that mean is within one neuron (a
   token's own count then differs from that mean by less than ``k`` neurons);
4. the last resort, always possible: equal experts of the divisor of the skipped neurons
   nearest the target size.

So a layer's measured (mean) active count is within one neuron of ``f * d_ffn``, every token's
in cases 2 and 4; always ``E >= 2``, ``k <= E`` and ``E + shared <= d_ffn``.  The layouts
measured above come out unchanged (both exact: 384 and 768 of 1536 neurons, experts of 48).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

EXPERT_SIZE = 48  # neurons per routed expert in both measured layouts
SHARED_SHARE = 0.75  # share of the active budget that is shared (288/384 and 576/768)
SHARED_BY = "obs"  # docs/BENCHMARKS.md 6.13; the table above was measured with "importance"
# layouts that keep every token within one neuron are taken when their experts are within 2**0.6
# (about 1.5x) of the target size; otherwise experts of the target size, the mean within one
EXACT_SIZE_TOLERANCE = 0.6

# the measurements the rule reproduces: (active fraction, d_ffn) -> layout (the table above was
# measured with the shared neurons by importance; 6.13 measured the same layouts with OBS)
MEASURED: dict[tuple[float, int], tuple[int, int, int, str]] = {
    (0.25, 1536): (26, 2, 288, SHARED_BY),
    (0.50, 1536): (20, 4, 576, SHARED_BY),
}


@dataclass(frozen=True)
class Layout:
    """An MoE layout of one FFN: routed experts, experts per token, shared neurons and how
    the shared neurons are chosen (``rate``, ``importance`` or ``obs``)."""

    n_experts: int
    top_k: int
    n_shared: int
    shared_by: str = SHARED_BY

    def expert_sizes(self, d_ffn: int) -> list[int]:
        """Sizes of the routed experts as the converter splits them (balanced, differing by <= 1)."""
        q, r = divmod(d_ffn - self.n_shared, self.n_experts)
        return [q + 1] * r + [q] * (self.n_experts - r)

    def active_range(self, d_ffn: int) -> tuple[int, int]:
        """Fewest and most FFN neurons one token runs: the shared ones plus its ``top_k`` experts."""
        return active_range(d_ffn, self.n_experts, self.top_k, self.n_shared)

    def mean_active(self, d_ffn: int) -> float:
        """Active neurons of a token, averaged over experts used equally often."""
        return self.n_shared + self.top_k * (d_ffn - self.n_shared) / self.n_experts


def active_range(d_ffn: int, n_experts: int, top_k: int, n_shared: int) -> tuple[int, int]:
    """Fewest and most active neurons of a token: ``n_shared`` + the ``top_k`` smallest / largest
    of the balanced expert sizes (``r`` experts of ``q + 1`` neurons, the others of ``q``)."""
    q, r = divmod(d_ffn - n_shared, n_experts)
    lo = n_shared + top_k * q + max(0, top_k - (n_experts - r))
    hi = n_shared + top_k * q + min(top_k, r)
    return lo, hi


def _per_token(d_ffn: int, target: float, s0: int, size: float) -> Layout | None:
    """The layout nearest the rule in which every token runs ``target`` +- 1 neurons: experts of
    about ``size`` (within EXACT_SIZE_TOLERANCE), then the least spread between tokens (0: equal
    experts), then the least change of the shared count from ``s0`` (at most one expert's worth).
    None when there is none."""
    routed = d_ffn - s0
    if routed < 2:
        return None
    lo_e = max(2, math.floor(routed / (size * 2**EXACT_SIZE_TOLERANCE)))
    hi_e = min(d_ffn, math.ceil(routed / (size / 2**EXACT_SIZE_TOLERANCE)) + 1)  # E + shared <= d_ffn below
    reach = max(2, math.ceil(size))  # the shared count moves by at most one expert's worth
    best: tuple[tuple[float, int, int, float, int, int], Layout] | None = None
    for e in range(lo_e, hi_e + 1):
        kb = (target - s0) * e / routed
        for k in range(max(1, math.floor(kb) - 1), min(e - 1, math.ceil(kb) + 1) + 1):
            # the mean s + k (d - s) / e moves by 1 - k / e per shared neuron: it must be within one
            s_star = (target - k * d_ffn / e) / (1 - k / e)
            half = 1 / (1 - k / e) + 1
            lo_s, hi_s = max(0, math.floor(s_star - half), s0 - reach), min(d_ffn - e, math.ceil(s_star + half), s0 + reach)
            for shared in range(lo_s, hi_s + 1):
                lo, hi = active_range(d_ffn, e, k, shared)
                if lo < target - 1 - 1e-9 or hi > target + 1 + 1e-9:
                    continue
                q = (d_ffn - shared) / e
                dev = round(abs(math.log2(q / size)), 1)
                if dev > EXACT_SIZE_TOLERANCE:
                    continue
                mean = shared + k * (d_ffn - shared) / e
                cost = (dev, hi - lo, abs(shared - s0), abs(mean - target), e, k)
                if best is None or cost < best[0]:
                    best = (cost, Layout(e, k, shared))
    return best[1] if best is not None else None


def _exact(d_ffn: int, target: float, s0: int, size: float) -> Layout:
    """The last resort, always found: equal experts (every token runs the same count A, an integer
    within one of the target), their size q the divisor of the ``d_ffn - A`` skipped neurons
    nearest ``size``; ``k = round((A - s0) / q)``, the shared neurons the rest of A."""
    best: tuple[tuple[float, float, int, int], Layout] | None = None
    for active in range(max(1, math.ceil(target - 1)), min(d_ffn - 1, math.floor(target + 1)) + 1):
        idle = d_ffn - active  # = (E - k) * q
        for q in range(1, active + 1):
            if idle % q:
                continue
            k = min(active // q, max(1, round((active - s0) / q)))
            shared = active - k * q
            cost = (round(abs(math.log2(q / size)), 1), abs(active - target), abs(shared - s0), q)
            if best is None or cost < best[0]:
                best = (cost, Layout(idle // q + k, k, shared))
    assert best is not None  # q = 1 always divides
    return best[1]


def _balanced(d_ffn: int, target: float, s0: int, size: float) -> Layout | None:
    """Experts of ``size`` (balanced, differing by at most one): E and k from the rule, the shared
    count moved by up to E so the mean active count is within one of the target, with the least
    spread between tokens."""
    e = min(max(2, round((d_ffn - s0) / size)), d_ffn - s0) if d_ffn - s0 >= 2 else 2
    routed = d_ffn - s0
    k0 = min(e, max(1, round((target - s0) * e / routed))) if routed > 0 else 1
    reach = e + 2 * math.ceil(size)  # k's rounding moves the mean by up to size / 2 per expert chosen
    best: tuple[tuple[float, int, int], Layout] | None = None
    for k in range(max(1, k0 - 1), min(e, k0 + 1) + 1):
        for shared in range(max(0, s0 - reach), min(d_ffn - e, s0 + reach) + 1):
            lay = Layout(e, k, shared)
            if abs(lay.mean_active(d_ffn) - target) > 1 + 1e-9:
                continue
            lo, hi = lay.active_range(d_ffn)
            cost = (max(abs(lo - target), abs(hi - target)), abs(shared - s0), abs(k - k0))
            if best is None or cost < best[0]:
                best = (cost, lay)
    return best[1] if best is not None else None


def layout_for(fraction: float, d_ffn: int) -> Layout:
    """The layout for an active FFN ``fraction`` in (0, 1) of an FFN ``d_ffn`` neurons wide (see the
    module docstring).  The mean active neuron count of a token is within one of ``fraction *
    d_ffn``, and every token's is wherever a layout near the rule allows it;
    ``n_experts >= 2``, ``top_k <= n_experts`` and ``n_experts + n_shared <= d_ffn`` always hold."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ConfigError(f"--active must be a fraction strictly between 0 and 1, got {fraction!r}")
    if isinstance(d_ffn, bool) or not isinstance(d_ffn, int) or d_ffn < 2:
        raise ConfigError(f"--active needs an FFN of at least 2 neurons, got d_ffn={d_ffn!r}")
    target = fraction * d_ffn
    s0 = round(SHARED_SHARE * target)
    size = min(float(EXPERT_SIZE), max(1.0, target - s0))  # one expert never exceeds the routed budget
    return _per_token(d_ffn, target, s0, size) or _balanced(d_ffn, target, s0, size) or _exact(d_ffn, target, s0, size)


__all__ = ["EXPERT_SIZE", "MEASURED", "SHARED_BY", "SHARED_SHARE", "Layout", "active_range", "layout_for"]
