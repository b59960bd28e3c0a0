"""LapSum routing through the whole pipeline: budgets, calibrated truncation, exported variable-k."""

import json

import pytest
import torch

from conftest import STORIES, TINYSTORIES, needs_shared

pytestmark = needs_shared()


@pytest.fixture(scope="module")
def lapsum_ckpt(tmp_path_factory):
    from moefy.config import ConvertConfig
    from moefy.runner import run_convert

    out = tmp_path_factory.mktemp("ls") / "moe"
    cfg = ConvertConfig(n_experts=8, top_k=2, calib_tokens=1024, seq_len=64, steps=4, eval_every=2, router="lapsum",
                        stage="both", e2e_steps=4, e2e_batch=2, budget=9.0, max_active=4,
                        e2e_val_sequences=0)  # keep the trained state: these tests are about what training learns
    return run_convert(str(STORIES), out, cfg, [str(TINYSTORIES)], log=lambda *_: None)


def test_learned_budgets_sum_to_global_budget(lapsum_ckpt):
    layers = lapsum_ckpt.record["layers"]
    ks = [layer["top_k"] for layer in layers]
    assert sum(ks) == pytest.approx(9.0, abs=1e-4)
    assert all(k >= 1.0 for k in ks)
    assert len({round(k, 6) for k in ks}) > 1  # learned, not uniform
    rec = json.loads((lapsum_ckpt.out / "moefy.json").read_text())
    assert rec["router"] == "lapsum" and "lapsum_threshold" in rec["layers"][0]


def test_exported_model_runs_variable_k(lapsum_ckpt):
    import moefy  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lapsum_ckpt.out).eval()
    counts = []
    for layer in model.model.model.layers:
        assert layer.mlp.router_type == "lapsum"
        layer.mlp.register_forward_hook(
            lambda m, a, o: counts.append((m.routing_weights(a[0].reshape(-1, a[0].shape[-1])) != 0).sum(-1).float())
        )
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
    per_token = torch.cat(counts)
    assert per_token.max() <= 4 and per_token.min() >= 1
    assert per_token.unique().numel() > 1  # tokens use different numbers of experts
    for layer in model.model.model.layers:
        layer.mlp.forward = layer.mlp.forward_reference
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert torch.allclose(fast, ref, atol=1e-4)


def test_perplexity_measures_variable_active_experts(lapsum_ckpt):
    import moefy  # noqa: F401
    from transformers import AutoModelForCausalLM

    from moefy.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(lapsum_ckpt.out).eval()
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seq_len=64)
    per_layer = res["active_experts_per_layer"]
    assert len(per_layer) == len(lapsum_ckpt.record["layers"])
    assert all(1.0 <= v <= 4.0 for v in per_layer)  # at least the best expert, at most max_active
    assert res["mean_active_experts"] == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-3)
