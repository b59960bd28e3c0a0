"""moefy convert --active (the measured-best layout for an active FFN fraction) and --recipe."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moefy.config import ConvertConfig, load_convert_recipe
from moefy.errors import ConfigError, TooFewExpertsError, TooManyExpertsError, TopKTooLargeError
from moefy.layouts import EXPERT_SIZE, MEASURED, SHARED_BY, Layout, layout_for

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = [0.01, 0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 0.9, 0.99]
RUNNER_RESOLVES = "resolve_layout" in (ROOT / "src" / "moefy" / "runner.py").read_text()


def token_extremes(lay: Layout, d_ffn: int) -> tuple[int, int]:
    """Fewest and most neurons a token runs: shared + its k smallest / largest experts, with the
    expert sizes as the converter makes them (balanced, differing by at most one)."""
    q, r = divmod(d_ffn - lay.n_shared, lay.n_experts)
    sizes = sorted([q + 1] * r + [q] * (lay.n_experts - r))
    assert sum(sizes) == d_ffn - lay.n_shared and sizes[-1] - sizes[0] <= 1
    return lay.n_shared + sum(sizes[: lay.top_k]), lay.n_shared + sum(sizes[-lay.top_k :])


def assert_valid(lay: Layout, d_ffn: int) -> None:
    assert lay.n_experts >= 2 and 1 <= lay.top_k <= lay.n_experts, lay
    assert lay.n_shared >= 0 and lay.n_experts + lay.n_shared <= d_ffn, lay
    assert lay.shared_by == SHARED_BY == "obs"


# ------------------------------------------------------------------------------- the rule
def test_measured_smollm2_layouts_are_reproduced():
    assert layout_for(0.25, 1536) == Layout(26, 2, 288, SHARED_BY)
    assert layout_for(0.5, 1536) == Layout(20, 4, 576, SHARED_BY)
    for (f, d), lay in MEASURED.items():
        assert layout_for(f, d) == Layout(*lay)
    for f in (0.25, 0.5):  # experts of exactly 48 neurons, every token exactly f * d_ffn
        lay = layout_for(f, 1536)
        assert lay.expert_sizes(1536) == [EXPERT_SIZE] * lay.n_experts
        assert token_extremes(lay, 1536) == (int(f * 1536), int(f * 1536))


@pytest.mark.parametrize(
    "d_ffn, fraction",
    [(d, f) for d in (72, 172) for f in FRACTIONS] + [(1536, f) for f in FRACTIONS if f != 0.4],
)
def test_every_token_runs_the_requested_fraction_within_one_neuron(d_ffn, fraction):
    """The tiny test models (72, stories260K's 172) and SmolLM2's 1536: every token of a layer runs
    the requested fraction within one neuron (1536 at 0.4: see the next test)."""
    lay = layout_for(fraction, d_ffn)
    assert_valid(lay, d_ffn)
    lo, hi = token_extremes(lay, d_ffn)
    assert abs(lo - fraction * d_ffn) <= 1 + 1e-9 and abs(hi - fraction * d_ffn) <= 1 + 1e-9, (lay, lo, hi)
    assert (lo, hi) == lay.active_range(d_ffn)


def test_when_no_near_layout_keeps_every_token_within_one_the_mean_is():
    """1536 at 0.4 (614.4 neurons): no layout with the shared count within one expert (48) of
    round(0.75 * 614.4) = 461 and experts of 32-72 neurons gives every token 614.4 +- 1 (checked
    exhaustively), so the mean is within one neuron and a token's count within top_k of it."""
    d, f = 1536, 0.4
    target, s0 = f * d, 461
    for e in range(14, 34):
        for k in range(1, e):
            for s in range(s0 - 48, s0 + 49):
                if 32 <= (d - s) / e <= 72:
                    lo, hi = token_extremes(Layout(e, k, s), d)
                    assert not (abs(lo - target) <= 1 and abs(hi - target) <= 1), (e, k, s)
    lay = layout_for(f, d)
    assert_valid(lay, d)
    assert abs(lay.mean_active(d) - target) <= 1 and abs(lay.n_shared - s0) <= 48
    lo, hi = token_extremes(lay, d)
    assert lo <= lay.mean_active(d) <= hi and hi - lo <= lay.top_k and 40 <= (d - lay.n_shared) / lay.n_experts <= 56


def test_any_width_mean_within_one_neuron_and_expert_size_scaled():
    widths = list(range(2, 260)) + [576, 2048, 2560, 3072, 4864, 5632, 8192, 8960, 11008, 13824, 14336, 18944]
    for d in widths:
        for f in FRACTIONS:
            lay = layout_for(f, d)
            assert_valid(lay, d)
            assert abs(lay.mean_active(d) - f * d) <= 1 + 1e-9, (d, f, lay)
            lo, hi = lay.active_range(d)
            assert lo <= lay.mean_active(d) <= hi and hi - lo <= lay.top_k
    for d in (2048, 2560, 4864, 8192, 11008, 14336, 18944):  # large FFNs keep experts near 48 neurons
        for f in (0.125, 0.25, 0.5, 0.75):
            lay = layout_for(f, d)
            assert 30 <= (d - lay.n_shared) / lay.n_experts <= 75, (d, f, lay)
            assert abs(lay.n_shared - 0.75 * f * d) <= 48, (d, f, lay)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.25, True])
def test_fraction_outside_zero_one_is_refused(bad):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        layout_for(bad, 1536)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        ConvertConfig(active=bad).validate()


# ------------------------------------------------------------------ ConvertConfig.resolve_layout
def test_resolve_layout_fills_what_active_picks_and_keeps_explicit_fields():
    cfg = ConvertConfig(active=0.25)
    cfg.validate()
    got = cfg.resolve_layout(1536)
    assert (got.n_experts, got.top_k, got.n_shared, got.shared_by) == (26, 2, 288, SHARED_BY)
    assert got.active == 0.25 and cfg.n_experts == 8  # a new config; the original is unchanged
    got.validate(1536)
    assert got.resolve_layout(1536) == got  # idempotent
    mixed = ConvertConfig(active=0.5, top_k=2, shared_by="rate", explicit_layout=["top_k", "shared_by"]).resolve_layout(1536)
    assert (mixed.n_experts, mixed.top_k, mixed.n_shared, mixed.shared_by) == (20, 2, 576, "rate")
    over = ConvertConfig(active=0.5, n_experts=10).resolve_layout(1536, overrides=["n_experts"])
    assert (over.n_experts, over.top_k, over.n_shared) == (10, 4, 576) and over.explicit_layout == ["n_experts"]
    plain = ConvertConfig()
    assert plain.resolve_layout(1536) is plain  # no --active: nothing changes
    with pytest.raises(ConfigError, match="not a layout field"):
        ConvertConfig(active=0.5).resolve_layout(1536, overrides=["seed"])


def test_validate_before_the_layout_is_known_checks_only_what_was_given():
    ConvertConfig(active=0.25, top_k=12, explicit_layout=["top_k"]).validate()  # E not known yet: fine
    with pytest.raises(TopKTooLargeError):
        ConvertConfig(active=0.25, n_experts=4, top_k=6, explicit_layout=["n_experts", "top_k"]).validate()
    with pytest.raises(TooFewExpertsError):
        ConvertConfig(active=0.25, n_experts=1, explicit_layout=["n_experts"]).validate()
    with pytest.raises(TooManyExpertsError):  # still checked once d_ffn is known
        ConvertConfig(active=0.25, n_experts=80, explicit_layout=["n_experts"]).resolve_layout(72).validate(72)


# ------------------------------------------------------------------ the CLI's flags and recipes
class _Captured(Exception):
    pass


def _cli_config(monkeypatch, args: list[str]) -> tuple[dict, ConvertConfig]:
    """The job and ConvertConfig ``moefy convert ARGS`` hands to run_convert (which is not run)."""
    import moefy.runner
    from moefy.cli import main

    seen: dict = {}

    def fake(model, out, cfg, calib_files=None, overwrite=False, log=print, progress=None, train_files=None, **job):
        seen.update(model=model, out=Path(out), calib=calib_files, overwrite=overwrite, train=train_files, cfg=cfg, job=job)
        raise _Captured

    monkeypatch.setattr(moefy.runner, "run_convert", fake)
    with pytest.raises(_Captured):
        main(args)
    return seen, seen["cfg"]


def test_cli_defaults_unchanged_without_active(monkeypatch, tmp_path):
    _, cfg = _cli_config(monkeypatch, ["convert", "m", "--out", str(tmp_path / "o")])
    assert cfg == ConvertConfig()
    assert (cfg.n_experts, cfg.top_k, cfg.n_shared, cfg.shared_by, cfg.active) == (8, 2, 0, "rate", None)
    _, cfg = _cli_config(monkeypatch, ["convert", "m", "--out", str(tmp_path / "o"), "-E", "6", "-k", "3", "--shared", "4"])
    assert (cfg.n_experts, cfg.top_k, cfg.n_shared, cfg.explicit_layout) == (6, 3, 4, [])


def test_cli_active_and_explicit_overrides(monkeypatch, tmp_path):
    _, cfg = _cli_config(monkeypatch, ["convert", "m", "--out", str(tmp_path / "o"), "--active", "0.25"])
    assert cfg.active == 0.25 and cfg.explicit_layout == []
    assert cfg.resolve_layout(1536) == ConvertConfig(active=0.25, n_experts=26, top_k=2, n_shared=288, shared_by=SHARED_BY)
    _, cfg = _cli_config(monkeypatch, ["convert", "m", "--out", str(tmp_path / "o"), "--active", "0.5", "--top-k", "2",
                                       "--shared-by", "rate"])
    assert cfg.explicit_layout == ["top_k", "shared_by"]
    got = cfg.resolve_layout(1536)
    assert (got.n_experts, got.top_k, got.n_shared, got.shared_by) == (20, 2, 576, "rate")


def test_recipe_fields_and_command_line_override(monkeypatch, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("model: some/model\nout: outdir\ncalib: a.txt\nn_experts: 26\ntop_k: 2\nn_shared: 288\n"
                 "shared_by: importance\ncalib_tokens: 16384\nseq-len: 512\nlr_router: 0.002\n")
    job, cfg = _cli_config(monkeypatch, ["convert", "--recipe", str(r)])
    assert job["model"] == "some/model" and job["out"] == Path("outdir") and job["calib"] == ["a.txt"]
    assert cfg == ConvertConfig(n_experts=26, top_k=2, n_shared=288, shared_by="importance", calib_tokens=16384,
                                seq_len=512, lr_router=0.002)
    job, cfg = _cli_config(monkeypatch, ["convert", "other", "--recipe", str(r), "--out", str(tmp_path / "o"),
                                         "--calib", "b.txt", "--top-k", "3", "--seq-len", "256"])
    assert job["model"] == "other" and job["out"] == tmp_path / "o" and job["calib"] == ["b.txt"]
    assert (cfg.n_experts, cfg.top_k, cfg.seq_len, cfg.calib_tokens) == (26, 3, 256, 16384)
    # --active on the command line picks the layout instead of the recipe's
    _, cfg = _cli_config(monkeypatch, ["convert", "--recipe", str(r), "--active", "0.5"])
    assert cfg.explicit_layout == [] and cfg.resolve_layout(1536).n_experts == 20
    # a recipe's active: its own layout fields and the command line's override the choice
    r2 = tmp_path / "r2.yaml"
    r2.write_text("model: m\nout: o\nactive: 0.5\nn_shared: 100\n")
    _, cfg = _cli_config(monkeypatch, ["convert", "--recipe", str(r2), "-E", "12"])
    assert cfg.active == 0.5 and cfg.explicit_layout == ["n_experts", "n_shared"]


def test_shipped_recipes_are_the_measured_layouts():
    for name, frac in (("convert-smollm2-25.yaml", 0.25), ("convert-smollm2-50.yaml", 0.5)):
        rec = load_convert_recipe(ROOT / "recipes" / name)
        assert rec.model == "smollm2-135m" and rec.calib == ["../shared/data/wikitext2/wiki.valid.tokens"]
        cfg = ConvertConfig(**rec.config)
        cfg.validate(1536)
        lay = layout_for(frac, 1536)
        # the recipes record the measured conversions (shared neurons by importance, before 6.13)
        assert (cfg.n_experts, cfg.top_k, cfg.n_shared, cfg.shared_by) == (lay.n_experts, lay.top_k, lay.n_shared, "importance")
        assert (cfg.calib_tokens, cfg.seq_len) == (16384, 512)
        assert cfg.drift_correction == 0.5  # what the default gives these shared layouts, written out


def test_cli_drift_correction_flag_and_recipe_key(monkeypatch, tmp_path):
    _, cfg = _cli_config(monkeypatch, ["convert", "m", "--out", str(tmp_path / "o")])
    assert cfg.drift_correction is None  # chosen per layout and architecture when the run starts
    _, cfg = _cli_config(monkeypatch, ["convert", "m", "--out", str(tmp_path / "o"), "--drift-correction", "0.3"])
    assert cfg.drift_correction == 0.3
    r = tmp_path / "r.yaml"
    r.write_text("model: m\nout: o\ndrift_correction: 1\n")
    _, cfg = _cli_config(monkeypatch, ["convert", "--recipe", str(r)])
    assert cfg.drift_correction == 1
    _, cfg = _cli_config(monkeypatch, ["convert", "--recipe", str(r), "--drift-correction", "0"])
    assert cfg.drift_correction == 0


@pytest.mark.parametrize(
    "text, msg",
    [
        ("model: m\nexperts: 4\n", "unknown key(s) experts"),
        ("model: m\nbogus: 1\nalso_bad: 2\n", "unknown key(s) also_bad, bogus"),
        ("model: m\nexplicit_layout: [n_experts]\n", "unknown key(s) explicit_layout"),
        ("- a\n- b\n", "must be a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
        ("model: m\nn_experts: four\n", "n_experts has the wrong type"),
        ("model: m\ncalib: 3\n", "calib must be a source or a list of sources"),
    ],
)
def test_bad_recipe_is_one_line_config_error(tmp_path, capsys, text, msg):
    from moefy.cli import main

    r = tmp_path / "r.yaml"
    r.write_text(text)
    with pytest.raises(ConfigError, match=r".*") as exc:
        load_convert_recipe(r)
    assert msg in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(SystemExit) as ex:
        main(["convert", "--recipe", str(r), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert ex.value.code == ConfigError.exit_code and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err  # one line (rich may wrap a long one)
    assert not (tmp_path / "o").exists()


def test_missing_recipe_and_missing_model(tmp_path, capsys):
    from moefy.cli import main

    for args, msg in ((["convert", "--recipe", str(tmp_path / "nope.yaml")], "recipe not found"),
                      (["convert", "--out", str(tmp_path / "o")], "no model"),
                      (["convert", "m"], "no output")):
        with pytest.raises(SystemExit) as ex:
            main(args)
        assert ex.value.code == ConfigError.exit_code and msg in capsys.readouterr().err


# ------------------------------------------------------------- end to end on a tiny checkpoint
WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random llama (d_ffn 72) with a word-level tokenizer, saved as a local HF directory,
    and a calibration text of its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tiny_model("llama").save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    text = root / "calib.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(60)) + "\n")
    return root / "model", text


def _run_cli(args: list[str]) -> None:
    from moefy.cli import main

    try:
        main(args)
    except SystemExit as e:
        assert not e.code, e.code


def test_recipe_reproduces_the_flags_checkpoint_bitwise(tiny_dir, tmp_path):
    model, calib = tiny_dir
    flags = ["--experts", "4", "--top-k", "2", "--shared", "8", "--shared-by", "importance", "--calib-tokens", "256",
             "--seq-len", "32", "--steps", "2", "--seed", "1"]
    _run_cli(["convert", str(model), "--out", str(tmp_path / "flags"), "--calib", str(calib), *flags])
    recipe = tmp_path / "convert.yaml"
    recipe.write_text(
        f"model: {model}\nout: {tmp_path / 'recipe'}\ncalib: [{calib}]\n"
        "n_experts: 4\ntop_k: 2\nn_shared: 8\nshared_by: importance\ncalib_tokens: 256\nseq_len: 32\nsteps: 2\nseed: 1\n"
    )
    _run_cli(["convert", "--recipe", str(recipe)])
    a = load_file(str(tmp_path / "flags" / "model.safetensors"))
    b = load_file(str(tmp_path / "recipe" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # a flag overrides the recipe: another seed, another checkpoint (its out given on the command line)
    _run_cli(["convert", "--recipe", str(recipe), "--out", str(tmp_path / "seed2"), "--seed", "2", "--method", "random"])
    c = load_file(str(tmp_path / "seed2" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.skipif(not RUNNER_RESOLVES, reason="run_convert does not call cfg.resolve_layout(d_ffn) yet "
                    "(src/moefy/runner.py is edited separately; see the --active report)")
def test_run_convert_with_active_measures_the_requested_fraction(tiny_dir, tmp_path):
    import json

    from moefy.runner import run_convert

    model, calib = tiny_dir
    for frac in (0.25, 0.5):
        cfg = ConvertConfig(active=frac, calib_tokens=256, seq_len=32, steps=2, seed=0)
        res = run_convert(str(model), tmp_path / f"a{frac}", cfg, [str(calib)], log=lambda *_: None)
        lay = layout_for(frac, 72)
        rec = json.loads((res.out / "moefy.json").read_text())
        assert (rec["n_experts"], rec["top_k"], rec["n_shared"]) == (lay.n_experts, lay.top_k, lay.n_shared)
        assert rec["config"]["active"] == frac and rec["config"]["shared_by"] == SHARED_BY
        assert abs(rec["active_fraction"] * 72 - frac * 72) <= 1 + 1e-9
        for layer in rec["layers"]:  # every token of every layer: shared + its k experts
            sizes = sorted(layer["expert_sizes"])
            lo = layer["n_shared"] + sum(sizes[: layer["top_k"]])
            hi = layer["n_shared"] + sum(sizes[-layer["top_k"]:])
            assert abs(lo - frac * 72) <= 1 and abs(hi - frac * 72) <= 1, layer
