"""Tests for the LapSum soft top-k: its solve and truncation (moefy.hf.modeling_moefy, the one
definition) and the gradient, calibration and budgets training adds (moefy.lapsum)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefy.hf.modeling_moefy import lapsum_keep, lapsum_route
from moefy.lapsum import (
    LapSumTopK,
    calibrate_threshold,
    laplace_cdf,
    lapsum_topk,
    layer_budgets,
)


def truncated_lapsum(scores, k, alpha, threshold=0.0, max_active=None):
    """The LapSum router (the exported rule, with the solve's gradient)."""
    return lapsum_route(scores, k, alpha, threshold, max_active)


def _bisection_reference(scores: torch.Tensor, k: float, alpha: float) -> torch.Tensor:
    """Float64 bisection on t (independent of the closed form)."""
    r = scores.double()
    lo = r.amin(-1, keepdim=True) - 60 * alpha
    hi = r.amax(-1, keepdim=True) + 60 * alpha
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = laplace_cdf((r - mid) / alpha).sum(-1, keepdim=True)
        lo = torch.where(s > k, mid, lo)
        hi = torch.where(s > k, hi, mid)
    return laplace_cdf((r - 0.5 * (lo + hi)) / alpha)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 8), (64, 16), (2, 3, 64)])
@pytest.mark.parametrize("k_frac", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("alpha", [0.05, 1.0, 5.0])
def test_sum_to_k_and_range_float32(shape: tuple[int, ...], k_frac: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(hash((shape, k_frac, alpha)) % 2**31)
    n = shape[-1]
    scores = torch.randn(shape, generator=g) * 3
    for k in (k_frac * n, max(1.0, round(k_frac * n))):
        p = lapsum_topk(scores, k, alpha)
        assert p.dtype == torch.float32 and p.shape == scores.shape
        assert bool(((p >= 0) & (p <= 1)).all())
        target = torch.full(shape[:-1], float(k), dtype=torch.float64)
        torch.testing.assert_close(p.double().sum(-1), target, rtol=0, atol=1e-5)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("k", [0.3, 1.0, 2.5, 7.0, 15.5])
def test_matches_bisection_reference(alpha: float, k: float) -> None:
    scores = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    p = lapsum_topk(scores, k, alpha)
    torch.testing.assert_close(p.double(), _bisection_reference(scores, k, alpha), rtol=0, atol=2e-6)
    p64 = lapsum_topk(scores.double(), k, alpha)
    torch.testing.assert_close(p64, _bisection_reference(scores, k, alpha), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1.0, 3.7])
def test_bfloat16(k: float) -> None:
    scores = torch.randn(128, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    p = lapsum_topk(scores, k, 0.5)
    assert p.dtype == torch.bfloat16
    assert bool(((p >= 0) & (p <= 1)).all())
    # each weight is rounded once to bf16 (relative error <= 2^-9)
    torch.testing.assert_close(p.double().sum(-1), torch.full((128,), k, dtype=torch.float64), rtol=0, atol=k * 2**-8)
    ref = lapsum_topk(scores.float(), k, 0.5)
    torch.testing.assert_close(p.float(), ref, rtol=2**-8, atol=1e-6)
    scores.requires_grad_(True)
    lapsum_topk(scores, k, 0.5).float().pow(2).sum().backward()
    assert scores.grad is not None and scores.grad.dtype == torch.bfloat16
    assert bool(torch.isfinite(scores.grad.float()).all())


def test_gradcheck_scores_k_alpha() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LapSumTopK.apply, (scores, k, alpha))
    # integer k, larger/smaller alpha
    for kv, av in ((1.0, 0.2), (5.0, 3.0)):
        kt = torch.tensor(kv, dtype=torch.float64, requires_grad=True)
        at = torch.tensor(av, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(LapSumTopK.apply, (scores, kt, at))
    # tied scores (the threshold sits on a tie for k = 2 with three equal top scores)
    tied = torch.tensor([[1.0, 1.0, 1.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    kt = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    at = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lapsum_topk, (tied.requires_grad_(True), kt, at))


def test_gradcheck_per_row_k_and_alpha() -> None:
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = (torch.rand(3, 1, generator=g, dtype=torch.float64) * 4 + 0.5).requires_grad_(True)  # broadcast over dim 1
    alpha = (torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(LapSumTopK.apply, (scores, k, alpha))


def test_python_float_args_get_no_grad() -> None:
    scores = torch.randn(5, 6, requires_grad=True)
    alpha = torch.tensor(0.7, requires_grad=True)
    p = lapsum_topk(scores, 2.0, alpha)
    gs, ga = torch.autograd.grad(p[:, 0].sum(), (scores, alpha))
    assert gs.shape == scores.shape and ga.shape == ()
    # sum(p) == k is constant, so the gradient of the sum w.r.t. scores/alpha vanishes
    p = lapsum_topk(scores, 2.0, alpha)
    gs, ga = torch.autograd.grad(p.sum(), (scores, alpha))
    assert gs.abs().max() < 1e-6 and ga.abs() < 1e-5


def test_grad_of_sum_wrt_k_is_one() -> None:
    scores = torch.randn(10, 8)
    k = torch.tensor(3.2, requires_grad=True)
    (gk,) = torch.autograd.grad(lapsum_topk(scores, k, 0.5).sum(), k)
    assert abs(float(gk) - 10.0) < 1e-4  # one per row


@pytest.mark.parametrize("k", [1, 2, 5])
def test_small_alpha_gives_hard_topk(k: int) -> None:
    g = torch.Generator().manual_seed(5)
    n = 12
    # distinct scores with gaps >= 0.1, far larger than alpha
    scores = torch.stack([torch.randperm(n, generator=g).float() * 0.1 for _ in range(16)])
    scores = scores + torch.rand(scores.shape, generator=g) * 1e-3
    p = lapsum_topk(scores, float(k), 1e-4)
    hard = torch.zeros_like(scores).scatter_(-1, scores.topk(k, -1).indices, 1.0)
    torch.testing.assert_close(p, hard, rtol=0, atol=1e-4)
    scores.requires_grad_(True)
    (grad,) = torch.autograd.grad((lapsum_topk(scores, float(k), 1e-4) * torch.randn(16, n)).sum(), scores)
    assert bool(torch.isfinite(grad).all())


def test_ties_and_huge_scores() -> None:
    tied = torch.zeros(4, 6)
    torch.testing.assert_close(lapsum_topk(tied, 2.0, 1.0), torch.full((4, 6), 1 / 3))
    torch.testing.assert_close(lapsum_topk(tied, 2.0, 1e-6), torch.full((4, 6), 1 / 3))
    partial = torch.tensor([[3.0, 3.0, 3.0, 1.0, 1.0]])
    p = lapsum_topk(partial, 2.0, 1e-3)
    torch.testing.assert_close(p, torch.tensor([[2 / 3, 2 / 3, 2 / 3, 0.0, 0.0]]))

    huge = torch.tensor([[1e4, -1e4, 0.0, 1e4, 5e3, -3e4], [2e4, 2e4, 2e4, 2e4, -2e4, 0.0]])
    for alpha in (1e-4, 1.0, 1e3):
        for k in (0.5, 2.0, 3.5):
            s = huge.clone().requires_grad_(True)
            p = lapsum_topk(s, k, alpha)
            assert bool(torch.isfinite(p).all())
            torch.testing.assert_close(p.double().sum(-1), torch.full((2,), k, dtype=torch.float64), rtol=0, atol=1e-5)
            (grad,) = torch.autograd.grad((p * torch.arange(6.0)).sum(), s)
            assert bool(torch.isfinite(grad).all())

    # large, nearly equal scores keep full relative precision
    close = 1e4 + torch.randn(8, 16, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(
        lapsum_topk(close, 3.0, 1e-2).double(), lapsum_topk(close.double(), 3.0, 1e-2), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interval_repair_from_any_guess(dtype: torch.dtype) -> None:
    """The consistency loop reaches the right piece from any starting interval."""
    from moefy.hf.modeling_moefy import _lapsum_z

    g = torch.Generator().manual_seed(12)
    r = (torch.randn(6, 10, generator=g, dtype=torch.float64) * 3).to(dtype)
    k = torch.tensor([[0.4], [1.0], [3.3], [5.0], [8.9], [9.5]], dtype=torch.float64)
    alpha = torch.full((6, 1), 0.3, dtype=dtype)
    ref = _lapsum_z(r, k, alpha)
    torch.testing.assert_close(laplace_cdf(ref).double().sum(-1, keepdim=True), k, rtol=0, atol=1e-5)
    for m0 in range(11):
        z = _lapsum_z(r, k, alpha, m_guess=torch.full((6, 1), m0))
        torch.testing.assert_close(laplace_cdf(z), laplace_cdf(ref), rtol=0, atol=1e-6)


def test_large_spread_small_alpha_matches_float64() -> None:
    scores = torch.randn(64, 32, generator=torch.Generator().manual_seed(13)) * 1e4
    for alpha in (2e-4, 1e-6):
        for k in (1.3, 7.5, 20.2, 31.5):
            p = lapsum_topk(scores, k, alpha)
            torch.testing.assert_close(p.double(), lapsum_topk(scores.double(), k, alpha), rtol=0, atol=1e-6)
            torch.testing.assert_close(p.double().sum(-1), torch.full((64,), k, dtype=torch.float64), rtol=0, atol=1e-5)


def test_batched_shapes_match_rowwise() -> None:
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(2, 3, 4, 10, generator=g)
    k = torch.rand(2, 3, 4, generator=g) * 8 + 1
    alpha = torch.rand(3, 1, generator=g) + 0.1  # broadcasts to (2, 3, 4)
    p = lapsum_topk(scores, k, alpha)
    assert p.shape == scores.shape
    flat = scores.reshape(-1, 10)
    kf = k.reshape(-1)
    af = alpha.expand(2, 3, 4).reshape(-1)
    rows = torch.stack([lapsum_topk(flat[i], float(kf[i]), float(af[i])) for i in range(flat.shape[0])])
    torch.testing.assert_close(p.reshape(-1, 10), rows)
    # a single expert row (n = 1) is allowed only in the degenerate sense 0 < k < 1
    torch.testing.assert_close(lapsum_topk(torch.randn(5, 1), 0.3, 1.0), torch.full((5, 1), 0.3))


def test_invalid_arguments() -> None:
    scores = torch.randn(3, 4)
    for k in (0.0, 4.0, -1.0, 5.0):
        with pytest.raises(ValueError):
            lapsum_topk(scores, k, 1.0)
    with pytest.raises(ValueError):
        lapsum_topk(scores, 2.0, 0.0)
    with pytest.raises(ValueError):
        lapsum_topk(scores, torch.ones(2, 3), 1.0)  # does not broadcast per row


def test_truncation_zero_grad_and_max_active() -> None:
    g = torch.Generator().manual_seed(8)
    scores = torch.randn(64, 16, generator=g).requires_grad_(True)
    full = lapsum_topk(scores, 3.0, 0.5)
    w, mask = truncated_lapsum(scores, 3.0, 0.5, threshold=0.05, max_active=4)
    assert mask.dtype == torch.bool and w.shape == mask.shape == scores.shape
    assert int(mask.sum(-1).max()) <= 4
    assert bool((w[~mask] == 0).all())
    torch.testing.assert_close(w[mask], full[mask])
    # kept = (threshold OR the best expert) AND top-4
    best = torch.zeros_like(mask).scatter_(-1, full.detach().argmax(-1, keepdim=True), True)
    kept_ref = ((full >= 0.05) | best) & torch.zeros_like(mask).scatter_(-1, full.detach().topk(4, -1).indices, True)
    assert torch.equal(mask, kept_ref) and bool(mask.any(-1).all())
    # dropped weights are constants: d w_dropped / d anything == 0
    (g_drop,) = torch.autograd.grad(w[~mask].sum(), scores, retain_graph=True)
    assert bool((g_drop == 0).all())
    # a loss on the truncated weights equals (in gradient) the same loss on the soft weights
    # with the upstream gradient zeroed on dropped entries
    v = torch.randn(64, 16, generator=g)
    (g_trunc,) = torch.autograd.grad((w * v).sum(), scores)
    (g_soft,) = torch.autograd.grad((full * v * mask).sum(), scores, retain_graph=True)
    torch.testing.assert_close(g_trunc, g_soft)
    # without truncation nothing is dropped; no gradient graph changes the values
    w3, mask3 = truncated_lapsum(scores, 3.0, 0.5)
    assert bool(mask3.all())
    torch.testing.assert_close(w3, full)
    assert torch.equal(lapsum_route(scores.detach(), 3.0, 0.5, 0.05, 4)[0], w.detach())


def test_truncation_always_keeps_the_best_expert_even_under_ties() -> None:
    p = torch.tensor([[0.3, 0.3, 0.3, 0.1], [0.05, 0.05, 0.9, 0.0], [0.25, 0.25, 0.25, 0.25]])
    keep = lapsum_keep(p, 0.95, 2)  # above every weight: only the best expert (lower index among ties)
    assert keep.tolist() == [[True, False, False, False], [False, False, True, False], [True, False, False, False]]
    keep = lapsum_keep(p, 0.2, 2)  # max_active breaks the tie toward the lower index too
    assert keep.tolist() == [[True, True, False, False], [False, False, True, False], [True, True, False, False]]


@pytest.mark.parametrize(("target", "max_active"), [(2.5, None), (4.2, None), (2.8, 3), (1.0, 2)])
def test_calibrate_threshold(target: float, max_active: int | None) -> None:
    scores = torch.randn(4096, 16, generator=torch.Generator().manual_seed(9))
    th = calibrate_threshold(scores, 2.0, 0.5, target, max_active)
    assert 0.0 <= th <= 1.0
    _, mask = truncated_lapsum(scores, 2.0, 0.5, threshold=th, max_active=max_active)
    assert abs(float(mask.sum(-1).float().mean()) - target) <= 2.0 / 4096
    with pytest.raises(ValueError):
        calibrate_threshold(scores, 2.0, 0.5, 17.0, None)


def test_layer_budgets() -> None:
    eta = torch.randn(12, requires_grad=True)
    k = layer_budgets(eta, 48.0)
    assert k.shape == (12,)
    assert abs(float(k.detach().double().sum()) - 48.0) < 1e-4
    assert bool((k >= 1).all())
    (gk,) = torch.autograd.grad(k[0], eta)
    assert float(gk.abs().sum()) > 0
    torch.testing.assert_close(layer_budgets(torch.zeros(3, 2), 6.0), torch.ones(3, 2))
    torch.testing.assert_close(layer_budgets(torch.zeros(4), 10.0), torch.full((4,), 2.5))
    extreme = layer_budgets(torch.tensor([100.0, -100.0, 0.0]), 9.0)
    assert bool((extreme >= 1).all()) and abs(float(extreme.sum()) - 9.0) < 1e-5
    with pytest.raises(ValueError, match="K >= L"):
        layer_budgets(torch.zeros(8), 7.5)


def test_learned_budget_through_the_router() -> None:
    torch.manual_seed(10)
    proj = torch.nn.Linear(32, 8, bias=False)
    log_alpha = torch.nn.Parameter(torch.tensor(math.log(0.5)))
    eta = torch.zeros(4, requires_grad=True)
    k_layers = layer_budgets(eta, 10.0)
    x = torch.randn(2, 5, 32)
    w, mask = truncated_lapsum(proj(x), k_layers[1], log_alpha.exp())
    assert w.shape == mask.shape == (2, 5, 8) and bool(mask.all())
    torch.testing.assert_close(w.sum(-1), k_layers[1].detach().expand(2, 5))
    (w * torch.randn(2, 5, 8)).sum().backward()
    assert proj.weight.grad is not None and log_alpha.grad is not None and eta.grad is not None
    w, mask = truncated_lapsum(proj(x), 2.0, 1.0, threshold=0.1, max_active=3)
    assert int(mask.sum(-1).max()) <= 3 and bool((w[~mask] == 0).all())


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 5),
    n=st.integers(2, 64),
    k_frac=st.floats(0.01, 0.99),
    log_alpha=st.floats(-7.0, 4.0),
    log_scale=st.floats(-3.0, 4.0),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
    offset=st.sampled_from([0.0, -50.0, 1e4]),
)
def test_property_finite_and_sums_to_k(
    batch: int, n: int, k_frac: float, log_alpha: float, log_scale: float, seed: int, ties: bool, offset: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=g) * 10**log_scale
    if ties:
        scores = scores.round()
    scores = scores + offset
    k = k_frac * n
    alpha = math.exp(log_alpha)
    scores.requires_grad_(True)
    p = lapsum_topk(scores, k, alpha)
    assert bool(torch.isfinite(p).all())
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p.double().sum(-1), torch.full((batch,), k, dtype=torch.float64), rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad((p * torch.randn(batch, n, generator=g)).sum(), scores)
    assert bool(torch.isfinite(grad).all())
