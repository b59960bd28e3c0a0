"""Export a moefy checkpoint to what people serve with: one writer per output format.

=============  ==============================================================================
``hf``         the moefy checkpoint itself (a copy: transformers with moefy installed, or
               ``trust_remote_code=True``)
``mixtral``    stock ``MixtralForCausalLM`` (transformers, vLLM, TGI, SGLang, llama.cpp's
               ``convert_hf_to_gguf.py``, ...)
``qwen2-moe``  stock ``Qwen2MoeForCausalLM``; shared neurons become its shared expert
``gguf``       a llama.cpp GGUF file: ``llama`` architecture with 3-D expert tensors
               (``ffn_{gate,up,down}_exps``) and a router (``ffn_gate_inp``), as llama.cpp
               stores Mixtral
``gguf-        a llama.cpp GGUF file: ``qwen2moe`` architecture, the routed experts as above
qwen2moe``     plus a shared expert (``ffn_{gate,up,down}_shexp``, ``ffn_gate_inp_shexp``):
               moefy's shared neurons
=============  ==============================================================================

One writer per output architecture; nothing switches architecture behind the user's back: a
format that cannot represent the model refuses and names the one that can.

Only exports that compute exactly the moefy model's function are written.  Anything a
target cannot represent raises :class:`ExportRefusedError` naming why (see ``*_refusal``).
Every output is written beside its final path and renamed into place when complete.

Representability, in short (details in each ``*_refusal`` function):

* Mixtral and llama.cpp weight the chosen experts by the router softmax renormalised over the
  top-k (llama.cpp's llama graph hard-codes ``norm_w=true`` with softmax gating).  That equals
  moefy's ``softmax-renorm`` gating, and ``mask`` gating only for ``top_k == 1`` (weight 1).
  Both need every layer converted, one expert count and top-k, no shared neurons, a
  LLaMA/Mistral base (no attention or MLP biases) and SiLU.
* Experts of unequal size (and unequal shared sizes across layers, for Qwen2-MoE) are padded
  to the largest with all-zero neurons: ``silu(0) * 0`` times a zero column adds exactly 0.
* Qwen2-MoE has a shared expert, gated by ``sigmoid(w . x)``: a zero gate weight gives exactly
  0.5, so the shared neurons' down-projection is stored doubled (exact: a power of two).  Its
  router takes ``softmax`` over all experts then top-k, renormalised if ``norm_topk_prob``:
  moefy ``softmax`` (``norm_topk_prob=false``), ``softmax-renorm`` (``true``) and ``mask`` with
  ``top_k == 1`` (``true``) are exact.  Unconverted layers become ``mlp_only_layers``.
* llama.cpp's ``qwen2moe`` (``--format gguf-qwen2moe``) has every layer MoE and weights the top-k by
  the softmax over all experts, never renormalised: moefy ``softmax`` gating only.  Its shared
  expert gate is ``sigmoid(w . x)`` computed as ``silu(z) / z``, so the gate weight is a tiny power
  of two instead of zero (0/0 would be NaN; see :data:`GGUF_SHEXP_GATE`); the shared down-projection
  is doubled as for Qwen2-MoE.  RoPE is NEOX there: q/k keep HF's row order.
* A GGUF carries the tokenizer as llama.cpp's ``convert_hf_to_gguf.py`` writes it: SentencePiece
  BPE vocabularies as ``llama`` (real scores and token types), byte-level BPE as ``gpt2`` (types,
  merges and the ``tokenizer.ggml.pre`` llama.cpp knows the pre-tokenizer by), and only when
  llama.cpp's tokenizer then splits text as the HF tokenizer does (see :func:`gguf_vocab`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ExportRefusedError, ModelNotFoundError, UnsupportedModelError
from .export import atomic_write_dir, prepare_output
from .hf.modeling_moefy import MoefyForCausalLM, MoefyMLP

FORMATS = ("hf", "mixtral", "qwen2-moe", "gguf", "gguf-qwen2moe")
GGUF_DTYPES = ("f32", "f16")
GATINGS = ("mask", "softmax", "softmax-renorm", "lapsum")
# Stock HF experts are 3-D tensors run by torch's grouped_mm, which needs 16-byte aligned
# strides: HF exports pad each expert to a multiple of 8 neurons (exact: zero neurons).
HF_ALIGN = 8
LLAMA_BASES = ("llama", "mistral")
QWEN2_MOE_BASES = ("llama", "mistral", "qwen2")
# files copied next to an exported HF model (tokenizer, generation defaults, provenance)
SIDE_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "moefy.json",
)


# --------------------------------------------------------------------------- loading
def check_moefy_dir(path: str | Path) -> Path:
    """A readable moefy checkpoint directory (safetensors intact, ``model_type`` moefy), or a
    one-line :class:`MoefyError`."""
    from .models import _check_local_dir

    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"moefy checkpoint directory not found: {path}")
    _check_local_dir(path)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"cannot read {path / 'config.json'}: {exc}") from None
    if model_type != "moefy":
        raise UnsupportedModelError(
            f"{path} is a {model_type!r} model, not a moefy checkpoint; `moefy export` exports the output of `moefy convert`"
        )
    return path


def load_moefy_dir(path: str | Path, dtype: torch.dtype | str = "auto") -> MoefyForCausalLM:
    """Load a moefy checkpoint directory (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    from .models import _quiet_transformers

    path = check_moefy_dir(path)
    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model.eval()
    return model


def set_gating(model: MoefyForCausalLM, gating: str) -> MoefyForCausalLM:
    """Set how chosen experts are weighted (``config.gating`` and every layer), in place."""
    if gating not in GATINGS:
        raise ConfigError(f"unknown gating {gating!r}; choose one of {', '.join(GATINGS)}")
    model.config.gating = gating
    for mlp in moe_layers(model):
        if mlp is not None:
            mlp.gating = gating
    return model


# --------------------------------------------------------------------------- inspection
def base_model(model: MoefyForCausalLM) -> nn.Module:
    return model.model if isinstance(model, MoefyForCausalLM) else model


def moe_layers(model: MoefyForCausalLM) -> list[MoefyMLP | None]:
    """Per decoder layer: its :class:`MoefyMLP`, or ``None`` for a dense (unconverted) FFN."""
    layers = base_model(model).model.layers
    return [layer.mlp if isinstance(layer.mlp, MoefyMLP) else None for layer in layers]


def _layout_refusal(mlps: list[MoefyMLP]) -> str | None:
    """Why these MoE layers cannot share one expert count and top-k, or None.  (Unequal expert
    or shared sizes are fine: exports pad them with all-zero neurons, which add exactly 0.)"""
    first = mlps[0]
    for m in mlps:
        if m.n_experts != first.n_experts:
            return f"layers with different expert counts ({first.n_experts} and {m.n_experts})"
        if float(m.top_k) != float(first.top_k):
            return f"layers with different top-k ({first.top_k} and {m.top_k})"
    return None


def expert_width(mlps: list[MoefyMLP], align: int = 1) -> int:
    """Neurons per exported expert: the largest expert rounded up to a multiple of ``align``
    (smaller experts are zero-padded)."""
    width = max(max(m.expert_sizes) for m in mlps)
    return -(-width // align) * align


def shared_width(mlps: list[MoefyMLP], align: int = 1) -> int:
    """Neurons of an exported shared expert: the most shared neurons of any layer (at least one:
    a model without them gets an all-zero one), rounded up to a multiple of ``align``."""
    width = max(1, max(m.n_shared for m in mlps))
    return -(-width // align) * align


def padded_neurons(mlps: list[MoefyMLP], align: int = 1) -> int:
    """All-zero neurons an export adds to equalise (and align) expert sizes."""
    width = expert_width(mlps, align)
    return sum(width * m.n_experts - sum(m.expert_sizes) for m in mlps)


def _routing_refusal(fmt: str, mlps: list[MoefyMLP], exact: tuple[str, ...], mask_top1: bool, engine: str) -> str | None:
    """Why ``fmt`` cannot weight the chosen experts as these layers do, or None.  ``exact``: the
    gatings ``engine`` reproduces at any top-k; ``mask_top1``: whether it reproduces mask gating at
    ``top_k == 1`` (a renormalised weight over one expert is exactly 1)."""
    m = mlps[0]
    if m.router_type != "topk":
        return f"{fmt} export needs hard top-k routing; this model uses the {m.router_type!r} router (a variable number of experts per token)"
    if float(m.top_k) != int(m.top_k):
        return f"{fmt} export needs an integer top-k, got {m.top_k}"
    k, gating = int(m.top_k), m.gating
    if gating in exact or (gating == "mask" and k == 1 and mask_top1):
        return None
    alternatives = " or ".join(f"--gating {g}" for g in exact)
    needs = alternatives + (" (or mask gating with top_k=1)" if mask_top1 else "")
    if gating == "mask":
        return (
            f"{fmt} export needs {'top_k=1 or ' if mask_top1 else ''}{alternatives}; this model weights each of its {k} chosen experts 1.0 (mask gating), which "
            f"{engine} cannot represent"
        )
    if gating == "softmax":
        return (
            f"{fmt} export needs {needs}; this model weights chosen experts by their un-renormalised router "
            f"probability (softmax gating), which {engine} cannot represent (--format qwen2-moe and gguf-qwen2moe can)"
        )
    if gating == "softmax-renorm":
        return (
            f"{fmt} export needs {needs}; this model renormalises its chosen experts' router probabilities "
            f"(softmax-renorm gating), which {engine} cannot represent (--format qwen2-moe can; mixtral and gguf too without shared neurons)"
        )
    return f"{fmt} export cannot represent gating {gating!r}"


def _base_refusal(fmt: str, model: MoefyForCausalLM, bases: tuple[str, ...]) -> str | None:
    cfg = model.config.to_base_config()
    mt = cfg.model_type
    if mt not in bases:
        return f"{fmt} export needs a {'/'.join(bases)} base model; this one is {mt!r}"
    if model.config.hidden_act != "silu" or getattr(cfg, "hidden_act", "silu") != "silu":
        return f"{fmt} export needs the SiLU activation; this model uses {model.config.hidden_act!r}"
    if getattr(cfg, "mlp_bias", False):
        return f"{fmt} export cannot represent FFN biases (mlp_bias=true)"
    return None


def mixtral_refusal(model: MoefyForCausalLM, fmt: str = "mixtral") -> str | None:
    """Why ``model`` cannot be exported exactly as Mixtral (or llama.cpp GGUF), or ``None``."""
    reason = _base_refusal(fmt, model, LLAMA_BASES)
    if reason:
        return reason
    if getattr(model.config.to_base_config(), "attention_bias", False):
        return f"{fmt} export cannot represent attention biases (attention_bias=true)"
    layers = moe_layers(model)
    dense = [i for i, m in enumerate(layers) if m is None]
    if dense:
        return f"{fmt} export needs every layer converted; layers {dense} are still dense (convert without --layers)"
    mlps = [m for m in layers if m is not None]
    reason = _layout_refusal(mlps)
    if reason:
        return f"{fmt} export needs one expert count and top-k in every layer; this model has {reason}"
    shared = max(m.n_shared for m in mlps)
    if shared:
        return (
            f"{fmt} export cannot represent shared (always-active) neurons ({shared} per layer); "
            + ("use --format qwen2-moe" if fmt == "mixtral" else "use --format gguf-qwen2moe (with --gating softmax)")
            + ", or convert with --shared 0"
        )
    engine = "Mixtral" if fmt == "mixtral" else "llama.cpp's llama architecture"
    return _routing_refusal(fmt, mlps, ("softmax-renorm",), mask_top1=True, engine=engine)


def _qwen2_moe_layout_refusal(fmt: str, model: MoefyForCausalLM) -> str | None:
    """Why ``model``'s base, attention and expert layout do not fit Qwen2-MoE (in transformers or
    llama.cpp), or ``None``; routing is checked by the caller."""
    reason = _base_refusal(fmt, model, QWEN2_MOE_BASES)
    if reason:
        return reason
    cfg = model.config.to_base_config()
    mt = cfg.model_type
    if mt == "llama" and getattr(cfg, "attention_bias", False):
        return f"{fmt} export cannot represent an attention output bias (attention_bias=true)"
    if mt == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        return (
            f"{fmt} export cannot represent Mistral's sliding-window attention (sliding_window={cfg.sliding_window}); "
            + ("use --format mixtral" if fmt == "qwen2-moe" else "llama.cpp's qwen2moe attends to the full context")
        )
    if mt == "qwen2" and "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return f"{fmt} export cannot represent Qwen2 sliding-window layers (use_sliding_window=true)"
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        return f"{fmt} export needs head_dim = hidden_size / num_attention_heads; this model has head_dim={head_dim}"
    layers = moe_layers(model)
    mlps = [m for m in layers if m is not None]
    if not mlps:
        return f"{fmt} export needs at least one converted layer"
    reason = _layout_refusal(mlps)
    if reason:
        return f"{fmt} export needs one expert count and top-k in every converted layer; this model has {reason}"
    return None


def qwen2_moe_refusal(model: MoefyForCausalLM) -> str | None:
    """Why ``model`` cannot be exported exactly as Qwen2-MoE, or ``None``."""
    fmt = "qwen2-moe"
    reason = _qwen2_moe_layout_refusal(fmt, model)
    if reason:
        return reason
    cfg = model.config.to_base_config()
    layers = moe_layers(model)
    for i, layer in enumerate(base_model(model).model.layers):
        if layers[i] is None and layer.mlp.gate_proj.weight.shape[0] != cfg.intermediate_size:
            return f"{fmt} export needs every dense layer of width {cfg.intermediate_size}; layer {i} differs"
    mlps = [m for m in layers if m is not None]
    return _routing_refusal(fmt, mlps, ("softmax-renorm", "softmax"), mask_top1=True, engine="Qwen2-MoE")


def _gguf_rope_refusal(fmt: str, model: MoefyForCausalLM) -> str | None:
    rope = dict(getattr(model.config.to_base_config(), "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", "linear"):
        return f"{fmt} export writes only default or linear RoPE; this model uses rope_type {rope.get('rope_type')!r}"
    return None


def gguf_qwen2moe_refusal(model: MoefyForCausalLM) -> str | None:
    """Why ``model`` cannot be exported exactly as a llama.cpp ``qwen2moe`` GGUF, or ``None``.

    llama.cpp's qwen2moe graph (src/models/qwen2moe.cpp) makes every layer a MoE layer and weights
    the top-k experts by the softmax over all experts, never renormalised (``build_moe_ffn`` with
    ``norm_w=false``, whatever the GGUF says): moefy's ``softmax`` gating, only.  Its shared expert
    is gated by ``sigmoid(w . x)`` (see :data:`GGUF_SHEXP_GATE`)."""
    fmt = "gguf-qwen2moe"
    reason = _qwen2_moe_layout_refusal(fmt, model)
    if reason:
        return reason
    dense = [i for i, m in enumerate(moe_layers(model)) if m is None]
    if dense:
        return f"{fmt} export needs every layer converted (llama.cpp's qwen2moe has no dense layers); layers {dense} are still dense"
    reason = _gguf_rope_refusal(fmt, model)
    if reason:
        return reason
    mlps = [m for m in moe_layers(model) if m is not None]
    return _routing_refusal(fmt, mlps, ("softmax",), mask_top1=False, engine="llama.cpp's qwen2moe")


def gguf_refusal(model: MoefyForCausalLM) -> str | None:
    """Why ``model`` cannot be exported exactly as a llama.cpp GGUF, or ``None``.

    llama.cpp builds a llama-architecture MoE layer as Mixtral does (softmax, top-k,
    renormalise), so the Mixtral rules apply; in addition its llama graph has no sliding-window
    attention and only default/linear RoPE scaling is written here."""
    reason = mixtral_refusal(model, fmt="gguf")
    if reason:
        return reason
    cfg = model.config.to_base_config()
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < cfg.max_position_embeddings:
        return f"gguf export cannot represent sliding-window attention (sliding_window={window}); llama.cpp's llama architecture attends to the full context"
    return _gguf_rope_refusal("gguf", model)


def _refuse(reason: str | None) -> None:
    if reason:
        raise ExportRefusedError(reason)


# --------------------------------------------------------------------------- conversion
def _expert_tensors(mlp: MoefyMLP, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gate``/``up`` ``[E, width, hidden]``, ``down`` ``[E, hidden, width]`` and the router
    ``[E, hidden]``; an expert smaller than ``width`` is padded with all-zero neurons."""
    e, h = mlp.n_experts, mlp.hidden_size
    w = mlp.gate_proj.weight
    gate, up, down = w.new_zeros(e, width, h), w.new_zeros(e, width, h), w.new_zeros(e, h, width)
    with torch.no_grad():
        for j in range(e):
            lo, hi = mlp.offsets[j], mlp.offsets[j + 1]
            gate[j, : hi - lo] = mlp.gate_proj.weight[lo:hi]
            up[j, : hi - lo] = mlp.up_proj.weight[lo:hi]
            down[j, :, : hi - lo] = mlp.down_proj.weight[:, lo:hi]
        router = mlp.router.weight.detach().clone()
    return gate, up, down, router


def _shared_tensors(mlp: MoefyMLP, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared neurons as ``gate``/``up`` ``[width, hidden]`` and ``down`` ``[hidden, width]``, zero-padded."""
    h, ns = mlp.hidden_size, mlp.n_shared
    w = mlp.gate_proj.weight
    gate, up, down = w.new_zeros(width, h), w.new_zeros(width, h), w.new_zeros(h, width)
    with torch.no_grad():
        gate[:ns] = mlp.gate_proj.weight[:ns]
        up[:ns] = mlp.up_proj.weight[:ns]
        down[:, :ns] = mlp.down_proj.weight[:, :ns]
    return gate, up, down


def _non_mlp_state(model: MoefyForCausalLM) -> dict[str, torch.Tensor]:
    """Base model tensors other than the FFNs, under the stock ``model.*``/``lm_head`` names."""
    base = base_model(model)
    out = {}
    for name, t in base.state_dict(keep_vars=False).items():
        if ".mlp." not in name:
            out[name] = t.detach()
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = base.get_output_embeddings().weight.detach()
    return out


def _common_config(cfg: Any) -> dict[str, Any]:
    keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
        "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    )
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


def _materialise(cls: type, config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """``cls(config)`` holding ``state`` without allocating or initialising random weights."""
    config.dtype = dtype
    with torch.device("meta"):
        target = cls(config)
    target.load_state_dict(state, strict=True, assign=True)
    rotary = target.model.rotary_emb
    target.model.rotary_emb = type(rotary)(config=config)  # non-persistent buffers, built on CPU
    if config.tie_word_embeddings:
        target.lm_head.weight = target.model.embed_tokens.weight
    leftover = [n for n, t in list(target.named_parameters()) + list(target.named_buffers()) if t.is_meta]
    if leftover:  # pragma: no cover - a transformers change we do not know about
        raise ExportRefusedError(f"internal: {cls.__name__} has tensors moefy does not fill: {leftover[:3]}")
    return target.eval()


def to_mixtral(model: MoefyForCausalLM, align: int = HF_ALIGN) -> nn.Module:
    """A stock ``MixtralForCausalLM`` computing the same function (refuses if not exact)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    _refuse(mixtral_refusal(model))
    cfg = model.config.to_base_config()
    mlps = [m for m in moe_layers(model) if m is not None]
    m0 = mlps[0]
    config = MixtralConfig(
        **_common_config(cfg),
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        hidden_act="silu",
        intermediate_size=expert_width(mlps, align),
        num_local_experts=m0.n_experts,
        num_experts_per_tok=int(m0.top_k),
        sliding_window=getattr(cfg, "sliding_window", None),
        router_jitter_noise=0.0,
    )
    state = _non_mlp_state(model)
    width = expert_width(mlps, align)
    for i, mlp in enumerate(mlps):
        gate, up, down, router = _expert_tensors(mlp, width)
        p = f"model.layers.{i}.mlp."
        state[p + "gate.weight"] = router
        state[p + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[p + "experts.down_proj"] = down
    return _materialise(MixtralForCausalLM, config, state, m0.gate_proj.weight.dtype)


def to_qwen2_moe(model: MoefyForCausalLM, align: int = HF_ALIGN) -> nn.Module:
    """A stock ``Qwen2MoeForCausalLM`` computing the same function (refuses if not exact).

    Shared neurons become the shared expert with a zero ``shared_expert_gate`` (sigmoid = 0.5)
    and a doubled down-projection; a model without shared neurons gets a one-neuron all-zero
    shared expert (it adds exactly 0). q/k/v biases are always written (zeros for a source without
    them, e.g. LLaMA): vLLM's Qwen2-MoE has them whatever ``qkv_bias`` says, and leaves missing ones
    uninitialised (benchmarks/vllm_check.py)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    _refuse(qwen2_moe_refusal(model))
    cfg = model.config.to_base_config()
    layers = moe_layers(model)
    mlps = [m for m in layers if m is not None]
    m0 = mlps[0]
    n_shared = max(m.n_shared for m in mlps)
    width = expert_width(mlps, align)
    config = Qwen2MoeConfig(
        **_common_config(cfg),
        hidden_act="silu",
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=max(n_shared, 1),
        num_experts=m0.n_experts,
        num_experts_per_tok=int(m0.top_k),
        norm_topk_prob=m0.gating != "softmax",
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, m in enumerate(layers) if m is None],
        qkv_bias=True,
        use_sliding_window=False,
    )
    state = _non_mlp_state(model)
    for i in range(cfg.num_hidden_layers):
        for n in ("q_proj", "k_proj", "v_proj"):
            w = state[f"model.layers.{i}.self_attn.{n}.weight"]
            state.setdefault(f"model.layers.{i}.self_attn.{n}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
    base_layers = base_model(model).model.layers
    dtype = m0.gate_proj.weight.dtype
    for i, mlp in enumerate(layers):
        p = f"model.layers.{i}.mlp."
        if mlp is None:
            dense = base_layers[i].mlp
            for n in ("gate_proj", "up_proj", "down_proj"):
                state[p + f"{n}.weight"] = getattr(dense, n).weight.detach()
            continue
        gate, up, down, router = _expert_tensors(mlp, width)
        state[p + "gate.weight"] = router
        state[p + "experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[p + "experts.down_proj"] = down
        s_gate, s_up, s_down = _shared_tensors(mlp, max(n_shared, 1))
        state[p + "shared_expert.gate_proj.weight"] = s_gate
        state[p + "shared_expert.up_proj.weight"] = s_up
        state[p + "shared_expert.down_proj.weight"] = s_down * 2  # sigmoid(0) = 0.5, exactly undone
        state[p + "shared_expert_gate.weight"] = torch.zeros(1, mlp.hidden_size, dtype=dtype)
    return _materialise(Qwen2MoeForCausalLM, config, state, dtype)


# --------------------------------------------------------------------------- writers
def _copy_side_files(src_dir: Path | None, dst: Path, tokenizer: Any = None) -> None:
    if src_dir is not None:
        for name in SIDE_FILES:
            if (src_dir / name).is_file() and not (dst / name).exists():
                shutil.copy2(src_dir / name, dst / name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(dst))


def write_hf(
    model: MoefyForCausalLM | None, out: str | Path, src_dir: str | Path | None = None,
    tokenizer: Any = None, overwrite: bool = False, **_: Any,
) -> Path:
    """The moefy checkpoint again: a file copy of ``src_dir``, or ``model`` saved afresh."""
    if src_dir is not None:
        src = Path(src_dir)

        def write(tmp: Path) -> None:
            shutil.copytree(src, tmp, dirs_exist_ok=True)

        return atomic_write_dir(Path(out), write, overwrite)
    from .export import save_checkpoint

    assert model is not None
    return save_checkpoint(model, tokenizer, out, {"method": "export", "source": "in-memory model"}, overwrite=overwrite)


def _hf_writer(convert: Callable[[MoefyForCausalLM], nn.Module], fmt: str) -> Callable[..., Path]:
    def write_stock(
        model: MoefyForCausalLM, out: str | Path, src_dir: str | Path | None = None,
        tokenizer: Any = None, overwrite: bool = False, **_: Any,
    ) -> Path:
        target = convert(model)  # refuses before anything is written
        src = Path(src_dir) if src_dir is not None else None

        def write(tmp: Path) -> None:
            target.save_pretrained(str(tmp), safe_serialization=True)
            _copy_side_files(src, tmp, tokenizer)
            (tmp / "README.md").write_text(
                f"# {fmt} export of a moefy checkpoint\n\nA stock `{type(target).__name__}` written by `moefy export "
                f"--format {fmt}`; it computes the same function as the moefy model (checked representable: "
                f"{_describe(model, HF_ALIGN)}).\n"
            )

        return atomic_write_dir(Path(out), write, overwrite)

    write_stock.__name__ = f"write_{fmt.replace('-', '_')}"
    write_stock.__doc__ = f"Write a stock {fmt} checkpoint directory (refuses when not exact)."
    return write_stock


def _describe(model: MoefyForCausalLM, align: int = 1) -> str:
    mlps = [m for m in moe_layers(model) if m is not None]
    m = mlps[0]
    pad = padded_neurons(mlps, align)
    width, shared = expert_width(mlps, align), max(x.n_shared for x in mlps)
    # per token and layer: what the engine runs (padding included) against moefy's own modeling
    exported = shared + float(m.top_k) * width
    own = sum(x.n_shared + float(x.top_k) * sum(x.expert_sizes) / x.n_experts for x in mlps) / len(mlps)
    return (
        f"{len(mlps)} MoE layers, {m.n_experts} experts x {width} neurons, top-{m.top_k}, "
        f"{shared} shared neurons, gating {m.gating}"
        + (f", {pad} all-zero padding neurons (exact)" if pad else "")
        + (f"; the padding makes each token run {exported:.0f} FFN neurons per layer in the engine, against "
           f"{own:.0f} on average in moefy's own modeling (layers with unequal shared blocks, e.g. --allocate kl)"
           if exported > own * 1.05 else "")
    )


write_mixtral = _hf_writer(to_mixtral, "mixtral")
write_qwen2_moe = _hf_writer(to_qwen2_moe, "qwen2-moe")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> llama.cpp's interleaved RoPE order (as ``convert_hf_to_gguf``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- gguf vocabulary
# The tokenizer travels in the GGUF as llama.cpp's own converter (convert_hf_to_gguf.py) writes it,
# and only when llama.cpp's tokenizer then splits text exactly as the checkpoint's HF tokenizer:
#
# * ``llama`` (SPM): a SentencePiece-style BPE vocabulary (Metaspace ``▁``, byte fallback).  llama.cpp
#   merges the adjacent pair whose concatenation is the highest-*scoring* token; the HF tokenizer
#   merges the pair of lowest *rank* in its merges list.  Scores are SentencePiece's own (from
#   ``tokenizer.model``) or, without it, derived from the merges; either way they are checked to order
#   every pair exactly as the merges do (see :func:`_spm_merge_refusal`).
# * ``gpt2`` (byte-level BPE): tokens, types and merges as in ``tokenizer.json``; the pre-tokenizer
#   (the regex that splits text before BPE) is named, as llama.cpp does, by the hash of the token ids
#   of a fixed test string.  An unknown hash is refused: llama.cpp would split text differently.
#
# Anything else (Unigram, WordPiece, ...) is refused.
# The test string and hashes are llama.cpp's (convert_hf_to_gguf.py ``get_vocab_base_pre``).
GGUF_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
    "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
# sha256(str(tokenizer.encode(GGUF_CHKTXT))) -> (tokenizer.ggml.pre, whether llama.cpp sets ignore_merges for it);
# the pre-tokenizers of LLaMA-architecture models (the only ones the gguf writer exports)
GGUF_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": ("llama-bpe", True),  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": ("smaug-bpe", False),  # Smaug-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": ("smollm", False),  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": ("gpt-2", False),  # GPT-2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": ("tekken", True),  # Mistral Nemo
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_NO_SCORES = (-1000.0, 0.0)  # scores of added/padding tokens and of control/unknown/byte tokens (as SentencePiece)


@dataclass
class GgufVocab:
    """What ``write_gguf`` stores under ``tokenizer.ggml.*``."""

    model: str = "no_vocab"  # tokenizer.ggml.model: "llama" (SPM), "gpt2" (byte-level BPE) or "no_vocab"
    pre: str | None = None  # tokenizer.ggml.pre
    tokens: list[bytes] = field(default_factory=list)
    types: list[int] = field(default_factory=list)  # gguf.TokenType
    scores: list[float] | None = None  # SPM only
    merges: list[str] = field(default_factory=list)  # BPE only, "left right"
    add_space_prefix: bool | None = None
    add_bos: bool = False
    add_eos: bool = False
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    chat_template: str | None = None


def _vocab_refusal(msg: str) -> ExportRefusedError:
    return ExportRefusedError(f"gguf export cannot store this tokenizer exactly: {msg}")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message (varints and length-delimited bytes)."""
    i = 0

    def varint() -> int:
        nonlocal i
        out = shift = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    while i < len(buf):
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            yield num, varint()
        elif wire == 2:
            n = varint()
            yield num, buf[i:i + n]
            i += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            yield num, buf[i:i + n]
            i += n
        else:
            raise ValueError(f"protobuf wire type {wire}")


def _sentencepiece_model(path: Path) -> tuple[Any, list[int], dict[str, Any]]:
    """A SentencePiece processor for ``path``, its pieces' types (``ModelProto.SentencePiece.Type``,
    numbered as ``gguf.TokenType``) and the trainer/normaliser settings llama.cpp depends on."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    raw = path.read_bytes()
    types: list[int] = []
    spec = {"model_type": 1, "byte_fallback": False, "treat_whitespace_as_suffix": False}  # proto defaults
    for num, value in _proto_fields(raw):
        if num == 1:  # pieces
            types.append(dict(_proto_fields(value)).get(3, 1))
        elif num == 2:  # trainer_spec
            t = dict(_proto_fields(value))
            spec.update(model_type=t.get(3, 1), byte_fallback=bool(t.get(35, 0)), treat_whitespace_as_suffix=bool(t.get(24, 0)))
    if len(types) != sp.vocab_size():
        raise ValueError(f"{len(types)} pieces in the proto, {sp.vocab_size()} in sentencepiece")
    return sp, types, spec


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every component of a tokenizers (pre-)tokenizer/normaliser spec, ``Sequence`` members included."""
    if isinstance(node, dict):
        yield node
        for key in ("pretokenizers", "normalizers"):
            for child in node.get(key) or []:
                yield from _walk(child)


def _spm_space_prefix(tj: dict[str, Any]) -> bool:
    """Whether the HF tokenizer puts ``▁`` before the text; refuse any normalisation but the
    escaping of spaces as ``▁``, which is all llama.cpp's SPM tokenizer does."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    norms = [n for n in _walk(norm) if n.get("type") != "Sequence"]
    pres = [p for p in _walk(pre) if p.get("type") != "Sequence"]
    if not norms and len(pres) == 1 and pres[0].get("type") == "Metaspace":
        meta = pres[0]
        if meta.get("replacement") != "▁" or meta.get("split", True):
            raise _vocab_refusal(f"Metaspace pre-tokenizer {json.dumps(meta)} (llama.cpp's SPM tokenizer neither splits at ▁ nor uses another replacement)")
        scheme = meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never")
        # "first" and "always" differ only after a special token written inside the text (llama.cpp: "always")
        return scheme != "never"
    kinds = [n.get("type") for n in norms]
    if not pres and kinds in (["Prepend", "Replace"], ["Replace"]):
        prepend = norms[0] if kinds[0] == "Prepend" else None
        replace = norms[-1]
        if replace.get("pattern") == {"String": " "} and replace.get("content") == "▁" and (prepend is None or prepend.get("prepend") == "▁"):
            return prepend is not None
    raise _vocab_refusal(
        f"normaliser {json.dumps(norm)} / pre-tokenizer {json.dumps(pre)}: llama.cpp's SPM tokenizer only escapes spaces as ▁"
    )


def _bpe_parts(tj: dict[str, Any]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = tj["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _vocab_refusal(f"BPE {key}={model[key]!r} (llama.cpp has no such affixes)")
    if model.get("dropout"):
        raise _vocab_refusal(f"BPE dropout={model['dropout']} (llama.cpp's BPE is deterministic)")
    merges = []
    for m in model.get("merges") or []:
        pair = tuple(m) if isinstance(m, list) else tuple(m.split(" "))
        if len(pair) != 2 or any(not p or " " in p for p in pair):
            raise _vocab_refusal(f"BPE merge {m!r} cannot be written as llama.cpp's 'left right'")
        merges.append(pair)
    return dict(model["vocab"]), merges


def _token_table(tj: dict[str, Any], vocab: dict[str, int], unk: str | None) -> tuple[dict[int, str], dict[int, int]]:
    """id -> token text and id -> type of every id the tokenizer defines (added tokens as llama.cpp's
    ``get_vocab_base``: special -> CONTROL, unknown -> UNKNOWN, others -> USER_DEFINED)."""
    import gguf

    text = {i: t for t, i in vocab.items()}
    types = {i: int(gguf.TokenType.NORMAL) for i in text}
    for added in tj.get("added_tokens") or []:
        i, content = int(added["id"]), added["content"]
        if i in text and text[i] != content:
            raise _vocab_refusal(f"added token {content!r} replaces {text[i]!r} at id {i}")
        text[i] = content
        if content == unk:
            types[i] = int(gguf.TokenType.UNKNOWN)
        elif added.get("special") or (content.startswith("<|") and content.endswith("|>")):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            types[i] = int(gguf.TokenType.USER_DEFINED)
    return text, types


def _spm_merge_refusal(tokens: list[str], types: list[int], scores: list[float], merges: list[tuple[str, str]]) -> str | None:
    """Why llama.cpp's score-ordered pair merging (with these scores) would not reproduce the HF
    tokenizer's rank-ordered merges, or None.  Exactness needs (1) every pair llama.cpp may merge -
    two adjacent symbols (vocabulary tokens or single characters) whose concatenation is a token - to
    be an HF merge, (2) the merges ranked in strictly decreasing score of their result, the merges of
    one result adjacent, and (3) no two merges of one result that can compete for a shared middle
    symbol (there llama.cpp takes the leftmost, HF the lower rank)."""
    import gguf

    ids = {t: i for i, t in enumerate(tokens)}
    mergeable = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.BYTE))
    merge_set = set(merges)
    for t, i in ids.items():
        if types[i] not in mergeable:
            continue  # added tokens are matched in the text before any merging
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if (left in ids or len(left) == 1) and (right in ids or len(right) == 1) and (left, right) not in merge_set:
                return f"llama.cpp can merge {left!r} + {right!r} into token {i} {t!r}, which the HF tokenizer's merges never do"
    groups: list[str] = []
    splits: dict[str, list[tuple[str, str]]] = {}
    for left, right in merges:
        result = left + right
        if result not in ids:
            return f"merge {left!r} + {right!r} gives {result!r}, not a token"
        if not groups or groups[-1] != result:
            if result in splits:
                return f"the merges into {result!r} are not adjacent in rank (llama.cpp gives one score per token)"
            groups.append(result)
            splits[result] = []
        splits[result].append((left, right))
    for a, b in zip(groups, groups[1:]):
        if not scores[ids[a]] > scores[ids[b]]:
            return f"token {a!r} (score {scores[ids[a]]}) is merged before {b!r} (score {scores[ids[b]]}); llama.cpp would not keep that order"
    for result, pairs in splits.items():
        for left1, right1 in pairs:
            for left2, right2 in pairs:
                if (left1, right1) != (left2, right2) and right1 == left2:
                    return f"merges {left1!r} + {right1!r} and {left2!r} + {right2!r} can compete for one symbol"
    return None


def _hf_specials(tok: Any, tokens: list[bytes], cfg: Any) -> tuple[dict[str, int], bool, bool]:
    """Special ids, and whether the HF tokenizer adds BOS / EOS (checked by encoding)."""
    special: dict[str, int] = {}
    for name in ("bos", "eos", "unk", "pad"):
        v = getattr(tok, f"{name}_token_id", None)
        if v is None and name in ("bos", "eos", "pad"):
            v = getattr(cfg, f"{name}_token_id", None)
        if isinstance(v, int) and 0 <= v < len(tokens):
            special[name] = v
    plain = tok.encode("a b", add_special_tokens=False)
    full = tok.encode("a b")
    add_bos = len(full) > len(plain) and full[0] == special.get("bos", -1) and full[1:1 + len(plain)] == plain
    add_eos = len(full) > len(plain) and full[-1] == special.get("eos", -1) and full[len(full) - len(plain) - 1:-1] == plain
    if full != [special.get("bos", -1)] * add_bos + plain + [special.get("eos", -1)] * add_eos:
        raise _vocab_refusal(f"its post-processor adds {full} around {plain}; llama.cpp only adds BOS and/or EOS")
    return special, add_bos, add_eos


def _load_hf_tokenizer(src_dir: Path | None, tokenizer: Any) -> tuple[Any, Path | None]:
    """The HF tokenizer to reproduce (the one given, or ``src_dir``'s) and its ``tokenizer.model``."""
    if tokenizer is None:
        if src_dir is None or not any((src_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return None, None
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src_dir), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any loader failure is one line
            raise ExportRefusedError(f"gguf export cannot read the tokenizer in {src_dir}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    spm: Path | None = None
    for cand in ((src_dir / "tokenizer.model") if src_dir is not None else None, getattr(tokenizer, "vocab_file", None)):
        if cand is not None and str(cand).endswith(".model") and Path(cand).is_file():
            spm = Path(cand)
            break
    return tokenizer, spm


def gguf_vocab(src_dir: str | Path | None, vocab_size: int, tokenizer: Any = None, cfg: Any = None) -> GgufVocab:
    """The GGUF tokenizer of ``tokenizer`` (or of the HF tokenizer in ``src_dir``), padded to the
    model's ``vocab_size`` with UNUSED ``[PAD{i}]`` tokens as ``convert_hf_to_gguf`` pads; refuses
    (:class:`ExportRefusedError`, one line) any tokenizer llama.cpp would not reproduce exactly."""
    import gguf

    src = Path(src_dir) if src_dir is not None else None
    tok, spm_path = _load_hf_tokenizer(src, tokenizer)
    if tok is None:
        return GgufVocab()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise _vocab_refusal(f"{type(tok).__name__} is not a fast (tokenizers) tokenizer, so its algorithm cannot be checked")
    tj = json.loads(backend.to_str())
    kind = tj["model"].get("type")
    if kind != "BPE":
        raise _vocab_refusal(
            f"a {kind} model: llama.cpp's llama/gpt2 tokenizers are BPE (pairs merged by score or rank), "
            + ("which segments text differently from Unigram's best-likelihood split" if kind == "Unigram" else "not this algorithm")
        )
    vocab, merges = _bpe_parts(tj)
    gpt2 = not tj["model"].get("byte_fallback") and any(p.get("type") == "ByteLevel" for p in _walk(tj.get("pre_tokenizer")))
    unk = getattr(tok, "unk_token", None)  # an UNKNOWN token in SPM vocabularies; gpt2 ones have none (convert_hf_to_gguf)
    text, types_by_id = _token_table(tj, vocab, unk if isinstance(unk, str) and not gpt2 else None)
    n = max(text) + 1 if text else 0
    if n > vocab_size:
        raise ExportRefusedError(f"the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}")
    pad = int(gguf.TokenType.UNUSED)
    names = [text.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [types_by_id.get(i, pad) for i in range(vocab_size)]
    dupes = [t for t, c in Counter(names).items() if c > 1]
    if dupes:
        raise _vocab_refusal(f"token text {sorted(dupes)[0]!r} appears at more than one id (llama.cpp maps text to one id)")
    out = GgufVocab(tokens=[t.encode("utf-8") for t in names], types=types)
    if gpt2:
        out.model = "gpt2"
        chk = tok.encode(GGUF_CHKTXT)
        digest = hashlib.sha256(str(chk).encode()).hexdigest()
        if digest not in GGUF_PRE_TOKENIZERS:
            raise _vocab_refusal(
                f"its BPE pre-tokenizer is not one llama.cpp knows (convert_hf_to_gguf hash {digest}; known: "
                f"{', '.join(name for name, _ in GGUF_PRE_TOKENIZERS.values())})"
            )
        out.pre, ignore_merges = GGUF_PRE_TOKENIZERS[digest]
        if bool(tj["model"].get("ignore_merges")) != ignore_merges:
            raise _vocab_refusal(f"ignore_merges={bool(tj['model'].get('ignore_merges'))} but llama.cpp's {out.pre!r} uses {ignore_merges}")
        out.merges = [f"{a} {b}" for a, b in merges]
        out.add_space_prefix = False
    else:
        out.model, out.pre = "llama", "default"
        if not tj["model"].get("byte_fallback"):
            raise _vocab_refusal("SentencePiece-style BPE without byte fallback (llama.cpp's SPM tokenizer has no <unk> for unknown characters)")
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
        if missing:
            raise _vocab_refusal(f"byte fallback without the byte token {missing[0]}")
        out.add_space_prefix = _spm_space_prefix(tj)
        for i, t in enumerate(names):
            if types[i] == int(gguf.TokenType.NORMAL) and _BYTE_TOKEN.fullmatch(t):
                types[i] = int(gguf.TokenType.BYTE)
        if spm_path is not None:  # SentencePiece's own scores and piece types, as convert_hf_to_gguf
            try:
                sp, sp_types, spec = _sentencepiece_model(spm_path)
            except Exception as exc:  # noqa: BLE001
                raise _vocab_refusal(f"cannot read {spm_path}: {exc}") from None
            if spec["model_type"] != 2:
                raise _vocab_refusal(f"{spm_path.name} is a SentencePiece {('UNIGRAM', 'BPE', 'WORD', 'CHAR')[spec['model_type'] - 1]} model; llama.cpp's SPM tokenizer is BPE")
            if spec["treat_whitespace_as_suffix"]:
                raise _vocab_refusal(f"{spm_path.name} treats whitespace as a suffix")
            if sp.vocab_size() > vocab_size:
                raise ExportRefusedError(f"the tokenizer has {sp.vocab_size()} tokens but the model's vocabulary is {vocab_size}")
            scores = [-1000.0] * vocab_size
            for i in range(sp.vocab_size()):
                piece = sp.IdToPiece(i)
                if names[i] != piece:
                    raise _vocab_refusal(f"{spm_path.name} has {piece!r} at id {i}, tokenizer.json {names[i]!r}")
                scores[i] = float(sp.GetScore(i))
                if types_by_id.get(i) == int(gguf.TokenType.NORMAL) or sp_types[i] != int(gguf.TokenType.NORMAL):
                    types[i] = sp_types[i]  # unknown/control/user-defined/unused/byte from the model proto
        else:  # scores from tokenizer.json's merges
            scores = _scores_from_merges(names, types, merges)
        reason = _spm_merge_refusal(names, types, scores, merges)
        if reason:
            raise _vocab_refusal(reason)
        out.scores = scores
    out.special_ids, out.add_bos, out.add_eos = _hf_specials(tok, out.tokens, cfg)
    template = getattr(tok, "chat_template", None)
    out.chat_template = template if isinstance(template, str) else None
    return out


def _scores_from_merges(names: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """SPM scores for a tokenizer.json without its ``tokenizer.model``.  Control, unknown and byte
    tokens score 0, added and padding tokens -1000 (as SentencePiece and convert_hf_to_gguf).  When the
    tokens produced by the merges come in increasing id order, as in a vocabulary converted from
    SentencePiece, normal token ``i`` scores ``first - i`` (``first`` the lowest normal id):
    SentencePiece's own BPE scores.  Otherwise the scores follow the merge ranks."""
    import gguf

    normal = int(gguf.TokenType.NORMAL)
    scores = [0.0 if t in (int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE)) else -1000.0 for t in types]
    ids = {t: i for i, t in enumerate(names)}
    order: list[int] = []
    for a, b in merges:
        i = ids.get(a + b)
        if i is not None and (not order or order[-1] != i):
            order.append(i)
    normal_ids = [i for i, t in enumerate(types) if t == normal]
    if not normal_ids:
        return scores
    if all(x < y for x, y in zip(order, order[1:])):
        first = normal_ids[0]
        for i in normal_ids:
            scores[i] = float(first - i)
    else:
        rank = {i: r for r, i in reversed(list(enumerate(order)))}
        for i in normal_ids:
            scores[i] = float(-rank.get(i, len(order)))
    return scores


# --------------------------------------------------------------------------- gguf tensors
# llama.cpp's qwen2moe graph gates the shared expert by sigmoid(w . x), computed as silu(z) / z
# (src/models/qwen2moe.cpp): a zero gate weight, exact in transformers, gives 0/0 = NaN there.  The
# GGUF gate weight is therefore this power of two in every entry: z = 2^-64 * sum(x) is a normal f32
# whenever |sum(x)| > 2^-61 and below 2^-26 whenever |sum(x)| < 2^38, where silu(z) / z = z / (1 + 1) / z
# = 0.5 exactly, as sigmoid(z) is in fp32 arithmetic; the doubled shared down-projection undoes it.  (A
# token whose normalised hidden state sums to below 2^-61 in magnitude would lose that; the tensor
# stays f32 in every --dtype and llama.cpp's quantizer leaves 1-D tensors alone.)
GGUF_SHEXP_GATE = 2.0 ** -64


def _gguf_array(dtype: str) -> Callable[..., Any]:
    """Tensor -> numpy in the GGUF's dtype (``keep_f32``: norms, routers, gates stay f32)."""
    import numpy as np

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    big = np.float16 if dtype == "f16" else np.float32

    def arr(t: torch.Tensor, keep_f32: bool = False) -> Any:
        a = t.detach().to(torch.float32).contiguous().cpu().numpy()
        return a if keep_f32 else a.astype(big, copy=False)

    return arr


def _gguf_common_tensors(model: MoefyForCausalLM, arr: Callable[..., Any], interleave_rope: bool, untie: bool) -> dict[str, Any]:
    """Embeddings, norms, attention and output, llama.cpp names.  ``interleave_rope``: q/k rows in
    llama.cpp's interleaved RoPE order (``llama``; ``qwen2moe`` is NEOX, HF's order); q/k/v biases
    when the model has them; ``untie``: ``output.weight`` even for tied embeddings."""
    cfg = model.config.to_base_config()
    base = base_model(model)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out: dict[str, Any] = {"token_embd.weight": arr(base.model.embed_tokens.weight)}
    for i, layer in enumerate(base.model.layers):
        attn = layer.self_attn
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = arr(layer.input_layernorm.weight, keep_f32=True)
        q, k = attn.q_proj.weight, attn.k_proj.weight
        out[p + "attn_q.weight"] = arr(permute_qk(q, n_head) if interleave_rope else q)
        out[p + "attn_k.weight"] = arr(permute_qk(k, n_kv) if interleave_rope else k)
        out[p + "attn_v.weight"] = arr(attn.v_proj.weight)
        for name, proj, heads in (("attn_q", attn.q_proj, n_head), ("attn_k", attn.k_proj, n_kv), ("attn_v", attn.v_proj, 0)):
            if proj.bias is not None:
                b = permute_qk(proj.bias, heads) if interleave_rope and heads else proj.bias
                out[p + name + ".bias"] = arr(b, keep_f32=True)
        out[p + "attn_output.weight"] = arr(attn.o_proj.weight)
        out[p + "ffn_norm.weight"] = arr(layer.post_attention_layernorm.weight, keep_f32=True)
    out["output_norm.weight"] = arr(base.model.norm.weight, keep_f32=True)
    if untie or not cfg.tie_word_embeddings:
        out["output.weight"] = arr(base.get_output_embeddings().weight)
    return out


def gguf_tensors(model: MoefyForCausalLM, dtype: str = "f32", align: int = 1) -> dict[str, Any]:
    """The ``llama``-architecture GGUF tensors (numpy, llama.cpp names and layouts) of an exactly
    representable model; experts zero-padded to the largest, rounded up to a multiple of ``align``."""
    _refuse(gguf_refusal(model))
    arr = _gguf_array(dtype)
    out = _gguf_common_tensors(model, arr, interleave_rope=True, untie=False)
    layers = moe_layers(model)
    width = expert_width([m for m in layers if m is not None], align)
    for i, mlp in enumerate(layers):
        assert mlp is not None
        p = f"blk.{i}."
        gate, up, down, router = _expert_tensors(mlp, width)
        out[p + "ffn_gate_inp.weight"] = arr(router, keep_f32=True)  # routing decisions stay full precision
        out[p + "ffn_gate_exps.weight"] = arr(gate)
        out[p + "ffn_up_exps.weight"] = arr(up)
        out[p + "ffn_down_exps.weight"] = arr(down)
    return dict(sorted(out.items(), key=lambda kv: _gguf_order(kv[0])))


def gguf_qwen2moe_tensors(model: MoefyForCausalLM, dtype: str = "f32", align: int = 1) -> dict[str, Any]:
    """The ``qwen2moe``-architecture GGUF tensors of an exactly representable model: routed experts
    as in :func:`gguf_tensors` (zero-padded to one width), the shared neurons as the shared expert
    (``ffn_{gate,up,down}_shexp``, zero-padded to one width, down-projection doubled) with the gate
    ``ffn_gate_inp_shexp`` = :data:`GGUF_SHEXP_GATE` (sigmoid = 0.5); a model without shared
    neurons gets a one-neuron all-zero shared expert; both widths rounded up to a multiple of
    ``align``.  ``output.weight`` is always written (the qwen2moe loader requires it)."""
    _refuse(gguf_qwen2moe_refusal(model))
    arr = _gguf_array(dtype)
    out = _gguf_common_tensors(model, arr, interleave_rope=False, untie=True)
    layers = moe_layers(model)
    mlps = [m for m in layers if m is not None]
    width = expert_width(mlps, align)
    s_width = shared_width(mlps, align)
    for i, mlp in enumerate(layers):
        assert mlp is not None
        p = f"blk.{i}."
        gate, up, down, router = _expert_tensors(mlp, width)
        out[p + "ffn_gate_inp.weight"] = arr(router, keep_f32=True)
        out[p + "ffn_gate_exps.weight"] = arr(gate)
        out[p + "ffn_up_exps.weight"] = arr(up)
        out[p + "ffn_down_exps.weight"] = arr(down)
        s_gate, s_up, s_down = _shared_tensors(mlp, s_width)
        out[p + "ffn_gate_inp_shexp.weight"] = arr(torch.full((mlp.hidden_size,), GGUF_SHEXP_GATE), keep_f32=True)
        out[p + "ffn_gate_shexp.weight"] = arr(s_gate)
        out[p + "ffn_up_shexp.weight"] = arr(s_up)
        out[p + "ffn_down_shexp.weight"] = arr(s_down * 2)  # sigmoid = 0.5, exactly undone
    return dict(sorted(out.items(), key=lambda kv: _gguf_order(kv[0])))


def _gguf_order(name: str) -> tuple[int, int, str]:
    """Token embedding, then block by block, then the output (the order convert_hf_to_gguf writes)."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


# --------------------------------------------------------------------------- gguf writers
@dataclass(frozen=True)
class GgufArch:
    """One llama.cpp architecture a GGUF is written as: its refusal, tensors and own keys."""

    name: str  # general.architecture
    fmt: str  # moefy export --format
    refusal: Callable[[MoefyForCausalLM], str | None]
    tensors: Callable[[MoefyForCausalLM, str, int], dict[str, Any]]  # (model, dtype, align)
    add_keys: Callable[[Any, MoefyForCausalLM, int], None]  # (GGUFWriter, model, align): the architecture's own keys
    gating_note: str  # how llama.cpp weights the chosen experts, for general.description


def _llama_keys(w: Any, model: MoefyForCausalLM, align: int) -> None:
    import gguf

    w.add_feed_forward_length(expert_width([m for m in moe_layers(model) if m is not None], align))
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)


def _qwen2moe_keys(w: Any, model: MoefyForCausalLM, align: int) -> None:
    mlps = [m for m in moe_layers(model) if m is not None]
    w.add_feed_forward_length(model.config.to_base_config().intermediate_size)
    w.add_expert_feed_forward_length(expert_width(mlps, align))
    w.add_expert_shared_feed_forward_length(shared_width(mlps, align))


GGUF_ARCHS = {
    "gguf": GgufArch("llama", "gguf", gguf_refusal, gguf_tensors, _llama_keys,
                     "llama.cpp weights experts by softmax renormalised over the top-k"),
    "gguf-qwen2moe": GgufArch("qwen2moe", "gguf-qwen2moe", gguf_qwen2moe_refusal, gguf_qwen2moe_tensors, _qwen2moe_keys,
                              "llama.cpp weights experts by the softmax over all experts (not renormalised); "
                              "shared neurons are the shared expert"),
}


def _write_gguf_as(
    arch: GgufArch, model: MoefyForCausalLM, out: str | Path, src_dir: str | Path | None = None,
    tokenizer: Any = None, overwrite: bool = False, dtype: str = "f32", align: int = 1,
) -> Path:
    """One ``.gguf`` file of ``arch``: its tensors and keys, the common hyperparameters and the tokenizer."""
    import gguf

    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ConfigError(f"--gguf-align must be a positive integer, got {align!r}")
    tensors = arch.tensors(model, dtype, align)  # refuses before anything is written
    cfg = model.config.to_base_config()
    m0 = moe_layers(model)[0]
    assert m0 is not None
    src = Path(src_dir) if src_dir is not None else None
    vocab = gguf_vocab(src, cfg.vocab_size, tokenizer, cfg)  # refuses before anything is written
    out = prepare_output(out, overwrite)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; the {arch.fmt} format writes one file (e.g. {out / 'model.gguf'})")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(str(tmp), arch.name)
        name = (src.name if src is not None else "moefy") or "moefy"
        w.add_name(name)
        w.add_description(f"moefy MoE ({_describe(model, align)}); {arch.gating_note}")
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_expert_count(m0.n_experts)
        w.add_expert_used_count(int(m0.top_k))
        arch.add_keys(w, model, align)
        w.add_tokenizer_model(vocab.model)
        if vocab.tokens:
            assert vocab.pre is not None and vocab.add_space_prefix is not None
            w.add_tokenizer_pre(vocab.pre)
            w.add_token_list(vocab.tokens)
            w.add_token_types(vocab.types)
            if vocab.scores is not None:
                w.add_token_scores(vocab.scores)
            if vocab.merges:
                w.add_token_merges(vocab.merges)
            w.add_add_space_prefix(vocab.add_space_prefix)
            for kind, tid in vocab.special_ids.items():
                getattr(w, f"add_{kind}_token_id")(tid)
            w.add_add_bos_token(vocab.add_bos)
            w.add_add_eos_token(vocab.add_eos)
            if vocab.chat_template:
                w.add_chat_template(vocab.chat_template)
        else:
            for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                            ("pad_token_id", w.add_pad_token_id)):
                v = getattr(cfg, key, None)
                if isinstance(v, int):
                    fn(v)
        for tname, data in tensors.items():
            w.add_tensor(tname, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would keep a serving user from reading it
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_gguf(
    model: MoefyForCausalLM, out: str | Path, src_dir: str | Path | None = None,
    tokenizer: Any = None, overwrite: bool = False, dtype: str = "f32", align: int = 1, **_: Any,
) -> Path:
    """One ``.gguf`` file for llama.cpp (``llama`` architecture, Mixtral-style experts)."""
    return _write_gguf_as(GGUF_ARCHS["gguf"], model, out, src_dir, tokenizer, overwrite, dtype, align)


def write_gguf_qwen2moe(
    model: MoefyForCausalLM, out: str | Path, src_dir: str | Path | None = None,
    tokenizer: Any = None, overwrite: bool = False, dtype: str = "f32", align: int = 1, **_: Any,
) -> Path:
    """One ``.gguf`` file for llama.cpp (``qwen2moe`` architecture: routed experts plus a shared expert)."""
    return _write_gguf_as(GGUF_ARCHS["gguf-qwen2moe"], model, out, src_dir, tokenizer, overwrite, dtype, align)


WRITERS: dict[str, Callable[..., Path]] = {
    "hf": write_hf,
    "mixtral": write_mixtral,
    "qwen2-moe": write_qwen2_moe,
    "gguf": write_gguf,
    "gguf-qwen2moe": write_gguf_qwen2moe,
}
REFUSALS: dict[str, Callable[[MoefyForCausalLM], str | None]] = {
    "hf": lambda model: None,
    "mixtral": mixtral_refusal,
    "qwen2-moe": qwen2_moe_refusal,
    "gguf": gguf_refusal,
    "gguf-qwen2moe": gguf_qwen2moe_refusal,
}


def export_model(
    model: MoefyForCausalLM, fmt: str, out: str | Path, src_dir: str | Path | None = None,
    tokenizer: Any = None, overwrite: bool = False, dtype: str = "f32", gating: str | None = None,
    gguf_align: int = 1,
) -> Path:
    """Write ``model`` as ``fmt`` to ``out``.  ``gating`` exports it with that gating instead of its
    own (the export then computes another function unless the model was trained with it).  The
    caller's ``model`` is never changed: its gating is set for the export only and restored after,
    also when the export fails.  ``gguf_align`` (GGUF formats): expert widths rounded up to a
    multiple of it with zero neurons (exact), e.g. 32 so that llama.cpp's 32-block quantizations
    (Q8_0, Q5_0, Q4_0) fit every expert tensor instead of keeping it F16."""
    if fmt not in WRITERS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    if gguf_align != 1 and fmt not in GGUF_ARCHS:
        raise ConfigError(f"--gguf-align applies to the GGUF formats ({', '.join(GGUF_ARCHS)}), not {fmt}")
    kw: dict[str, Any] = {"align": gguf_align} if fmt in GGUF_ARCHS else {}
    if gating is None:
        return WRITERS[fmt](model, out, src_dir=src_dir, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype, **kw)
    if gating not in GATINGS:
        raise ConfigError(f"unknown gating {gating!r}; choose one of {', '.join(GATINGS)}")
    if fmt == "hf":
        src_dir = None  # the files on disk have the old gating
    saved = (model.config.gating, [None if mlp is None else mlp.gating for mlp in moe_layers(model)])
    try:
        set_gating(model, gating)
        return WRITERS[fmt](model, out, src_dir=src_dir, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype, **kw)
    finally:  # the writers read the gating while converting; nothing keeps a reference to it
        model.config.gating = saved[0]
        for mlp, g in zip(moe_layers(model), saved[1]):
            if mlp is not None:
                mlp.gating = g


def export_checkpoint(
    src: str | Path, fmt: str, out: str | Path, overwrite: bool = False, dtype: str = "f32", gguf_align: int = 1,
    log: Callable[[str], None] | None = None,
) -> Path:
    """``moefy export``: load the moefy checkpoint ``src`` and write it as ``fmt`` to ``out``
    (``log``: told what the export holds, and when padding makes the engine run more neurons)."""
    if fmt not in WRITERS:
        raise ConfigError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    if gguf_align != 1 and fmt not in GGUF_ARCHS:
        raise ConfigError(f"--gguf-align applies to the GGUF formats ({', '.join(GGUF_ARCHS)}), not {fmt}")
    if gguf_align < 1:
        raise ConfigError(f"--gguf-align must be a positive integer, got {gguf_align}")
    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise ConfigError("--out must differ from the input checkpoint")
    prepare_output(out, overwrite)  # fail fast, before loading the model
    if fmt == "hf":  # a file copy: no need to load the weights
        return write_hf(None, out, src_dir=check_moefy_dir(src), overwrite=overwrite)
    model = load_moefy_dir(src)
    path = export_model(model, fmt, out, src_dir=src, overwrite=overwrite, dtype=dtype, gguf_align=gguf_align)
    if log is not None and any(m is not None for m in moe_layers(model)):
        log(f"{fmt}: {_describe(model, gguf_align if fmt in GGUF_ARCHS else HF_ALIGN)}")
    return path


__all__ = [
    "FORMATS", "GGUF_ARCHS", "GGUF_SHEXP_GATE", "WRITERS", "GgufArch", "GgufVocab", "check_moefy_dir", "export_checkpoint",
    "export_model", "gguf_qwen2moe_refusal", "gguf_qwen2moe_tensors", "gguf_refusal", "gguf_tensors", "gguf_vocab", "load_moefy_dir",
    "mixtral_refusal", "permute_qk", "qwen2_moe_refusal", "set_gating", "to_mixtral", "to_qwen2_moe",
    "unpermute_qk", "write_gguf", "write_gguf_qwen2moe", "write_hf", "write_mixtral", "write_qwen2_moe",
]
