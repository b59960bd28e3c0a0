import pytest
import torch

import moefy  # noqa: F401
from moefy.adapters import get_adapter, supported_model_types
from moefy.config import ConvertConfig
from moefy.convert import layerwise_stage
from moefy.errors import UnsupportedModelError
from moefy.export import save_checkpoint, to_moefy_model
from transformers import AutoConfig, AutoModelForCausalLM

from tiny_models import FAMILIES, tiny_model


def _calib(vocab=128, n=8, seq=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, seq), generator=g)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_converts_and_k_equals_e_is_dense(family, tmp_path):
    dense = tiny_model(family)
    ids = _calib()
    with torch.no_grad():
        ref = dense(input_ids=ids[:2]).logits
    model = tiny_model(family)
    cfg = ConvertConfig(n_experts=4, top_k=4, calib_tokens=256, seq_len=32, steps=2, weights="none", eval_every=1)
    reports = layerwise_stage(model, ids, cfg, batch=4)
    assert len(reports) == 2
    moe = to_moefy_model(model)
    with torch.no_grad():
        out = moe(input_ids=ids[:2]).logits
    assert torch.allclose(out, ref, atol=1e-4), float((out - ref).abs().max())
    save_checkpoint(moe, None, tmp_path / "ckpt", {"method": "dot"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        again = loaded(input_ids=ids[:2]).logits
    assert torch.allclose(again, out, atol=1e-5)


def test_unsupported_architecture_names_supported_ones():
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(cfg)
    assert "gpt2" in str(err.value)
    for name in supported_model_types():
        assert name in str(err.value)
    assert "\n" not in str(err.value)
