"""Tiny converted moefy models (DOT-MoE layer-wise stage, a few steps) for fast-path and export tests."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

from moefy.config import ConvertConfig
from moefy.convert import layerwise_stage
from moefy.export import to_moefy_model
from moefy.hf.modeling_moefy import MoefyForCausalLM
from moefy.serving_export import set_gating
from tiny_models import tiny_model


def calib_ids(vocab: int = 128, n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=None)
def _converted(family: str, n_experts: int, top_k: int, n_shared: int, layers: tuple[int, ...] | None) -> MoefyForCausalLM:
    model = tiny_model(family)
    cfg = ConvertConfig(
        n_experts=n_experts, top_k=top_k, n_shared=n_shared, calib_tokens=256, seq_len=32, steps=2,
        weights="none", eval_every=1, layers=list(layers) if layers is not None else None,
    )
    layerwise_stage(model, calib_ids(), cfg, batch=4)
    moe = to_moefy_model(model)
    with torch.no_grad():  # a trained-looking router: spread the logits so routing is not near ties
        for layer in moe.model.model.layers:
            if hasattr(layer.mlp, "router"):
                layer.mlp.router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    return moe


def tiny_moefy(
    family: str = "llama", n_experts: int = 4, top_k: int = 2, n_shared: int = 0, gating: str = "mask",
    layers: tuple[int, ...] | None = None,
) -> MoefyForCausalLM:
    """A fresh copy of a converted tiny model with the given gating."""
    model = copy.deepcopy(_converted(family, n_experts, top_k, n_shared, layers))
    return set_gating(model, gating).eval()
