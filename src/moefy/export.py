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


def to_moefy_model(model: nn.Module, router: str = "topk", gating: str = "mask") -> MoefyForCausalLM:
    """Swap every :class:`DotMoeLayer` for its contiguous :class:`MoefyMLP` (in place) and wrap
    the model in :class:`MoefyForCausalLM` (no weights are copied)."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    specs: list[dict[str, Any] | None] = []
    hidden_act = None
    max_active = None
    for layer in layers:
        mlp = layer.mlp
        if isinstance(mlp, DotMoeLayer):
            hidden_act = mlp.hidden_act
            mlp = mlp.to_moe_mlp()
            layer.mlp = mlp
        if isinstance(mlp, MoefyMLP):
            spec = {"expert_sizes": mlp.expert_sizes, "n_shared": mlp.n_shared, "top_k": mlp.top_k}
            if mlp.gating != "mask":
                gating = mlp.gating
            if mlp.router_type == "lapsum":
                router, gating = "lapsum", "lapsum"
                spec.update(lapsum_alpha=mlp.lapsum_alpha, lapsum_threshold=mlp.lapsum_threshold)
                max_active = mlp.max_active
            specs.append(spec)
        else:
            specs.append(None)
    if hidden_act is None:
        hidden_act = adapter.act_name(model.config)
    cfg = MoefyConfig(
        base_config=base_config_dict(model.config),
        moe_layers=specs,
        hidden_act=hidden_act,
        router=router,
        gating=gating,
        max_active=max_active,
    )
    cfg._attn_implementation = model.config._attn_implementation  # type: ignore[attr-defined]
    cfg.architectures = ["MoefyForCausalLM"]
    cfg.auto_map = {
        "AutoConfig": "configuration_moefy.MoefyConfig",
        "AutoModelForCausalLM": "modeling_moefy.MoefyForCausalLM",
    }
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


def save_checkpoint(
    model: MoefyForCausalLM, tokenizer: Any, out: str | Path, record: dict[str, Any], overwrite: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write config, safetensors weights, tokenizer, modeling code, ``moefy.json`` and a model card
    (plus ``extra_files``: name in the checkpoint -> file to copy, e.g. training metrics)."""

    def write(tmp: Path) -> None:
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name in ("configuration_moefy.py", "modeling_moefy.py"):
            shutil.copy2(HF_DIR / name, tmp / name)
        (tmp / "moefy.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        (tmp / "README.md").write_text(model_card(record))

    return atomic_write_dir(Path(out), write, overwrite)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
