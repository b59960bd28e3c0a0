"""Tiny randomly initialised models of every supported family (a few hundred KB each)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, head_dim=8,
)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 64},
    "qwen2": {},
    "qwen3": {},
    "gemma": {"hidden_activation": "gelu_pytorch_tanh"},
    "gemma2": {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": 64},
    "gemma3_text": {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": 64},
    "phi3": {"pad_token_id": 0},
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    cfg = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()
