"""Every split method on tiny inputs: exact capacities, determinism, and the compare report."""

import pytest
import torch

from moefy.adapters import FFNWeights
from moefy.config import ConvertConfig
from moefy.convert import initial_split
from moefy.ot import capacities
from moefy.splits import act_cluster_split, choose_shared, param_cluster_split, random_split

from conftest import SAMPLE5, STORIES, TINYSTORIES, needs_shared


def _ffn(n=172, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return FFNWeights(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(d, n, generator=g))


@pytest.mark.parametrize("method", ["dot", "dot-frozen", "random", "param-cluster", "act-cluster"])
@pytest.mark.parametrize("shared", [0, 12])
def test_split_capacities_and_determinism(method, shared):
    ffn = _ffn()
    h = torch.randn(300, 172, generator=torch.Generator().manual_seed(1))
    cfg = ConvertConfig(method=method, n_experts=8, top_k=2, n_shared=shared)
    a = initial_split(method, cfg.init, ffn, h, cfg, seed=5)
    b = initial_split(method, cfg.init, ffn, h, cfg, seed=5)
    assert [e.tolist() for e in a.experts] == [e.tolist() for e in b.experts]
    assert a.shared.numel() == shared
    assert sorted(a.expert_sizes, reverse=True) == capacities(172 - shared, 8)
    perm = a.permutation()
    assert torch.equal(torch.sort(perm).values, torch.arange(172))


def test_prune_keeps_the_active_budget():
    ffn = _ffn()
    h = torch.randn(300, 172)
    cfg = ConvertConfig(method="prune", n_experts=8, top_k=2)
    split = initial_split("prune", cfg.init, ffn, h, cfg, seed=0)
    assert split.n_experts == 0 and split.shared.numel() == round(172 * 2 / 8)


def test_seeds_change_random_split():
    a, b = random_split(64, 4, 0), random_split(64, 4, 1)
    assert any(not torch.equal(x, y) for x, y in zip(a.experts, b.experts))


def test_clusters_group_similar_neurons():
    # two obvious groups of weight rows: balanced k-means must separate them
    d = 8
    base = torch.zeros(40, d)
    base[:20, 0] = 1.0
    base[20:, 1] = 1.0
    ffn = FFNWeights(base + 0.01 * torch.randn(40, d), base.clone(), torch.randn(d, 40))
    split = param_cluster_split(ffn, 2, seed=0)
    groups = {tuple(sorted(int(i) // 20 for i in e)) for e in split.experts}
    assert groups == {tuple([0] * 20), tuple([1] * 20)}
    h = torch.zeros(100, 40)
    h[:50, :20] = 1.0
    h[50:, 20:] = 1.0
    split = act_cluster_split(h, 2, active_fraction=0.5, seed=0)
    groups = {tuple(sorted(int(i) // 20 for i in e)) for e in split.experts}
    assert groups == {tuple([0] * 20), tuple([1] * 20)}
    assert choose_shared(h, 5, 0.5).numel() == 5


@needs_shared()
def test_compare_report_and_resume(tmp_path):
    from moefy.compare import run_compare

    base = ConvertConfig(calib_tokens=1024, seq_len=64, steps=3)
    kw = dict(methods=["dot", "random"], grid=[(4, 2)], base=base, calib=[str(TINYSTORIES)], ppl_file=str(SAMPLE5),
              seq_len=64, log=lambda *_: None)
    res = run_compare(str(STORIES), tmp_path / "r", **kw)
    assert set(res["cells"]) == {"dot-E4k2", "random-E4k2"}
    for f in ("results.json", "report.md", "ppl_vs_active.png", "layer_error.png", "expert_load.png"):
        assert (tmp_path / "r" / f).is_file()
    stamp = (tmp_path / "r" / "cells" / "dot-E4k2" / "eval.json").stat().st_mtime_ns
    run_compare(str(STORIES), tmp_path / "r", **kw)  # finished cells are not recomputed
    assert (tmp_path / "r" / "cells" / "dot-E4k2" / "eval.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("weights", ["ridge", "grad", "grad+ridge"])
def test_weight_adaptation_never_worsens_held_out_error(weights):
    from moefy.dotmoe import DotMoeLayer
    from moefy.layerwise import fit_layer

    torch.manual_seed(0)
    ffn = _ffn(n=64, d=16)
    x = torch.randn(2048, 16)
    h = torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    y = h @ ffn.down.T
    split = random_split(64, 4, 0)
    base = ConvertConfig(n_experts=4, top_k=1, steps=10, eval_every=5, weights="none", weight_steps=20, lr_weights=1e-3)
    layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", split, 1)
    ref = fit_layer(layer, x[:1536], y[:1536], x[1536:], y[1536:], base, 0)
    layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", split, 1)
    cfg = ConvertConfig(**{**base.to_dict(), "weights": weights})
    rep = fit_layer(layer, x[:1536], y[:1536], x[1536:], y[1536:], cfg, 0)
    assert rep.error_final <= ref.error_final + 1e-6
    assert rep.error_final < rep.error_routed  # the adaptation found something on this easy case
