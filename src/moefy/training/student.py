"""The student of recovery training: a moefy checkpoint made trainable, and back.

Each :class:`~moefy.hf.modeling_moefy.MoefyMLP` becomes a :class:`~moefy.dotmoe.DotMoeLayer`
over the checkpoint's own neuron order (shared block, then experts contiguously): the
simulated sparse FFN whose forward equals the exported MoE, with straight-through gradients
for the router and, for ``dot``, a learnable Sinkhorn assignment started at the checkpoint's
split. After training each layer is exported again (neurons permuted to the learned split)
and its provenance (the dense neuron index of every neuron) composed with the checkpoint's.

Parameter groups are chosen by name, so every weight of the network has a group, a learning
rate and can be frozen: ``experts`` (FFN gate/up/down), ``routers``, ``assignment``
(the affinity), ``attention``, ``norms``, ``embeddings``, ``lm_head`` and ``other``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import FFNWeights
from ..dotmoe import DotMoeLayer
from ..errors import ConfigError
from ..export import to_moefy_model
from ..hf.modeling_moefy import MoefyForCausalLM, MoefyMLP
from ..splits import Split

GROUPS = ("assignment", "routers", "experts", "embeddings", "lm_head", "norms", "attention", "other")
_PATTERNS = [
    ("assignment", re.compile(r"\.mlp\.affinity$")),
    ("routers", re.compile(r"\.mlp\.(router\.|log_alpha$)")),
    ("experts", re.compile(r"\.mlp\.")),
    ("embeddings", re.compile(r"embed_tokens|wte|embed_positions")),
    ("lm_head", re.compile(r"(^|\.)lm_head\.")),
    ("norms", re.compile(r"norm")),
    ("attention", re.compile(r"self_attn|attention")),
]


def group_of(name: str) -> str:
    for group, pattern in _PATTERNS:
        if pattern.search(name):
            return group
    return "other"


@dataclass
class Student:
    """The trainable base model and what training needs to know about it."""

    model: nn.Module  # the base causal LM (e.g. LlamaForCausalLM) with DotMoeLayer FFNs
    layers: dict[int, DotMoeLayer]
    neurons: dict[int, list[int] | None]  # checkpoint neuron index -> dense neuron index, per layer
    initial_assign: dict[int, torch.Tensor] = field(default_factory=dict)

    def neurons_moved(self) -> dict[int, int]:
        """Routed neurons whose expert differs from the checkpoint's, per layer."""
        return {i: int((d.hard_assignment().cpu() != self.initial_assign[i]).sum()) for i, d in self.layers.items()}


def _log_exactly(alpha: float) -> torch.Tensor:
    """An fp32 ``log_alpha`` whose fp32 ``exp`` is ``alpha`` itself, so the student routes as the
    checkpoint does (a DotMoeLayer exported ``alpha = exp(log_alpha)``, so one exists; else the nearest)."""
    target = torch.tensor(alpha, dtype=torch.float32)
    t = torch.tensor(math.log(alpha), dtype=torch.float32)
    for _ in range(16):
        e = t.exp()
        if e == target:
            break
        t = torch.nextafter(t, torch.tensor(math.inf if e < target else -math.inf))
    return t


def _layer_from_mlp(mlp: MoefyMLP, learn_assignment: bool, rounding: str, sinkhorn_iters: int, margin: float) -> DotMoeLayer:
    if mlp.gating not in ("mask", "softmax", "softmax-renorm", "lapsum"):
        raise ConfigError(f"moefy train supports mask, softmax, softmax-renorm and LapSum routing; this checkpoint uses {mlp.gating!r}")
    bias = mlp.gate_proj.bias is not None
    ffn = FFNWeights(
        mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
        mlp.gate_proj.bias if bias else None, mlp.up_proj.bias if bias else None, mlp.down_proj.bias if bias else None,
    )
    n_shared = mlp.n_shared
    shared = torch.arange(n_shared)
    experts = [torch.arange(mlp.offsets[e], mlp.offsets[e + 1]) for e in range(mlp.n_experts)]
    lapsum = mlp.router_type == "lapsum"
    dot = DotMoeLayer(
        ffn, mlp.act_fn, mlp.hidden_act, Split(shared, experts), max(1, int(round(float(mlp.top_k)))) if mlp.n_experts else 1,
        learn_assignment=learn_assignment, init_margin=margin, rounding=rounding, sinkhorn_iters=sinkhorn_iters,
        router_type="lapsum" if lapsum else "topk", max_active=mlp.max_active,
        gating="mask" if lapsum else mlp.gating,
    )
    with torch.no_grad():
        if mlp.n_experts:
            dot.router.weight.copy_(mlp.router.weight.float())
        if lapsum:
            dot.log_alpha.copy_(_log_exactly(mlp.lapsum_alpha))
            dot.threshold.fill_(mlp.lapsum_threshold)
            dot.k_budget = float(mlp.top_k)
    return dot.to(mlp.gate_proj.weight.device)


def build_student(
    moe: MoefyForCausalLM, learn_assignment: bool, neurons: list[list[int] | None] | None = None,
    rounding: str = "greedy", sinkhorn_iters: int = 30, margin: float = 3.0,
) -> Student:
    """Swap every MoE FFN of ``moe`` for a trainable :class:`DotMoeLayer` (in place)."""
    base = moe.model
    layers: dict[int, DotMoeLayer] = {}
    provenance: dict[int, list[int] | None] = {}
    initial: dict[int, torch.Tensor] = {}
    k = 0
    for i, layer in enumerate(base.model.layers):
        if isinstance(layer.mlp, MoefyMLP):
            dot = _layer_from_mlp(layer.mlp, learn_assignment, rounding, sinkhorn_iters, margin)
            provenance[i] = neurons[k] if neurons is not None and k < len(neurons) else getattr(layer.mlp, "source_neurons", None)
            layer.mlp = dot
            layers[i] = dot
            initial[i] = dot.fixed_assign.detach().cpu().clone()
            k += 1
    if not layers:
        raise ConfigError("the checkpoint has no MoE layer to train")
    return Student(base, layers, provenance, initial)


def set_trainable(model: nn.Module, lrs: dict[str, float], learn_assignment: bool) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters by group; a group with learning rate 0 is frozen. Tied weights belong to the
    first name they appear under (``embed_tokens`` before ``lm_head``)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():  # deduplicates tied weights
        g = group_of(name)
        if g == "assignment" and not learn_assignment:
            p.requires_grad_(False)
            continue
        if name.endswith("log_alpha") and not _is_lapsum_param(model, name):
            p.requires_grad_(False)
            continue
        lr = lrs.get(g, 0.0)
        p.requires_grad_(lr > 0)
        if lr > 0:
            groups[g].append((name, p))
    return groups


def _is_lapsum_param(model: nn.Module, name: str) -> bool:
    mod = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(mod, DotMoeLayer) and mod.router_type == "lapsum"


def export_student(student: Student) -> tuple[MoefyForCausalLM, list[list[int] | None]]:
    """Freeze each learned split, permute neurons into experts, wrap as a moefy model. Returns
    the model and, per MoE layer, the dense neuron index of each neuron."""
    provenance: list[list[int] | None] = []
    for i, d in student.layers.items():
        d.freeze_assignment()
        for p in d.parameters():
            p.requires_grad_(False)
        d.eval()
    for p in student.model.parameters():
        p.requires_grad_(False)
    moe = to_moefy_model(student.model, router="lapsum" if any(d.router_type == "lapsum" for d in student.layers.values()) else "topk")
    for i, layer in enumerate(moe.model.model.layers):
        if i in student.layers:
            perm = layer.mlp.source_neurons
            old = student.neurons.get(i)
            layer.mlp.source_neurons = [old[j] for j in perm] if old is not None else perm
            provenance.append(layer.mlp.source_neurons)
    return moe, provenance
