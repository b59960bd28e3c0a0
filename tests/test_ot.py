import pytest
import torch

from moefy.ot import (
    capacities,
    geometric_schedule,
    round_exact,
    round_greedy,
    rounding_gap,
    sinkhorn_log,
    straight_through,
)


def test_capacities_unequal_sum_and_spread():
    caps = capacities(172, 8)
    assert sum(caps) == 172
    assert max(caps) - min(caps) <= 1
    assert capacities(1536, 8) == [192] * 8


def test_capacities_rejects_more_experts_than_neurons():
    with pytest.raises(ValueError):
        capacities(4, 5)


@pytest.mark.parametrize("n,e,tau", [(172, 8, 1.0), (64, 4, 0.1), (1536, 8, 0.05)])
def test_sinkhorn_marginals(n, e, tau):
    torch.manual_seed(0)
    caps = capacities(n, e)
    m = sinkhorn_log(torch.randn(n, e), caps, tau=tau, n_iter=500, tol=1e-7).exp()
    assert torch.allclose(m.sum(1), torch.ones(n), atol=1e-5)
    assert torch.allclose(m.sum(0), torch.tensor(caps, dtype=torch.float32), rtol=1e-4)
    assert torch.isfinite(m).all()


@pytest.mark.parametrize("rounder", [round_greedy, round_exact])
def test_rounding_meets_capacities_exactly(rounder):
    torch.manual_seed(1)
    caps = capacities(172, 8)
    soft = sinkhorn_log(torch.randn(172, 8) * 3, caps, tau=0.5).exp()
    assign = rounder(soft, caps)
    assert assign.shape == (172,)
    assert torch.bincount(assign, minlength=8).tolist() == caps


def test_exact_rounding_is_at_least_greedy():
    torch.manual_seed(2)
    caps = capacities(96, 6)
    soft = sinkhorn_log(torch.randn(96, 6), caps, tau=1.0).exp()
    gap = rounding_gap(soft, caps)
    assert gap.exact >= gap.greedy - 1e-6
    assert gap.relative_gap >= -1e-9


def test_gradient_reaches_affinity_through_ste():
    torch.manual_seed(3)
    caps = capacities(40, 4)
    a = torch.randn(40, 4, requires_grad=True)
    soft = sinkhorn_log(a, caps, tau=0.5).exp()
    hard = torch.nn.functional.one_hot(round_greedy(soft, caps), 4).float()
    m = straight_through(hard, soft)
    assert torch.allclose(m.detach(), hard, atol=1e-6)
    (m * torch.randn(40, 4)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_schedule_endpoints():
    assert geometric_schedule(1.0, 0.05, 0, 10) == pytest.approx(1.0)
    assert geometric_schedule(1.0, 0.05, 9, 10) == pytest.approx(0.05)
