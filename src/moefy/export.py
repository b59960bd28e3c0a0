"""Export: freeze each layer's split, make experts contiguous, write a loadable checkpoint.

The output directory is written beside its final path and renamed into place only once
complete, so a failed or killed export never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .dotmoe import DotMoeLayer
from .errors import OutputExistsError
from .hf.configuration_moefy import MoefyConfig
from .hf.modeling_moefy import MoefyForCausalLM, MoefyMLP

HF_DIR = Path(__file__).parent / "hf"
DROP_BASE_KEYS = ("quantization_config", "_name_or_path", "transformers_version", "auto_map")


def base_config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    for k in DROP_BASE_KEYS:
        d.pop(k, None)
    d["model_type"] = config.model_type
    return d


def mlp_spec(mlp: MoefyMLP) -> dict[str, Any]:
    """Everything needed to rebuild ``mlp`` (and to describe it in the config and ``moefy.json``)."""
    return {
        "hidden_size": mlp.hidden_size, "expert_sizes": list(mlp.expert_sizes), "n_shared": mlp.n_shared,
        "top_k": mlp.top_k, "hidden_act": mlp.hidden_act, "bias": mlp.gate_proj.bias is not None,
        "router": mlp.router_type, "gating": mlp.gating, "lapsum_alpha": mlp.lapsum_alpha,
        "lapsum_threshold": mlp.lapsum_threshold, "max_active": mlp.max_active,
        "source_neurons": getattr(mlp, "source_neurons", None),
    }


def moefy_config(
    base: Any, specs: list[dict[str, Any] | None], hidden_act: str | None = None, router: str = "topk",
    gating: str = "mask",
) -> MoefyConfig:
    """The :class:`MoefyConfig` of ``base`` (the dense model's config) with the MoE FFNs ``specs``
    (:func:`mlp_spec` per decoder layer, ``None`` for a dense one)."""
    layers: list[dict[str, Any] | None] = []
    max_active = None
    for spec in specs:
        if spec is None:
            layers.append(None)
            continue
        hidden_act = spec["hidden_act"]
        entry = {"expert_sizes": spec["expert_sizes"], "n_shared": spec["n_shared"], "top_k": spec["top_k"]}
        if spec["gating"] != "mask":
            gating = spec["gating"]
        if spec["router"] == "lapsum":
            router, gating = "lapsum", "lapsum"
            entry.update(lapsum_alpha=spec["lapsum_alpha"], lapsum_threshold=spec["lapsum_threshold"])
            max_active = spec["max_active"]
        layers.append(entry)
    if hidden_act is None:
        hidden_act = get_adapter(base).act_name(base)
    cfg = MoefyConfig(
        base_config=base_config_dict(base),
        moe_layers=layers,
        hidden_act=hidden_act,
        router=router,
        gating=gating,
        max_active=max_active,
    )
    cfg._attn_implementation = base._attn_implementation  # type: ignore[attr-defined]
    cfg.architectures = ["MoefyForCausalLM"]
    cfg.auto_map = {
        "AutoConfig": "configuration_moefy.MoefyConfig",
        "AutoModelForCausalLM": "modeling_moefy.MoefyForCausalLM",
    }
    return cfg


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a (possibly converted) model keeps its weights in: that of its input embeddings."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else next(model.parameters()).dtype


def to_moefy_model(model: nn.Module, router: str = "topk", gating: str = "mask") -> MoefyForCausalLM:
    """Swap every :class:`DotMoeLayer` for its contiguous :class:`MoefyMLP` (in place, in the
    model's dtype) and wrap the model in :class:`MoefyForCausalLM` (no weights are copied)."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    dtype = model_dtype(model)
    specs: list[dict[str, Any] | None] = []
    for layer in layers:
        mlp = layer.mlp
        if isinstance(mlp, DotMoeLayer):
            mlp = mlp.to_moe_mlp(dtype=dtype)
            layer.mlp = mlp
        specs.append(mlp_spec(mlp) if isinstance(mlp, MoefyMLP) else None)
    cfg = moefy_config(model.config, specs, router=router, gating=gating)
    wrapped = MoefyForCausalLM(cfg, base_model=model)
    wrapped.eval()
    return wrapped


def model_card(record: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in record.get("summary", {}).items())
    return f"""---
library_name: transformers
tags: [moefy, mixture-of-experts, moefication, dot-moe]
---
# {record.get('name', 'moefy MoE')}

A sparse Mixture-of-Experts converted from the dense model `{record.get('source')}` by
[moefy](https://pypi.org/project/moefy/) with method `{record.get('method')}`:
{record.get('n_experts')} experts per FFN, top-{record.get('top_k')} routing,
{record.get('n_shared', 0)} always-active shared neurons per layer
({100 * record.get('active_fraction', 0):.1f}% of FFN neurons active per token).

Calibration: {record.get('calibration', {}).get('source')} ({record.get('calibration', {}).get('tokens')} tokens).

## Load
```python
import moefy  # registers the classes
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH")
# or, without moefy installed:
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
```

## Conversion summary
| quantity | value |
|---|---|
{rows}

{_training_card(record)}
`moefy.json` holds the full record: per-layer expert sizes, neuron indices, losses and timings.
"""


def _training_card(record: dict[str, Any]) -> str:
    runs = record.get("training") or []
    if not runs:
        return ""
    lines = ["## Recovery training", "| run | teacher | data | tokens | steps | kept step | held-out KL | held-out PPL |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(runs, 1):
        kept = next((h for h in r.get("history", []) if h["step"] == r.get("kept_step")), None) or (r.get("history") or [{}])[-1]
        kl, ppl = kept.get("val_kl"), kept.get("val_ppl")
        lines.append(f"| {n} | {r.get('teacher')} | {r.get('data')} | {r.get('tokens')} | {r.get('steps')} | "
                     f"{r.get('kept_step')} | {kl if kl is None else f'{kl:.4f}'} | {ppl if ppl is None else f'{ppl:.2f}'} |")
    return "\n".join(lines) + "\n\n`metrics.jsonl` has the curve of the last run; `recovery.png` plots it.\n"


def prepare_output(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def atomic_write_dir(out: Path, writer: Any, overwrite: bool) -> Path:
    """Run ``writer(tmp_dir)`` then move ``tmp_dir`` to ``out`` in one rename."""
    out = prepare_output(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writer(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


DEFAULT_SHARD_SIZE = "5GB"


def _write_common(tmp: Path, tokenizer: Any, record: dict[str, Any]) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name in ("configuration_moefy.py", "modeling_moefy.py"):
        shutil.copy2(HF_DIR / name, tmp / name)
    (tmp / "moefy.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    (tmp / "README.md").write_text(model_card(record))


def save_checkpoint(
    model: MoefyForCausalLM, tokenizer: Any, out: str | Path, record: dict[str, Any], overwrite: bool = False,
    extra_files: dict[str, Path] | None = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> Path:
    """Write config, safetensors weights (shards of at most ``max_shard_size`` with an index, as
    transformers does), tokenizer, modeling code, ``moefy.json`` and a model card (plus
    ``extra_files``: name in the checkpoint -> file to copy, e.g. training metrics)."""
    from .memory import parse_size

    shard = parse_size(max_shard_size, "--max-shard-size")

    def write(tmp: Path) -> None:
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=shard)
        _write_common(tmp, tokenizer, record)

    return atomic_write_dir(Path(out), write, overwrite)


def save_streamed_checkpoint(
    config: MoefyConfig, units: list[Path], tokenizer: Any, out: str | Path, record: dict[str, Any],
    overwrite: bool = False, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> Path:
    """:func:`save_checkpoint` for a model that is never whole in memory: its weights are the
    safetensors files ``units`` (in state-dict order, output key names, the conversion dtype),
    written shard by shard (:func:`moefy.shards.write_shards`); the directory appears only when complete."""
    from transformers import GenerationConfig

    from .memory import parse_size
    from .shards import write_shards

    shard = parse_size(max_shard_size, "--max-shard-size")

    def write(tmp: Path) -> None:
        write_shards(units, tmp, shard)
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        _write_common(tmp, tokenizer, record)

    return atomic_write_dir(Path(out), write, overwrite)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
