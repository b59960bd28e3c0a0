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
    kw = dict(methods=["dot", "random"], grid=[(4, 2, 0), (4, 1, 4)], base=base, calib=[str(TINYSTORIES)], ppl_file=str(SAMPLE5),
              seq_len=64, log=lambda *_: None)
    res = run_compare(str(STORIES), tmp_path / "r", **kw)
    assert set(res["cells"]) == {"dot-E4k2", "random-E4k2", "dot-E4k1s4", "random-E4k1s4"}
    assert res["cells"]["dot-E4k1s4"]["n_shared"] == 4
    for f in ("results.json", "report.md", "ppl_vs_active.png", "layer_error.png", "expert_load.png"):
        assert (tmp_path / "r" / f).is_file()
    stamp = (tmp_path / "r" / "cells" / "dot-E4k2" / "eval.json").stat().st_mtime_ns
    run_compare(str(STORIES), tmp_path / "r", **kw)  # finished cells are not recomputed
    assert (tmp_path / "r" / "cells" / "dot-E4k2" / "eval.json").stat().st_mtime_ns == stamp
    # --report-only: cells copied in from another run join the report, nothing is recomputed
    from moefy.compare import report_only

    import shutil

    shutil.copytree(tmp_path / "r" / "cells" / "dot-E4k2", tmp_path / "r" / "cells" / "copied-E4k2")
    rebuilt = report_only(tmp_path / "r")
    assert set(rebuilt["cells"]) == set(res["cells"]) | {"copied-E4k2"}
    assert rebuilt["cells"]["copied-E4k2"]["eval"] == res["cells"]["dot-E4k2"]["eval"]
    assert "copied-E4k2" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "cells" / "dot-E4k2" / "eval.json").stat().st_mtime_ns == stamp


def _fit_easy_layer(cfg: ConvertConfig):
    """fit_layer on a 64-neuron FFN split into 4 random experts, 1,536 tokens to fit and 512 held out."""
    from moefy.dotmoe import DotMoeLayer
    from moefy.layerwise import fit_layer

    torch.manual_seed(0)
    ffn = _ffn(n=64, d=16)
    x = torch.randn(2048, 16)
    y = (torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)) @ ffn.down.T
    layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", random_split(64, 4, 0), 1)
    return fit_layer(layer, x[:1536], y[:1536], x[1536:], y[1536:], cfg, 0)


@pytest.mark.parametrize("weights", ["ridge", "grad", "grad+ridge", "ridge+grad"])
def test_weight_adaptation_never_worsens_held_out_error(weights):
    base = ConvertConfig(n_experts=4, top_k=1, steps=10, eval_every=5, weights="none", weight_steps=20, lr_weights=1e-3)
    ref = _fit_easy_layer(base)
    rep = _fit_easy_layer(ConvertConfig(**{**base.to_dict(), "weights": weights}))
    assert rep.error_final <= ref.error_final + 1e-6
    assert rep.error_final < rep.error_routed  # the adaptation found something on this easy case
    # the report says how many gradient steps ran (the cap, or fewer when early stopping ended them)
    assert (0 < rep.weight_steps <= 20) if "grad" in weights else rep.weight_steps == 0


def test_ridge_then_grad_starts_from_the_ridge_fit_and_never_ends_worse():
    """``ridge+grad``: the gradient steps start from the ridge refit and keep their best held-out
    state, and W_down is refitted once more, so the layer ends no worse than ``ridge`` alone."""
    errs = {
        weights: _fit_easy_layer(ConvertConfig(n_experts=4, top_k=1, steps=4, eval_every=5, weights=weights,
                                               weight_steps=20, lr_weights=1e-3)).error_final
        for weights in ("ridge", "ridge+grad")
    }
    assert errs["ridge+grad"] <= errs["ridge"] + 1e-6


def test_fixed_ridge_gamma_is_the_one_used_and_bad_values_are_config_errors():
    from moefy.config import RIDGE_GAMMAS, ConfigError

    chosen = {gamma: _fit_easy_layer(ConvertConfig(n_experts=4, top_k=1, steps=4, eval_every=2, ridge_gamma=gamma)).ridge_gamma
              for gamma in (None, 1.0)}
    assert chosen[None] in RIDGE_GAMMAS  # chosen on held-out tokens from the grid
    assert chosen[1.0] in (1.0, None)  # the fixed strength, or no refit if it does not help
    for bad in (0.0, -1.0, "strong", True):
        with pytest.raises(ConfigError, match="ridge_gamma"):
            ConvertConfig(ridge_gamma=bad).validate(64)


def test_token_weights_cap_outliers_only():
    from moefy.layerwise import relative_error, token_weights

    y = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    y[0] *= 100.0  # a "massive activation" token
    w = token_weights(y, None, clip=16.0)
    assert w.shape == (512,) and float(w.max()) == 1.0 and float(w.min()) > 0
    assert float(w[0]) < 0.01 and bool((w[1:] > 0.2).all())
    # w = 1 everywhere gives the plain relative error
    y_hat = y + 0.1 * torch.randn_like(y)
    assert relative_error(y_hat, y, torch.ones(512)) == pytest.approx(relative_error(y_hat, y), rel=1e-6)
    # an error on the outlier alone dominates the unweighted metric, not the weighted one
    y_bad = y.clone()
    y_bad[0] = 0.0
    assert relative_error(y_bad, y) > 0.9
    assert relative_error(y_bad, y, w) < 0.1


@pytest.mark.parametrize("weighting", ["none", "clip"])
def test_fit_layer_token_weighting_is_deterministic(weighting):
    from moefy.dotmoe import DotMoeLayer
    from moefy.layerwise import fit_layer

    ffn = _ffn(n=64, d=16)
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(3))
    x[::256] *= 30.0  # outlier tokens
    y = (torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)) @ ffn.down.T
    cfg = ConvertConfig(n_experts=4, top_k=1, steps=10, eval_every=5, token_weighting=weighting)
    reps = []
    for _ in range(2):
        layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", random_split(64, 4, 0), 1)
        reps.append(fit_layer(layer, x[:1536], y[:1536], x[1536:], y[1536:], cfg, 0))
    assert reps[0].error_final == reps[1].error_final
    assert reps[0].error_final <= reps[0].error_init + 1e-9


def test_unknown_token_weighting_is_a_config_error():
    from moefy.errors import ConfigError

    with pytest.raises(ConfigError, match="token weighting"):
        ConvertConfig(token_weighting="median").validate()


def test_layerwise_stage_skips_calibration_forward_when_all_layers_are_restored(monkeypatch):
    import moefy.convert as conv
    from tiny_models import tiny_model

    model = tiny_model("llama")
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = ConvertConfig(n_experts=4, top_k=2, steps=2, eval_every=1)
    conv.layerwise_stage(model, calib, cfg)
    fitted = {i: layer.mlp for i, layer in enumerate(model.model.layers)}

    fresh = tiny_model("llama")

    def boom(*a, **k):
        raise AssertionError("calibration activations captured although every layer was restored")

    monkeypatch.setattr(conv, "capture_inputs", boom)
    assert conv.layerwise_stage(fresh, calib, cfg, restored=fitted) == []
    assert all(fresh.model.layers[i].mlp is fitted[i] for i in fitted)


def test_dot_frozen_trains_the_router_only():
    """The paper's sequential ablation: assignment frozen at its initialisation, router trained."""
    from moefy.dotmoe import DotMoeLayer
    from moefy.layerwise import fit_layer

    ffn = _ffn(n=64, d=16)
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(4))
    y = (torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)) @ ffn.down.T
    h = torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    cfg = ConvertConfig(method="dot-frozen", n_experts=4, top_k=1, steps=10, eval_every=5, weights="none")
    split = initial_split("dot-frozen", cfg.init, ffn, h[:512], cfg, seed=0)
    layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", split, 1)
    rep = fit_layer(layer, x[:1536], y[:1536], x[1536:], y[1536:], cfg, 0)
    assert rep.steps == 10 and rep.neurons_moved == 0
    assert rep.error_routed <= rep.error_init + 1e-9  # the best held-out state is kept


def test_parse_grid_accepts_shared_points():
    from moefy.compare import parse_grid
    from moefy.errors import ConfigError

    assert parse_grid("8:2,7:1:192", shared=0) == [(8, 2, 0), (7, 1, 192)]
    assert parse_grid("8:2", shared=16) == [(8, 2, 16)]
    with pytest.raises(ConfigError, match="E:k"):
        parse_grid("8-2")


def test_ls_router_scoring_never_keeps_a_worse_assignment():
    """Scoring each assignment with a refitted least-squares router as well as the STE router
    leaves the training trajectory unchanged and can only lower the kept held-out error."""
    from moefy.dotmoe import DotMoeLayer
    from moefy.layerwise import fit_layer

    ffn = _ffn(n=64, d=16, seed=2)
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(5))
    h = torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    y = h @ ffn.down.T
    errs = {}
    for flag in (False, True):
        cfg = ConvertConfig(n_experts=4, top_k=2, steps=20, eval_every=5, weights="none", ls_router_eval=flag)
        split = initial_split("dot", cfg.init, ffn, h[:512], cfg, seed=0)
        layer = DotMoeLayer(ffn, torch.nn.functional.silu, "silu", split, 2, learn_assignment=True)
        errs[flag] = fit_layer(layer, x[:1536], y[:1536], x[1536:], y[1536:], cfg, 0).error_routed
    assert errs[True] <= errs[False] + 1e-9


@needs_shared()
def test_select_model_keeps_the_fit_with_lower_model_kl(tmp_path):
    """`--select model`: every trained layer records both fits' held-out model KL and keeps the lower."""
    from moefy.runner import run_convert

    cfg = ConvertConfig(n_experts=4, top_k=1, calib_tokens=4096, seq_len=64, steps=6, eval_every=2, select="model")
    res = run_convert(str(STORIES), tmp_path / "m", cfg, [str(TINYSTORIES)], log=lambda *_: None)
    reports = res.record["layer_reports"]
    assert reports and all(r["selected"] in ("trained", "initial") for r in reports)
    for r in reports:
        kl = r["model_kl"]
        assert kl[r["selected"]] == min(kl.values()) and all(v >= 0 for v in kl.values())
        if r["selected"] == "initial":
            assert r["neurons_moved"] == 0


@needs_shared()
def test_select_model_refuses_layer_by_layer(tmp_path):
    from moefy.errors import ConfigError
    from moefy.runner import run_convert

    cfg = ConvertConfig(n_experts=4, top_k=1, calib_tokens=1024, seq_len=64, steps=2, select="model")
    with pytest.raises(ConfigError, match="--select model"):
        run_convert(str(STORIES), tmp_path / "m", cfg, [str(TINYSTORIES)], log=lambda *_: None, onload=True)
    assert not (tmp_path / "m").exists()


def test_unknown_select_is_a_config_error():
    from moefy.errors import ConfigError

    with pytest.raises(ConfigError, match="--select"):
        ConvertConfig(select="logits").validate()


@needs_shared()
@pytest.mark.parametrize("select", ["layer", "model"])
def test_init_best_starts_each_layer_from_the_better_heuristic(select, tmp_path):
    """`--init best`: every layer records both heuristic splits' held-out scores and starts from the
    lower; the checkpoint converts and reloads."""
    from moefy.config import BEST_INIT_CANDIDATES
    from moefy.runner import run_convert

    cfg = ConvertConfig(n_experts=4, top_k=1, calib_tokens=4096, seq_len=64, steps=4, eval_every=2, init="best", select=select)
    res = run_convert(str(STORIES), tmp_path / "m", cfg, [str(TINYSTORIES)], log=lambda *_: None)
    reports = res.record["layer_reports"]
    assert reports
    for r in reports:
        assert set(r["init_scores"]) == set(BEST_INIT_CANDIDATES)
        assert r["init_scores"][r["init"]] == min(r["init_scores"].values())


def _moe_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".mlp." in k}


def test_drift_correction_changes_only_layers_above_a_converted_one():
    """Layer 0 sees the dense model's own stream, so its drift is zero and its fit is unchanged;
    layer 1 sees the converted layer 0's output, and its target moves.  A layer left dense below
    the converted ones adds no drift either."""
    from moefy.convert import layerwise_stage
    from tiny_models import tiny_model

    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    fitted = {}
    for alpha in (0.0, 1.0):
        model = tiny_model("llama")
        layerwise_stage(model, calib, ConvertConfig(n_experts=4, top_k=2, steps=2, eval_every=1, drift_correction=alpha))
        fitted[alpha] = _moe_state(model)
    layer0 = [k for k in fitted[0.0] if k.startswith("model.layers.0.")]
    layer1 = [k for k in fitted[0.0] if k.startswith("model.layers.1.") and k.endswith("down_proj.weight")]
    assert layer0 and layer1
    assert all(torch.equal(fitted[0.0][k], fitted[1.0][k]) for k in layer0)
    assert not all(torch.equal(fitted[0.0][k], fitted[1.0][k]) for k in layer1)

    only_top = {}
    for alpha in (0.0, 1.0):
        model = tiny_model("llama")
        layerwise_stage(model, calib, ConvertConfig(n_experts=4, top_k=2, steps=2, eval_every=1, layers=[1], drift_correction=alpha))
        only_top[alpha] = _moe_state(model)
    assert all(torch.equal(only_top[0.0][k], only_top[1.0][k]) for k in only_top[0.0])


def test_drift_correction_refuses_a_post_ffn_norm_and_bad_values():
    from moefy.config import ConfigError
    from moefy.convert import layerwise_stage
    from tiny_models import tiny_model

    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="post-FFN norm"):
        layerwise_stage(tiny_model("gemma2"), calib, ConvertConfig(n_experts=4, top_k=2, steps=1, drift_correction=0.5))
    for bad in (-0.1, 1.5, "all", True):
        with pytest.raises(ConfigError, match="drift-correction"):
            ConvertConfig(drift_correction=bad).validate(64)


def test_drift_correction_resumes_from_restored_layers_in_memory():
    """A resumed in-memory run (layer 0 restored) fits layer 1 exactly as the uninterrupted run."""
    from moefy.convert import layerwise_stage
    from tiny_models import tiny_model

    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = ConvertConfig(n_experts=4, top_k=2, steps=2, eval_every=1, drift_correction=1.0)
    ref = tiny_model("llama")
    layerwise_stage(ref, calib, cfg)
    resumed = tiny_model("llama")
    layerwise_stage(resumed, calib, cfg, restored={0: ref.model.layers[0].mlp})
    a, b = _moe_state(ref), _moe_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_drift_correction_default_is_on_for_shared_layouts_where_the_architecture_allows_it(tmp_path):
    from moefy.adapters import get_adapter
    from moefy.config import DEFAULT_DRIFT_CORRECTION
    from moefy.convert import drift_correction_for, layerwise_stage
    from tiny_models import tiny_model

    llama, gemma2 = tiny_model("llama"), tiny_model("gemma2")
    shared = ConvertConfig(n_experts=4, top_k=2, n_shared=8, steps=1)
    assert drift_correction_for(shared, get_adapter(llama.config)) == DEFAULT_DRIFT_CORRECTION > 0
    assert drift_correction_for(ConvertConfig(), get_adapter(llama.config)) == 0.0  # no shared neurons
    assert drift_correction_for(shared, get_adapter(gemma2.config)) == 0.0
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    layerwise_stage(gemma2, calib, shared)  # the default converts Gemma 2


def test_drift_correction_spilled_to_disk_is_bit_identical(tmp_path):
    """Both streams spilled (the dense one beside the first) give the in-memory result; the files go."""
    from moefy.convert import layerwise_stage
    from tiny_models import tiny_model

    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = ConvertConfig(n_experts=4, top_k=2, n_shared=8, steps=2, eval_every=1, drift_correction=0.5)
    mem, spilled = tiny_model("llama"), tiny_model("llama")
    layerwise_stage(mem, calib, cfg, batch=3)
    layerwise_stage(spilled, calib, cfg, batch=3, spill_path=tmp_path / "activations.bin")
    a, b = _moe_state(mem), _moe_state(spilled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.iterdir())


def _lstsq_error(h, y, keep):
    w = torch.linalg.lstsq(h[:, keep].double(), y.double()).solution
    return float((h[:, keep].double() @ w - y.double()).pow(2).sum() / y.double().pow(2).sum())


def test_obs_order_is_a_permutation_that_sees_redundant_neurons():
    """Two copies of the strongest neuron: importance keeps both, OBS keeps one and the neuron
    the copy cannot stand in for, so its kept set fits the target exactly."""
    from moefy.splits import obs_order, pruning_importance

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(400, 1, generator=g) for _ in range(3))
    h = torch.cat([3 * a, 3 * a, b, 0.1 * c], dim=1)  # neurons 0 and 1 are the same
    down = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    y = h @ down.T
    order = obs_order(h.T @ h, h.T @ y, block=1)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    kept = order[:3].tolist()
    assert 2 in kept and not {0, 1} <= set(kept[:2])
    ffn = FFNWeights(torch.zeros(4, 1), torch.zeros(4, 1), down)
    by_importance = pruning_importance(h, ffn).topk(2).indices
    assert set(by_importance.tolist()) == {0, 1}
    assert _lstsq_error(h, y, order[:2]) < 0.01 < _lstsq_error(h, y, by_importance)


def test_obs_prefixes_fit_no_worse_than_importance_on_random_layers():
    from moefy.splits import obs_order, pruning_importance

    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=g)
    ffn = _ffn(n=48, d=16, seed=3)
    h = torch.nn.functional.silu(x @ ffn.gate.T) * (x @ ffn.up.T)
    y = h @ ffn.down.T
    order = obs_order(h.T @ h, h.T @ y)
    imp = pruning_importance(h, ffn)
    for keep in (6, 12, 24):
        assert _lstsq_error(h, y, order[:keep]) <= _lstsq_error(h, y, imp.topk(keep).indices) + 1e-9


@pytest.mark.parametrize("method", ["dot", "prune"])
def test_shared_by_obs_takes_the_order_given(method):
    from moefy.convert import active_fraction

    ffn = _ffn()
    h = torch.randn(300, 172, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(172, generator=torch.Generator().manual_seed(2))
    cfg = ConvertConfig(method=method, n_experts=8, top_k=2, n_shared=12, shared_by="obs")
    split = initial_split(method, cfg.init, ffn, h, cfg, seed=5, order=order)
    n = 12 if method == "dot" else round(active_fraction(cfg, 172) * 172)
    assert split.shared.tolist() == sorted(order[:n].tolist())
    with pytest.raises(ValueError, match="OBS order"):
        initial_split(method, cfg.init, ffn, h, cfg, seed=5)
