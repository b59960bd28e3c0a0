"""export_model(gating=...) exports with another gating but never changes the caller's model
(issue 15.4: it used to set the gating in place, so the caller's model computed another function
afterwards, and the test of the override compared the export with the already-changed model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moefy.errors import ConfigError, ExportRefusedError
from moefy.serving_export import export_model, moe_layers
from tiny_moefy import calib_ids, tiny_moefy

IDS = calib_ids(n=2, seq=40, seed=11)


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_logits(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert a.shape == b.shape
    bound = tol * max(1.0, float(b.abs().max()))
    assert (a - b).abs().max() <= bound, (float((a - b).abs().max()), bound)


def snapshot(model) -> tuple[torch.Tensor, str, list, dict[str, torch.Tensor]]:
    """Everything export_model must leave as it was: logits, gatings and every tensor."""
    gatings = [None if mlp is None else mlp.gating for mlp in moe_layers(model)]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return logits(model), model.config.gating, gatings, state


def assert_unchanged(model, before) -> None:
    out, gating, gatings, state = before
    assert model.config.gating == gating
    assert [None if mlp is None else mlp.gating for mlp in moe_layers(model)] == gatings
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert torch.equal(logits(model), out)  # bit for bit: the same function as before the export


def test_mixtral_export_with_another_gating_leaves_the_caller_unchanged(tmp_path):
    moe = tiny_moefy(gating="mask")
    before = snapshot(moe)
    export_model(moe, "mixtral", tmp_path / "m", gating="softmax-renorm")
    assert_unchanged(moe, before)
    assert moe.config.gating == "mask"
    mix = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    # the export is the model *with* softmax-renorm gating (a separate copy of the same weights) ...
    assert_same_logits(logits(mix), logits(tiny_moefy(gating="softmax-renorm")))
    # ... which is another function than the caller's mask-gated model
    assert (logits(mix) - before[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "fmt, kwargs, gating, name",
    [
        ("hf", {}, "softmax-renorm", "hf"),
        ("mixtral", {}, "softmax-renorm", "mix"),
        ("qwen2-moe", {}, "softmax", "qwen"),
        ("gguf", {}, "softmax-renorm", "m.gguf"),
        ("gguf", {"top_k": 1}, "softmax-renorm", "k1.gguf"),
    ],
)
def test_no_format_changes_the_caller(tmp_path, fmt, kwargs, gating, name):
    moe = tiny_moefy(gating="mask", **kwargs)
    before = snapshot(moe)
    export_model(moe, fmt, tmp_path / name, gating=gating)
    assert_unchanged(moe, before)


def test_hf_export_carries_the_new_gating_the_caller_keeps_its_own(tmp_path):
    moe = tiny_moefy(gating="mask")
    before = snapshot(moe)
    export_model(moe, "hf", tmp_path / "hf", gating="softmax-renorm")
    assert_unchanged(moe, before)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.gating == "softmax-renorm"
    assert_same_logits(logits(reloaded), logits(tiny_moefy(gating="softmax-renorm")))


def test_refused_or_bad_export_leaves_the_caller_unchanged(tmp_path):
    moe = tiny_moefy(gating="mask")
    before = snapshot(moe)
    with pytest.raises(ExportRefusedError):  # Mixtral cannot weight top-2 experts by a plain softmax
        export_model(moe, "mixtral", tmp_path / "m", gating="softmax")
    assert_unchanged(moe, before)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ConfigError, match="unknown gating"):
        export_model(moe, "mixtral", tmp_path / "m", gating="bogus")
    assert_unchanged(moe, before)


def test_export_without_gating_is_the_model_as_it_is(tmp_path):
    moe = tiny_moefy(gating="softmax-renorm")
    before = snapshot(moe)
    path = export_model(moe, "mixtral", tmp_path / "m")
    assert Path(path).is_dir()
    assert_unchanged(moe, before)
    assert_same_logits(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()), before[0])
