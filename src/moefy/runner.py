"""One conversion job end to end, resumable: load -> calibrate -> layer-wise -> e2e -> export.

Progress lives in a work directory beside the output (``.<out>.moefy-work``): the calibration
tokens and every finished layer (safetensors), written atomically as each layer completes.
Rerunning the same command after a crash, a kill or Ctrl-C restores the finished layers and
continues; the work directory is removed once the checkpoint is in place.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from . import __version__, testing_hooks
from .adapters import get_adapter
from .calibration import CalibrationSet, check_paths, from_files, sample_from_model
from .config import ConvertConfig
from .convert import active_fraction, layerwise_stage, make_layer, summary
from .dotmoe import DotMoeLayer
from .errors import ConfigError, OutputExistsError
from .export import save_checkpoint, to_moefy_model
from .layerwise import LayerReport
from .models import load
from .splits import Split
from .training.run import StageResult

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


@dataclass
class ConvertResult:
    out: Path
    record: dict[str, Any]


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moefy-work"


def fingerprint(
    model_spec: str, cfg: ConvertConfig, calib: list[str], work: Path | None = None, log: Log | None = None
) -> str:
    """Identity of a conversion's inputs: model, settings, version and the calibration files'
    paths *and contents*, so a rerun after editing a file starts over instead of resuming from
    layers fitted on the old text. A file's contents: its size and the SHA-256 of its bytes
    (files over 64 MiB: of the first and last 4 MiB, plus the mtime_ns for edits in between).
    With ``work`` and ``log``: says so when ``work`` holds a conversion of other inputs."""

    def contents(path: str) -> dict[str, Any]:
        st, h, mib = os.stat(path), hashlib.sha256(), 1 << 20
        with open(path, "rb") as fh:
            if st.st_size <= 64 * mib:
                for chunk in iter(lambda: fh.read(mib), b""):
                    h.update(chunk)
                return {"size": st.st_size, "sha256": h.hexdigest()}
            h.update(fh.read(4 * mib))
            fh.seek(st.st_size - 4 * mib)
            h.update(fh.read(4 * mib))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_head_tail": h.hexdigest()}

    files = [{"path": p, **contents(p)} for p in calib]
    blob = json.dumps({"model": model_spec, "cfg": cfg.to_dict(), "calib": files, "v": __version__}, sort_keys=True)
    fp = hashlib.sha256(blob.encode()).hexdigest()[:16]
    state = work / "state.json" if work is not None else None
    if log is not None and state is not None and state.is_file():
        if json.loads(state.read_text()).get("fingerprint") != fp:
            log(f"not resuming: {work} holds a conversion of other inputs (model, settings, version or "
                "calibration file contents changed); starting over")
    return fp


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class WorkDir:
    """Per-layer checkpoints of a running conversion."""

    def __init__(self, path: Path, fp: str) -> None:
        self.path = path
        self.fp = fp

    def open(self) -> bool:
        """Create, or reuse a compatible one; returns True when resuming."""
        state = self.path / "state.json"
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("fingerprint") == self.fp:
                return True
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_json({"fingerprint": self.fp}, state)
        return False

    def save_calib(self, calib: CalibrationSet) -> None:
        _atomic_save({"ids": calib.ids}, self.path / "calib.safetensors", {"source": calib.source})

    def load_calib(self) -> CalibrationSet | None:
        p = self.path / "calib.safetensors"
        if not p.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            source = (fh.metadata() or {}).get("source", "resumed")
        return CalibrationSet(load_file(str(p))["ids"], source)

    def save_layer(self, i: int, layer: DotMoeLayer, report: LayerReport) -> None:
        _atomic_save(dict(layer.state_dict()), self.path / f"layer_{i:04d}.safetensors")
        _atomic_json(report.to_dict(), self.path / f"layer_{i:04d}.json")

    def finished_layers(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("layer_*.json"))

    def load_layer(self, i: int) -> tuple[dict[str, torch.Tensor], LayerReport]:
        state = load_file(str(self.path / f"layer_{i:04d}.safetensors"))
        rep = LayerReport(**json.loads((self.path / f"layer_{i:04d}.json").read_text()))
        return state, rep


def restore_layer(model: Any, i: int, state: dict[str, torch.Tensor], cfg: ConvertConfig) -> DotMoeLayer:
    adapter = get_adapter(model.config)
    mlp = adapter.layers(model)[i].mlp
    n_exp = 0 if cfg.method == "prune" else cfg.n_experts
    if n_exp:
        split = Split.from_assignment(state["shared_idx"], state["routed_idx"], state["fixed_assign"], n_exp)
    else:
        split = Split(state["shared_idx"], [])
    dot = make_layer(mlp, adapter, model.config, split, cfg)
    dot.freeze_assignment()
    dot.load_state_dict(state)
    dot.eval()
    return dot


def run_convert(
    model_spec: str,
    out: str | Path,
    cfg: ConvertConfig,
    calib_files: list[str] | None = None,
    overwrite: bool = False,
    log: Log = print,
    progress: Progress | None = None,
    train_files: list[str] | None = None,
) -> ConvertResult:
    t0 = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    cfg.validate()
    check_paths(list(calib_files or []))
    if train_files:
        from .training.data import resolve_sources

        resolve_sources(list(train_files))
    torch.manual_seed(cfg.seed)
    loaded = load(model_spec)
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    d_ffn = adapter.ffn_weights(layers[0].mlp).d_ffn
    cfg = cfg.resolve_layout(d_ffn)  # --active: the layout for this d_ffn (explicit flags kept)
    if cfg.active is not None:
        log(f"--active {cfg.active}: {cfg.n_experts} experts, top-{cfg.top_k}, {cfg.n_shared} shared by {cfg.shared_by}")
    cfg.validate(d_ffn)
    if cfg.layers is not None and any(i < 0 or i >= len(layers) for i in cfg.layers):
        raise ConfigError(f"--layers must be within 0..{len(layers) - 1}")
    log(f"loaded {loaded.source}: {model.config.model_type}, {len(layers)} layers, d_ffn={d_ffn}")

    work = WorkDir(work_dir_for(out), fingerprint(model_spec, cfg, list(calib_files or []), work_dir_for(out), log))
    resuming = work.open()
    calib = work.load_calib() if resuming else None
    if calib is None:
        if calib_files:
            calib = from_files(tok, calib_files, cfg.calib_tokens, cfg.seq_len, batch=8)
        else:
            log("no --calib files given: sampling calibration text from the dense model (data-free)")
            calib = sample_from_model(model, tok, cfg.calib_tokens, cfg.seq_len, seed=cfg.seed)
        work.save_calib(calib)
    log(f"calibration: {calib.source}; {calib.n_tokens} tokens in {calib.ids.shape[0]} x {calib.ids.shape[1]}")

    reports: dict[int, LayerReport] = {}
    restored: dict[int, DotMoeLayer] = {}
    if resuming:
        for i in work.finished_layers():
            state, rep = work.load_layer(i)
            restored[i] = restore_layer(model, i, state, cfg)
            reports[i] = rep
        if restored:
            log(f"resuming: {len(restored)} layer(s) already converted in {work.path}")

    # the end-to-end stage distils from the dense model: a frozen copy taken before any layer changes
    teacher = copy.deepcopy(model) if cfg.stage in ("e2e", "both") else None

    def done(i: int, rep: LayerReport) -> None:
        reports[i] = rep
        work.save_layer(i, layers[i].mlp, rep)
        testing_hooks.pause_after_layer(i)  # test-only: a no-op unless MOEFY_TEST_PAUSE_AFTER_LAYER is set

    # e2e alone still starts from calibrated initial splits and least-squares routers
    lw_cfg = cfg if cfg.stage != "e2e" else replace(cfg, steps=0, weights="none")
    layerwise_stage(model, calib.ids, lw_cfg, batch=8, progress=progress, on_layer_done=done, restored=restored)
    e2e = StageResult([], [], None)
    if teacher is not None:
        from .training.run import convert_stage

        moe, e2e = convert_stage(model, teacher, tok, cfg, calib.ids, list(calib_files or []), train_files,
                                 work.path, log, progress)
        del teacher
        if e2e.val_kl:
            start, end = e2e.val_kl[0][1], min(v for _, v in e2e.val_kl)
            log(f"end-to-end: held-out KL {start:.4f} after the layer-wise stage, kept step {e2e.best_step} ({end:.4f})")
    else:
        moe = to_moefy_model(model)
    ordered = [reports[i] for i in sorted(reports)]
    record = build_record(model_spec, loaded.source, cfg, calib, moe, ordered, e2e, time.time() - t0, d_ffn)
    save_checkpoint(moe, tok, out, record, overwrite=overwrite)
    shutil.rmtree(work.path, ignore_errors=True)
    return ConvertResult(out, record)


def build_record(
    model_spec: str,
    source: str,
    cfg: ConvertConfig,
    calib: CalibrationSet,
    moe: Any,
    reports: list[LayerReport],
    e2e: StageResult,
    seconds: float,
    d_ffn: int,
) -> dict[str, Any]:
    from .hf.modeling_moefy import MoefyMLP

    layers = []
    for i, layer in enumerate(moe.model.model.layers):
        if isinstance(layer.mlp, MoefyMLP):
            layers.append(
                {
                    "layer": i,
                    "expert_sizes": layer.mlp.expert_sizes,
                    "n_shared": layer.mlp.n_shared,
                    "top_k": layer.mlp.top_k,  # LapSum: the (learned) mean budget k_l of this layer
                    **({"lapsum_alpha": layer.mlp.lapsum_alpha, "lapsum_threshold": layer.mlp.lapsum_threshold}
                       if layer.mlp.router_type == "lapsum" else {}),
                    # dense neuron index of every MoE neuron: shared first, then expert by expert
                    "neurons": getattr(layer.mlp, "source_neurons", None),
                }
            )
    summ = summary(reports)
    summ.update({"active_ffn_fraction": round(active_fraction(cfg, d_ffn), 4), "wall_seconds": round(seconds, 1)})
    return {
        "moefy_version": __version__,
        # conversions are deterministic for a seed, a thread count and these versions
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
        },
        "name": f"{Path(model_spec).name}-moe-{cfg.method}-E{cfg.n_experts}k{cfg.top_k}",
        "source": model_spec,
        "loaded_from": source,
        "method": cfg.method,
        "n_experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "n_shared": cfg.n_shared,
        "active_fraction": active_fraction(cfg, d_ffn),
        "stage": cfg.stage,
        "router": cfg.router,
        "calibration": {"source": calib.source, "tokens": calib.n_tokens, "sequences": int(calib.ids.shape[0]), "seq_len": int(calib.ids.shape[1])},
        "config": cfg.to_dict(),
        "layers": layers,
        "layer_reports": [r.to_dict() for r in reports],
        "e2e_kl": e2e.losses,
        "e2e_val_kl": [{"step": st, "kl": v} for st, v in e2e.val_kl],
        "e2e_best_step": e2e.best_step,
        **({"training": [e2e.entry]} if e2e.entry is not None else {}),
        "summary": summ,
        "wall_seconds": seconds,
    }

