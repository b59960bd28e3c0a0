"""Write a checkpoint's weights shard by shard from per-layer safetensors files.

The layer-by-layer conversion leaves one safetensors file per unit (the tensors before the
decoder layers, each decoder layer, the tensors after them) in its work directory.  This module
groups consecutive units into shards of at most ``max_shard_size`` bytes (a unit larger than that
gets a shard of its own), as transformers' ``save_pretrained`` does tensor by tensor, and writes

- one unit: a hard link (or copy) of the unit file,
- several units: one safetensors file whose header lists every tensor and whose data is the
  units' data copied in chunks (never a whole tensor in memory),

named ``model.safetensors`` when there is one shard, else ``model-00001-of-0000N.safetensors``
with a ``model.safetensors.index.json`` (``metadata.total_size``, ``metadata.total_parameters``,
``weight_map``) exactly as transformers writes it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 64 << 20


def _header(path: Path) -> tuple[dict[str, dict[str, object]], dict[str, str] | None, int]:
    """(tensors, metadata, offset of the data) of a safetensors file."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", None)
    return header, meta, 8 + n


def _data_size(header: dict[str, dict[str, object]]) -> int:
    return max((int(v["data_offsets"][1]) for v in header.values()), default=0)  # type: ignore[index]


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def merge(units: list[Path], out: Path, metadata: dict[str, str] | None = None) -> None:
    """Concatenate safetensors files (disjoint tensor names) into one, copying data in chunks."""
    merged: dict[str, object] = {}
    parts: list[tuple[Path, int, int]] = []
    base = 0
    for u in units:
        header, _, start = _header(u)
        size = _data_size(header)
        for k, v in header.items():
            if k in merged:
                raise ValueError(f"tensor {k} is in more than one unit")
            lo, hi = v["data_offsets"]  # type: ignore[misc]
            merged[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [base + lo, base + hi]}
        parts.append((u, start, size))
        base += size
    merged = dict(sorted(merged.items(), key=lambda kv: kv[1]["data_offsets"][0]))  # type: ignore[index]
    merged["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(merged, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as dst:
        dst.write(len(blob).to_bytes(8, "little"))
        dst.write(blob)
        for u, start, size in parts:
            with open(u, "rb") as src:
                src.seek(start)
                left = size
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise OSError(f"{u} is shorter than its header says")
                    dst.write(chunk)
                    left -= len(chunk)
    os.replace(tmp, out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_shards(units: list[Path], out_dir: Path, max_shard_size: int) -> list[str]:
    """Write ``units`` (in order) into ``out_dir`` as transformers' shards; returns the file names."""
    sizes, counts, keys = [], [], []
    for u in units:
        header, _, _ = _header(u)
        sizes.append(_data_size(header))
        counts.append(sum(_numel(v["shape"]) for v in header.values()))  # type: ignore[arg-type]
        keys.append(list(header))
    groups: list[list[int]] = []
    current: list[int] = []
    current_size = 0
    for j, size in enumerate(sizes):
        if size > max_shard_size:
            if current:
                groups.append(current)
                current, current_size = [], 0
            groups.append([j])
            continue
        if current and current_size + size > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append(j)
        current_size += size
    if current:
        groups.append(current)
    n = len(groups)
    names = [SAFE_WEIGHTS_NAME] if n == 1 else [f"model-{g + 1:05d}-of-{n:05d}.safetensors" for g in range(n)]
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups):
        files = [units[j] for j in group]
        if len(files) == 1:
            _link_or_copy(files[0], out_dir / name)
        else:
            merge(files, out_dir / name)
        for j in group:
            weight_map.update({k: name for k in keys[j]})
    if n > 1:
        index = {
            "metadata": {"total_parameters": sum(counts), "total_size": sum(sizes)},
            "weight_map": weight_map,
        }
        (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
