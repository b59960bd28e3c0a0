"""--allocate kl: shared neurons spread over the layers by measured held-out KL (moefy.allocation)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moefy.allocation import LayerCurve, active_neurons, allocate
from moefy.config import ConvertConfig
from moefy.errors import ConfigError, TooManyExpertsError
from test_layouts import _run_cli, tiny_dir  # noqa: F401  (the tiny HF model fixture)

FLAGS = ["--experts", "4", "--top-k", "2", "--shared", "8", "--shared-by", "importance", "--calib-tokens", "256",
         "--seq-len", "32", "--steps", "2", "--seed", "1"]


def test_curve_is_log_linear_between_measured_counts_and_clamped_outside():
    c = LayerCurve(0, [0, 10, 30], [1.0, 0.25, 0.01])
    assert c.at(0) == pytest.approx(1.0) and c.at(10) == pytest.approx(0.25) and c.at(30) == pytest.approx(0.01)
    assert c.at(5) == pytest.approx(0.5) and c.at(20) == pytest.approx(0.05)  # log-linear: geometric means
    assert c.at(-3) == pytest.approx(1.0) and c.at(99) == pytest.approx(0.01)


def test_allocate_keeps_the_total_and_the_bounds_and_feeds_the_steepest_layer():
    flat = LayerCurve(0, [0, 8, 16, 64], [0.10, 0.09, 0.08, 0.0])
    steep = LayerCurve(1, [0, 8, 16, 64], [1.0, 0.5, 0.3, 0.0])
    middle = LayerCurve(2, [0, 8, 16, 64], [0.4, 0.3, 0.2, 0.0])
    alloc = allocate([flat, steep, middle], n_shared=8, top=60)
    assert sum(alloc.values()) == 24 and all(0 <= v <= 60 for v in alloc.values())
    assert alloc[1] > alloc[2] > alloc[0]
    assert allocate([flat, steep, middle], n_shared=8, top=60) == alloc  # deterministic
    # equal curves: equal shares (ties go to the layer holding fewer)
    same = [LayerCurve(i, [0, 32], [1.0, 0.0]) for i in range(3)]
    assert allocate(same, n_shared=8, top=32) == {0: 8, 1: 8, 2: 8}
    # never more than a layer can hold, whatever its curve
    greedy = [LayerCurve(0, [0, 10], [9.0, 8.0]), LayerCurve(1, [0, 10], [0.1, 0.09])]
    assert allocate(greedy, n_shared=6, top=10) == {0: 10, 1: 2}


def _record(out) -> dict:
    return json.loads((out / "moefy.json").read_text())


def test_convert_allocate_kl_spreads_the_shared_neurons_and_a_recipe_reproduces_it(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    model, calib = tiny_dir
    _run_cli(["convert", str(model), "--out", str(tmp_path / "kl"), "--calib", str(calib), *FLAGS, "--allocate", "kl"])
    rec = _record(tmp_path / "kl")
    per = rec["config"]["shared_per_layer"]
    n_layers = len(rec["layers"])
    assert len(per) == n_layers and sum(per) == 8 * n_layers  # the uniform layout's mean, exactly
    assert [layer["n_shared"] for layer in rec["layers"]] == per  # what each layer holds
    assert rec["config"]["allocate"] == "kl"
    curves = rec["allocation"]["curves"]
    assert [c["layer"] for c in curves] == list(range(n_layers))
    assert all(len(c["shared"]) == len(c["kl"]) >= 3 and c["shared"] == sorted(c["shared"]) for c in curves)
    assert all(k >= 0 for c in curves for k in c["kl"])
    # every layer keeps E and k; the model's mean active count is the uniform layout's
    d_ffn = 72  # the tiny model's
    assert all(len(layer["expert_sizes"]) == 4 and layer["n_shared"] + sum(layer["expert_sizes"]) == d_ffn for layer in rec["layers"])
    mean_active = sum(active_neurons(s, d_ffn, 4, 2) for s in per) / n_layers
    assert mean_active == pytest.approx(active_neurons(8, d_ffn, 4, 2))

    # a recipe that records the counts converts to the same checkpoint without measuring again
    import moefy.allocation

    def refuse(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(moefy.allocation, "measure", refuse)
    recipe = tmp_path / "convert.yaml"
    recipe.write_text(
        f"model: {model}\nout: {tmp_path / 'recipe'}\ncalib: [{calib}]\n"
        "n_experts: 4\ntop_k: 2\nn_shared: 8\nshared_by: importance\ncalib_tokens: 256\nseq_len: 32\nsteps: 2\nseed: 1\n"
        f"allocate: kl\nshared_per_layer: {per}\n"
    )
    _run_cli(["convert", "--recipe", str(recipe)])
    a = load_file(str(tmp_path / "kl" / "model.safetensors"))
    b = load_file(str(tmp_path / "recipe" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_measurement_uses_at_most_allocate_tokens_of_the_calibration(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    import moefy.allocation

    model, calib = tiny_dir
    seen: list[tuple[int, int]] = []
    real = moefy.allocation.measure

    def spy(model_, calib_ids, *a, **k):
        seen.append(tuple(calib_ids.shape))
        return real(model_, calib_ids, *a, **k)

    monkeypatch.setattr(moefy.allocation, "measure", spy)
    args = list(FLAGS)
    args[args.index("--calib-tokens") + 1] = "512"
    _run_cli(["convert", str(model), "--out", str(tmp_path / "kl"), "--calib", str(calib), *args, "--allocate", "kl",
              "--allocate-tokens", "256"])
    assert seen == [(256 // 32, 32)]  # the first 256 of the 512 calibration tokens
    rec = _record(tmp_path / "kl")
    assert rec["config"]["allocate_tokens"] == 256 and rec["config"]["calib_tokens"] == 512
    assert sum(rec["config"]["shared_per_layer"]) == 8 * len(rec["layers"])


def test_allocate_errors_are_one_line(tiny_dir, tmp_path):  # noqa: F811
    from moefy.runner import run_convert

    model, calib = tiny_dir
    with pytest.raises(ConfigError, match="has none"):
        ConvertConfig(allocate="kl").validate()
    ConvertConfig(active=0.25, allocate="kl").validate()  # --active chooses the shared neurons later
    with pytest.raises(ConfigError, match="unknown --allocate"):
        ConvertConfig(n_shared=8, allocate="owl").validate()
    with pytest.raises(ConfigError, match="prune"):
        ConvertConfig(n_shared=8, allocate="kl", method="prune").validate()
    base = ConvertConfig(n_experts=4, top_k=2, n_shared=8, shared_by="importance", calib_tokens=256, seq_len=32, steps=2)
    with pytest.raises(ConfigError, match="--onload is not possible here: --allocate kl"):
        run_convert(str(model), tmp_path / "a", ConvertConfig(**{**base.to_dict(), "allocate": "kl"}), [str(calib)], onload=True, log=lambda m: None)
    with pytest.raises(ConfigError, match="shared_per_layer has 1 counts"):
        run_convert(str(model), tmp_path / "b", ConvertConfig(**{**base.to_dict(), "shared_per_layer": [8]}), [str(calib)], log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before any work dir or output
    with pytest.raises(ConfigError, match="--allocate-tokens 16 is less than one sequence"):
        ConvertConfig(**{**base.to_dict(), "allocate": "kl", "allocate_tokens": 16}).validate()
    with pytest.raises(TooManyExpertsError, match="exceeds the FFN width"):
        ConvertConfig(**{**base.to_dict(), "shared_per_layer": [8, 10_000]}).validate(72)


def test_shipped_allocated_recipe_keeps_the_25_percent_layout_on_average():
    from conftest import ROOT
    from moefy.config import load_convert_recipe
    from moefy.layouts import layout_for

    rec = load_convert_recipe(ROOT / "recipes" / "convert-smollm2-25-allocated.yaml")
    cfg = ConvertConfig(**rec.config)
    cfg.validate(1536)
    lay = layout_for(0.25, 1536)
    assert (cfg.n_experts, cfg.top_k, cfg.n_shared, cfg.shared_by) == (lay.n_experts, lay.top_k, lay.n_shared, "importance")
    assert cfg.allocate == "kl" and len(cfg.shared_per_layer) == 30 and sum(cfg.shared_per_layer) == 30 * cfg.n_shared


@pytest.mark.parametrize("recipe", ["convert-smollm2-50-allocated.yaml", "convert-smollm2-50-fine.yaml"])
def test_shipped_50_percent_allocated_recipes_run_half_the_ffn_on_average(recipe):
    """recipes/convert-smollm2-50-allocated.yaml and -fine.yaml (docs/BENCHMARKS.md 6.13): 16 of 80
    (64 of 320) experts, the shared neurons by OBS, per-layer counts that keep the model at 50%
    active on average, and every layer able to hold its experts."""
    from conftest import ROOT
    from moefy.config import load_convert_recipe
    from moefy.convert import active_fraction

    rec = load_convert_recipe(ROOT / "recipes" / recipe)
    cfg = ConvertConfig(**rec.config)
    cfg.validate(1536)
    assert rec.model == "smollm2-135m" and cfg.shared_by == "obs" and cfg.allocate == "kl"
    assert len(cfg.shared_per_layer) == 30 and sum(cfg.shared_per_layer) == 30 * cfg.n_shared
    fractions = [active_fraction(cfg.for_layer(i), 1536) for i in range(30)]
    assert abs(sum(fractions) / 30 - 0.5) < 1e-9
    assert all(cfg.n_experts <= 1536 - s for s in cfg.shared_per_layer)  # every layer can hold its experts


def test_shared_by_obs_orders_every_layer_for_the_measurement_and_the_conversion(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    """--shared-by obs: the KL curves are measured on the OBS order the conversion then picks its
    shared block from (one order per layer for each), and the record says so."""
    import moefy.allocation
    import moefy.convert

    calls: list[str] = []
    real = moefy.convert.neuron_order

    def spy(where):
        def wrapped(*a, **k):
            calls.append(where)
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(moefy.allocation, "neuron_order", spy("measure"))
    monkeypatch.setattr(moefy.convert, "neuron_order", spy("convert"))
    model, calib = tiny_dir
    flags = [f if f != "importance" else "obs" for f in FLAGS]
    _run_cli(["convert", str(model), "--out", str(tmp_path / "obs"), "--calib", str(calib), *flags, "--allocate", "kl"])
    rec = _record(tmp_path / "obs")
    n_layers = len(rec["layers"])
    assert rec["config"]["shared_by"] == "obs"
    with_shared = sum(1 for s in rec["config"]["shared_per_layer"] if s > 0)  # a layer with none needs no order
    assert calls == ["measure"] * n_layers + ["convert"] * with_shared and with_shared >= 1
    assert sum(rec["config"]["shared_per_layer"]) == 8 * n_layers
    # prune by the OBS order: one order per layer, the kept count as prune's
    calls.clear()
    _run_cli(["convert", str(model), "--out", str(tmp_path / "prune"), "--calib", str(calib), "--method", "prune", *flags])
    rec = _record(tmp_path / "prune")
    assert calls == ["convert"] * n_layers
    assert all(layer["n_shared"] == rec["layers"][0]["n_shared"] > 0 for layer in rec["layers"])
