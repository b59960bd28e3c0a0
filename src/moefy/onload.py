"""Layer-by-layer onloading for the layer-wise stage (llm-compressor's sequential pattern).

The dense model is a skeleton on the meta device (accelerate's ``init_empty_weights``: no weight
memory; non-persistent buffers such as rotary frequencies stay real).  Only the tensors before the
decoder layers (the embeddings) are read at the start; each decoder layer's weights are read from
the safetensors shards (``safe_open``, only that layer's keys) when its turn comes, placed on the
compute device in the conversion dtype, converted, written to the work directory and freed again.
Peak memory is one layer plus the calibration activations, whatever the number of layers.

Checkpoints whose tensor names or shapes differ from what transformers' model class holds (ones that
need transformers' key conversions) are refused here; :func:`checkpoint_problem` says why, and the
runner then loads the whole model instead (or refuses ``--onload``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CorruptModelError
from .hf.modeling_moefy import MoefyMLP

DTYPE_OF = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class SafetensorsCheckpoint:
    """The tensors of a model directory's safetensors files (one file or an index of shards)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for k, v in read_header(f).items():
                self.tensors[k] = TensorInfo(f, v["dtype"], tuple(v["shape"]))

    def floating_dtype(self) -> torch.dtype | None:
        """The most common floating dtype of the stored weights (by element count)."""
        count: dict[torch.dtype, int] = defaultdict(int)
        for t in self.tensors.values():
            dt = DTYPE_OF.get(t.dtype)
            if dt is not None and dt.is_floating_point:
                count[dt] += t.numel
        return max(count, key=count.__getitem__) if count else None

    def read(self, keys: dict[str, str], dtypes: dict[str, torch.dtype], device: torch.device) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` for ``keys`` (``name -> stored key``), cast to ``dtypes[name]`` on ``device``."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for name, key in keys.items():
            if key not in self.tensors:
                raise CorruptModelError(f"{self.path}: tensor {key} is missing from the safetensors files")
            by_file[self.tensors[key].file].append((name, key))
        out: dict[str, torch.Tensor] = {}
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for name, key in items:
                    out[name] = fh.get_tensor(key).to(device=device, dtype=dtypes[name])
        return out


@dataclass
class Layout:
    """Where a model's tensors are: the keys before the decoder layers (``head``), each layer's keys
    relative to it, and the keys after them (``tail``), all in state-dict order, tied copies dropped."""

    layers_prefix: str  # e.g. "model.layers"
    head: list[str]
    layers: list[list[str]]
    tail: list[str]
    dtypes: dict[str, torch.dtype]  # full key -> the dtype the model holds it in
    output_embedding: set[str]  # keys of an untied LM head (not needed by the layer-wise stage)


def layout(model: nn.Module, layers: nn.ModuleList) -> Layout:
    prefix = next(n for n, m in model.named_modules() if m is layers)
    params = dict(model.named_parameters())  # tied weights once, under their first name
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    sd = model.state_dict(keep_vars=True)
    keys = [k for k in sd if k in params or k not in all_params]
    head: list[str] = []
    tail: list[str] = []
    per_layer: list[list[str]] = [[] for _ in layers]
    for k in keys:
        if k.startswith(prefix + "."):
            i, _, rest = k[len(prefix) + 1 :].partition(".")
            per_layer[int(i)].append(rest)
        elif any(per_layer):
            tail.append(k)
        else:
            head.append(k)
    out_emb: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    emb_out = get_out() if callable(get_out) else None
    emb_in = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb_out is not None and emb_out is not emb_in and getattr(emb_out, "weight", None) is not getattr(emb_in, "weight", None):
        names = {id(p): n for n, p in model.named_parameters()}
        out_emb = {names[id(p)] for p in emb_out.parameters() if id(p) in names}
    return Layout(prefix, head, per_layer, tail, {k: sd[k].dtype for k in keys}, out_emb)


def checkpoint_problem(ckpt: SafetensorsCheckpoint, lay: Layout, model: nn.Module) -> str | None:
    """Why ``ckpt`` cannot be read tensor by tensor into ``model`` (None: it can)."""
    sd = model.state_dict(keep_vars=True)
    wanted = lay.head + lay.tail + [f"{lay.layers_prefix}.{i}.{k}" for i, ks in enumerate(lay.layers) for k in ks]
    for key in wanted:
        info = ckpt.tensors.get(key)
        if info is None:
            return f"its safetensors files have no tensor {key} (names need transformers' conversion)"
        if tuple(info.shape) != tuple(sd[key].shape):
            return f"tensor {key} has shape {list(info.shape)}, the model class expects {list(sd[key].shape)}"
    return None


def assign_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the (meta) parameter or buffer ``key`` of ``model``."""
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters.get(leaf)
    if old is not None or leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The dense model for ``config`` with every weight on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()
    return model.eval()


def moe_mlp_from_spec(spec: dict[str, Any], device: torch.device | str = "meta") -> MoefyMLP:
    """An empty :class:`MoefyMLP` (weights on ``device``) as :func:`moefy.export.mlp_spec` describes it."""
    with torch.device(device):
        mlp = MoefyMLP(
            spec["hidden_size"], spec["expert_sizes"], n_shared=spec["n_shared"], top_k=spec["top_k"],
            hidden_act=spec["hidden_act"], bias=spec["bias"], router=spec["router"], gating=spec["gating"],
            lapsum_alpha=spec["lapsum_alpha"], lapsum_threshold=spec["lapsum_threshold"], max_active=spec["max_active"],
        )
    mlp.source_neurons = spec.get("source_neurons")
    return mlp.eval()


class OnloadHost:
    """Decoder layers of a meta skeleton, read from the checkpoint one at a time.

    ``finished`` maps layers converted by an earlier (interrupted) run to their file in the work
    directory (the whole decoder layer, MoE FFN included, as written to the output) and the MoE FFN's
    spec: those are read from there instead."""

    def __init__(
        self, model: nn.Module, layers: nn.ModuleList, ckpt: SafetensorsCheckpoint, device: torch.device,
        finished: dict[int, tuple[Path, dict[str, Any]]] | None = None, output_prefix: str = "model.",
    ) -> None:
        self.model, self.layers, self.ckpt, self.device = model, layers, ckpt, device
        self.lay = layout(model, layers)
        self.finished = dict(finished or {})
        self.output_prefix = output_prefix
        # the tensors before and after the layers (embeddings, final norm), but not an untied LM head:
        # the calibration forward runs up to the first layer only
        keys = [k for k in self.lay.head + self.lay.tail if k not in self.lay.output_embedding]
        for k, v in ckpt.read({k: k for k in keys}, {k: self.lay.dtypes[k] for k in keys}, torch.device("cpu")).items():
            assign_tensor(model, k, v)

    def layer_key(self, i: int, rel: str) -> str:
        return f"{self.lay.layers_prefix}.{i}.{rel}"

    def onload(self, i: int, dense: bool = False) -> nn.Module:
        """Layer ``i`` on the device: converted (read from the work directory) when an earlier run
        finished it, unless ``dense``; else (and before the converted one) as in the checkpoint."""
        layer = self.layers[i]
        rel = self.lay.layers[i]
        dtypes = {k: self.lay.dtypes[self.layer_key(i, k)] for k in rel}
        if i in self.finished and not dense:
            path, spec = self.finished[i]
            layer.mlp = moe_mlp_from_spec(spec)
            sd_keys = list(layer.state_dict().keys())
            from safetensors import safe_open

            prefix = self.output_prefix + self.layer_key(i, "")
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for k in sd_keys:
                    tensors[k] = fh.get_tensor(prefix + k).to(self.device)
        else:
            tensors = self.ckpt.read({k: self.layer_key(i, k) for k in rel}, dtypes, self.device)
        layer.load_state_dict(tensors, strict=True, assign=True)
        for p in layer.parameters():
            p.requires_grad_(False)
        return layer

    def offload(self, i: int, layer: nn.Module) -> None:
        layer.to("meta")
