"""Architecture adapters: where each decoder layer's gated FFN lives and what it computes.

Every supported family computes ``down(act(gate(x)) * up(x))``; they differ in attribute
names, in the activation's config key, and (Phi-3) in a fused ``gate_up_proj``.  An adapter
reads the FFN as plain tensors (:class:`FFNWeights`) so the rest of moefy never looks at a
model class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass
class FFNWeights:
    """A gated FFN as tensors: ``gate``/``up`` are ``[d_ffn, d_model]``, ``down`` is ``[d_model, d_ffn]``."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def d_ffn(self) -> int:
        return int(self.gate.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.gate.shape[1])

    @property
    def has_bias(self) -> bool:
        return self.gate_bias is not None


@dataclass(frozen=True)
class Adapter:
    """How to reach the FFNs of one architecture family."""

    family: str
    act_keys: tuple[str, ...] = ("hidden_act",)
    fused_gate_up: bool = False
    act_attr: str = "act_fn"
    # the FFN's output is added to the residual stream as it is (no norm after the FFN: Gemma 2/3
    # have post_feedforward_layernorm), so a layer's output minus its FFN's output is the stream
    # the FFN adds to (what --drift-correction needs)
    residual_ffn: bool = True

    def layers(self, model: nn.Module) -> nn.ModuleList:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no model.layers; cannot find its decoder layers")
        return layers

    def act_name(self, config: object) -> str:
        for key in self.act_keys:
            name = getattr(config, key, None)
            if name:
                return str(name)
        raise UnsupportedModelError(f"config has none of {self.act_keys}; cannot tell the FFN activation")

    def ffn_weights(self, mlp: nn.Module) -> FFNWeights:
        """The FFN of one layer as tensors (views of the module's parameters)."""
        if self.fused_gate_up:
            fused = mlp.gate_up_proj
            d = fused.weight.shape[0] // 2
            gb = ub = None
            if fused.bias is not None:
                gb, ub = fused.bias[:d], fused.bias[d:]
            return FFNWeights(fused.weight[:d], fused.weight[d:], mlp.down_proj.weight, gb, ub, mlp.down_proj.bias)
        return FFNWeights(
            mlp.gate_proj.weight,
            mlp.up_proj.weight,
            mlp.down_proj.weight,
            mlp.gate_proj.bias,
            mlp.up_proj.bias,
            mlp.down_proj.bias,
        )


_GATED = Adapter("llama")
ADAPTERS: dict[str, Adapter] = {
    "llama": _GATED,
    "mistral": Adapter("mistral"),
    "qwen2": Adapter("qwen2"),
    "qwen3": Adapter("qwen3"),
    "gemma": Adapter("gemma", act_keys=("hidden_activation", "hidden_act")),
    "gemma2": Adapter("gemma2", act_keys=("hidden_activation", "hidden_act"), residual_ffn=False),
    "gemma3_text": Adapter("gemma3", act_keys=("hidden_activation", "hidden_act"), residual_ffn=False),
    "phi3": Adapter("phi3", fused_gate_up=True, act_attr="activation_fn"),
}


def passthrough_layer(*args: object, **kwargs: object) -> object:
    """A decoder layer's forward that returns its input hidden states unchanged (set as
    ``layer.forward`` to skip a layer in a model's own forward; ``del layer.forward`` restores it)."""
    return args[0] if args else kwargs["hidden_states"]


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(config: object) -> Adapter:
    """The adapter for a transformers config, or a one-line :class:`UnsupportedModelError`."""
    model_type = getattr(config, "model_type", None)
    if model_type == "moefy":
        raise UnsupportedModelError("this model is already a moefy MoE; convert its dense base model instead")
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; moefy supports: {', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]
