"""One conversion job end to end, resumable: load -> calibrate -> layer-wise -> e2e -> export.

The dense model is read layer by layer from its safetensors files whenever that can be done (a
local directory, ``--calib`` text, ``--stage layerwise``; :mod:`moefy.onload`), else loaded whole;
the two give bit-identical checkpoints.  Progress lives in a work directory beside the output
(``.<out>.moefy-work``): the calibration tokens and every finished layer (safetensors), written
atomically as each layer completes, and the spilled activations when they do not fit the memory
budget.  Rerunning the same command after a crash, a kill or Ctrl-C restores the finished layers
and continues; the work directory is removed once the checkpoint is in place.
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
from .calibration import CalibrationSet, calib_files, check_paths, from_files, sample_from_model
from .mixture import calibration_mixture, check_sources, is_mixture, parse_specs
from .config import ConvertConfig, resolve_device
from .convert import active_fraction, drift_correction_for, layerwise_stage, summary
from .errors import ConfigError, OutputExistsError
from .export import DEFAULT_SHARD_SIZE, mlp_spec, moefy_config, save_checkpoint, save_streamed_checkpoint, to_moefy_model
from .hf.modeling_moefy import MoefyMLP
from .layerwise import LayerReport
from .memory import DTYPE_NAMES, DTYPES, MemoryPlan, check_whole_model, layer_shape, parse_size, plan_memory
from .models import Source, checkpoint_dtype, load, load_config, load_tokenizer, locate, parameter_count
from .onload import OnloadHost, SafetensorsCheckpoint, build_skeleton, checkpoint_problem, layout, moe_mlp_from_spec
from .training.run import StageResult

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


@dataclass
class ConvertResult:
    out: Path
    record: dict[str, Any]


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moefy-work"


def _resolve(spec: str) -> list[Path]:
    from .training.data import resolve_sources

    return resolve_sources([spec])


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

    files = []
    for spec in parse_specs(calib):
        if spec.is_teacher:
            files.append({"path": str(spec)})
            continue
        paths = [spec.spec] if Path(spec.spec).is_file() else [str(p) for p in _resolve(spec.spec)]
        for p in paths:
            files.append({"path": p, **contents(p), **({"weight": spec.weight} if spec.weight is not None else {})})
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
    """Per-layer checkpoints of a running conversion.

    Layer ``i`` is ``layer_XXXX.safetensors`` (the whole converted decoder layer under its names in
    the output checkpoint, in the conversion dtype: a unit of the output the layer-by-layer path
    links or copies into its shards) and ``layer_XXXX.json`` (its report and the MoE FFN's spec),
    written in that order, each atomically: a layer is finished once its JSON exists."""

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
        meta = {"source": calib.source, **({"parts": json.dumps(calib.parts)} if calib.parts is not None else {})}
        _atomic_save({"ids": calib.ids}, self.path / "calib.safetensors", meta)

    def load_calib(self) -> CalibrationSet | None:
        p = self.path / "calib.safetensors"
        if not p.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
        parts = json.loads(meta["parts"]) if "parts" in meta else None
        return CalibrationSet(load_file(str(p))["ids"], meta.get("source", "resumed"), parts)

    def save_allocation(self, shared: list[int], curves: list[dict[str, Any]]) -> None:
        _atomic_json({"shared_per_layer": shared, "curves": curves}, self.path / "allocation.json")

    def load_allocation(self) -> dict[str, Any] | None:
        p = self.path / "allocation.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer_{i:04d}.safetensors"

    def save_layer(self, i: int, layer: torch.nn.Module, prefix: str, report: LayerReport) -> None:
        """``layer``: the converted decoder layer; ``prefix``: its name in the output (``model.model.layers.i.``)."""
        _atomic_save({prefix + k: v for k, v in layer.state_dict().items()}, self.layer_file(i), {"format": "pt"})
        _atomic_json({"report": report.to_dict(), "mlp": mlp_spec(layer.mlp)}, self.path / f"layer_{i:04d}.json")

    def finished_layers(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("layer_*.json"))

    def load_layer(self, i: int) -> tuple[dict[str, Any], LayerReport]:
        """(the MoE FFN's spec, the report) of finished layer ``i``."""
        saved = json.loads((self.path / f"layer_{i:04d}.json").read_text())
        return saved["mlp"], LayerReport(**saved["report"])

    def restore_mlp(self, i: int, prefix: str, spec: dict[str, Any]) -> MoefyMLP:
        """Finished layer ``i``'s MoE FFN, as it was when converted."""
        from safetensors import safe_open

        mlp = moe_mlp_from_spec(spec)
        names = list(mlp.state_dict().keys())
        with safe_open(str(self.layer_file(i)), framework="pt", device="cpu") as fh:
            tensors = {k: fh.get_tensor(f"{prefix}mlp.{k}") for k in names}
        mlp.load_state_dict(tensors, strict=True, assign=True)
        for p in mlp.parameters():
            p.requires_grad_(False)
        return mlp


def _layers_prefix(model: torch.nn.Module, layers: torch.nn.ModuleList) -> str:
    """The decoder layers' name in the output checkpoint (``model.`` + the dense model's, e.g. ``model.model.layers``)."""
    return "model." + next(n for n, m in model.named_modules() if m is layers)


def calib_token_bound(cfg: ConvertConfig) -> int:
    """At most this many calibration tokens (whole windows of --seq-len within --calib-tokens)."""
    return (cfg.calib_tokens // cfg.seq_len) * cfg.seq_len


def resolve_dtype(cfg: ConvertConfig, src: Source, log: Log) -> torch.dtype:
    if cfg.dtype is not None:
        return DTYPES[cfg.dtype]
    if cfg.stage != "layerwise":
        return torch.float32  # the end-to-end stage trains in fp32
    return checkpoint_dtype(src)


def _why_not_onload(src: Source, cfg: ConvertConfig, calib_files: list[str]) -> str | None:
    """Why the layer-wise stage cannot read this model layer by layer (None: it can)."""
    if src.kind == "gguf":
        return "a GGUF file is de-quantised whole by transformers"
    if src.kind == "hub":
        return "a hub id is loaded whole (download it and pass the directory to convert it layer by layer)"
    if cfg.stage != "layerwise":
        return f"--stage {cfg.stage} trains the whole model"
    if not calib_files:
        return "data-free calibration samples text from the whole dense model (give --calib FILE)"
    if any(sp.is_teacher for sp in parse_specs(calib_files)):
        return "calibration with the teacher's samples samples text from the whole dense model"
    if cfg.select == "model":
        return "--select model scores each layer's fits through the rest of the model"
    if cfg.allocate != "uniform" and cfg.shared_per_layer is None:
        return f"--allocate {cfg.allocate} measures each layer's pruned fits through the rest of the model"
    return None


def run_convert(
    model_spec: str,
    out: str | Path,
    cfg: ConvertConfig,
    calib_files: list[str] | None = None,
    overwrite: bool = False,
    log: Log = print,
    progress: Progress | None = None,
    train_files: list[str] | None = None,
    *,
    device: str | torch.device = "auto",
    onload: bool | None = None,
    max_memory: int | str | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> ConvertResult:
    """Convert ``model_spec`` into a moefy checkpoint at ``out`` (resumable; see the module docstring).

    ``device``: where each layer is fitted (``auto``: the first GPU, else the CPU).  ``onload``:
    read the dense model layer by layer from its safetensors shards (True), load it whole (False),
    or the former whenever it can be done (None).  ``max_memory``: the memory budget (bytes or a
    size such as ``"20GiB"``): refused if one layer cannot fit in it; the calibration activations
    carried between layers are spilled to the work directory when they do not fit beside a layer
    (default budget: the memory available now).  ``max_shard_size``: the output's safetensors shards."""
    t0 = time.time()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    cfg.validate()
    calib_files = list(calib_files or [])
    calib_specs = parse_specs(calib_files)
    mixed = is_mixture(calib_specs)
    if mixed:
        check_sources(calib_specs)
        if cfg.stage != "layerwise" and not train_files:
            raise ConfigError("the end-to-end stage with a calibration mixture needs --train-data (or use moefy train --data)")
    else:
        check_paths(calib_files)
    if train_files:
        from .training.data import resolve_sources

        resolve_sources(list(train_files))
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    budget = parse_size(max_memory, "--max-memory") if max_memory is not None else None
    parse_size(max_shard_size, "--max-shard-size")
    torch.manual_seed(cfg.seed)
    src = locate(model_spec)
    dtype = resolve_dtype(cfg, src, log)
    cfg = replace(cfg, dtype=DTYPE_NAMES[dtype])
    why_not = _why_not_onload(src, cfg, calib_files)
    if onload is True and why_not is not None:
        raise ConfigError(f"--onload is not possible here: {why_not}; use --no-onload")
    layer_by_layer = onload is not False and why_not is None
    ckpt = skeleton = None
    if layer_by_layer:
        ckpt = SafetensorsCheckpoint(src.path)  # type: ignore[arg-type]
        skeleton = build_skeleton(load_config(src), dtype)
        layers = get_adapter(skeleton.config).layers(skeleton)
        problem = checkpoint_problem(ckpt, layout(skeleton, layers), skeleton)
        if problem is not None:
            if onload is True:
                raise ConfigError(f"--onload is not possible here: {problem}; use --no-onload")
            why_not, layer_by_layer, skeleton = problem, False, None
    if layer_by_layer:
        assert skeleton is not None
        model, tok, source = skeleton, load_tokenizer(src), src.description
    else:
        if onload is None and why_not is not None:
            log(f"loading the whole model: {why_not}")
        n_params = parameter_count(src)
        if n_params is not None:
            copies = 1 if cfg.stage == "layerwise" else 2  # + the frozen teacher of the end-to-end stage
            need = n_params * dtype.itemsize * copies + (n_params * 12 if cfg.stage != "layerwise" else 0)
            check_whole_model(f"converting {model_spec} with the whole model loaded", need,
                              "convert a safetensors directory with --stage layerwise (layer by layer)", log)
        loaded = load(src, dtype)
        model, tok, source = loaded.model, loaded.tokenizer, loaded.source
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    d_ffn = adapter.ffn_weights(layers[0].mlp).d_ffn
    cfg = cfg.resolve_layout(d_ffn)  # --active: the layout for this d_ffn (explicit flags kept)
    if cfg.active is not None:
        log(f"--active {cfg.active}: {cfg.n_experts} experts, top-{cfg.top_k}, {cfg.n_shared} shared by {cfg.shared_by}")
    cfg.validate(d_ffn)
    cfg = replace(cfg, drift_correction=drift_correction_for(cfg, adapter))  # the value used, as moefy.json records it
    if cfg.layers is not None and any(i < 0 or i >= len(layers) for i in cfg.layers):
        raise ConfigError(f"--layers must be within 0..{len(layers) - 1}")
    if cfg.shared_per_layer is not None and len(cfg.shared_per_layer) != len(layers):
        raise ConfigError(f"shared_per_layer has {len(cfg.shared_per_layer)} counts; the model has {len(layers)} layers")
    shape = layer_shape(model, layers, d_ffn, dtype.itemsize, whole=not layer_by_layer)
    plan = plan_memory(shape, calib_token_bound(cfg), budget, cfg.batch_tokens, streams=2 if cfg.drift_correction else 1)
    mode = "layer by layer from the safetensors files" if layer_by_layer else "whole"
    log(f"loaded {source} ({mode}): {model.config.model_type}, {len(layers)} layers, d_ffn={d_ffn}, "
        f"{DTYPE_NAMES[dtype]}, fitting on {dev}; {plan.describe()}")

    work = WorkDir(work_dir_for(out), fingerprint(model_spec, cfg, calib_files, work_dir_for(out), log))
    resuming = work.open()
    calib = work.load_calib() if resuming else None
    if calib is None:
        if mixed:
            calib = calibration_mixture(tok, calib_specs, cfg.calib_tokens, cfg.seq_len, batch=8, model=model, seed=cfg.seed)
        elif calib_files:
            calib = from_files(tok, calib_files, cfg.calib_tokens, cfg.seq_len, batch=8)
        else:
            log("no --calib files given: sampling calibration text from the dense model (data-free)")
            calib = sample_from_model(model, tok, cfg.calib_tokens, cfg.seq_len, seed=cfg.seed)
        work.save_calib(calib)
    log(f"calibration: {calib.source}; {calib.n_tokens} tokens in {calib.ids.shape[0]} x {calib.ids.shape[1]}")

    allocation: dict[str, Any] | None = None
    if cfg.allocate != "uniform" and cfg.shared_per_layer is None:
        allocation = work.load_allocation() if resuming else None
        if allocation is None:
            from dataclasses import asdict

            from .allocation import shared_per_layer

            rows = max(1, min(calib.ids.shape[0], cfg.allocate_tokens // calib.ids.shape[1]))
            log(f"--allocate {cfg.allocate}: measuring each layer's held-out KL at a few shared counts "
                f"(on the first {rows * calib.ids.shape[1]} calibration tokens)")
            shared, curves = shared_per_layer(model, calib.ids[:rows], cfg, d_ffn, batch=8, log=log)
            allocation = {"shared_per_layer": shared, "curves": [asdict(c) for c in curves]}
            work.save_allocation(shared, allocation["curves"])
        cfg = replace(cfg, shared_per_layer=[int(v) for v in allocation["shared_per_layer"]])
        log(f"--allocate {cfg.allocate}: shared neurons per layer {cfg.shared_per_layer} (mean {cfg.n_shared})")
    if cfg.shared_per_layer is not None:
        cfg.validate(d_ffn)

    prefix = _layers_prefix(model, layers)
    reports: dict[int, LayerReport] = {}
    specs: dict[int, dict[str, Any]] = {}
    for i in work.finished_layers() if resuming else []:
        specs[i], reports[i] = work.load_layer(i)
    if reports:
        log(f"resuming: {len(reports)} layer(s) already converted in {work.path}")

    def done(i: int, rep: LayerReport, layer: torch.nn.Module) -> None:
        reports[i] = rep
        work.save_layer(i, layer, f"{prefix}.{i}.", rep)
        specs[i] = mlp_spec(layer.mlp)
        testing_hooks.pause_after_layer(i)  # test-only: a no-op unless MOEFY_TEST_PAUSE_AFTER_LAYER is set

    # e2e alone still starts from calibrated initial splits and least-squares routers
    lw_cfg = cfg if cfg.stage != "e2e" else replace(cfg, steps=0, weights="none")
    spill = work.path / "activations.bin" if plan.spill else None
    if layer_by_layer:
        assert ckpt is not None
        finished = {i: (work.layer_file(i), specs[i]) for i in reports}
        host = OnloadHost(model, layers, ckpt, dev, finished)
        layerwise_stage(model, calib.ids, lw_cfg, batch=8, progress=progress, on_layer_done=done, host=host,
                        device=dev, spill_path=spill, finished=set(finished))
        ordered = [reports[i] for i in sorted(reports)]
        layer_specs = [specs.get(i) for i in range(len(layers))]
        record = build_record(model_spec, source, cfg, calib, layer_specs, ordered, StageResult([], [], None),
                              time.time() - t0, d_ffn, _loading(True, plan, dev))
        units = _output_units(work, host, layers, prefix)
        moe_cfg = moefy_config(model.config, layer_specs)
        moe_cfg.dtype = dtype
        save_streamed_checkpoint(moe_cfg, units, tok, out, record, overwrite=overwrite, max_shard_size=max_shard_size)
        shutil.rmtree(work.path, ignore_errors=True)
        return ConvertResult(out, record)

    restored = {i: work.restore_mlp(i, f"{prefix}.{i}.", specs[i]) for i in reports}
    # the end-to-end stage distils from the dense model: a frozen copy taken before any layer changes
    teacher = copy.deepcopy(model) if cfg.stage in ("e2e", "both") else None
    layerwise_stage(model, calib.ids, lw_cfg, batch=8, progress=progress, on_layer_done=done, restored=restored,
                    device=dev, spill_path=spill)
    e2e = StageResult([], [], None)
    if teacher is not None:
        from .training.run import convert_stage

        moe, e2e = convert_stage(model, teacher, tok, cfg, calib.ids, calib_files, train_files,
                                 work.path, log, progress)
        del teacher
        if e2e.val_kl:
            start, end = e2e.val_kl[0][1], min(v for _, v in e2e.val_kl)
            log(f"end-to-end: held-out KL {start:.4f} after the layer-wise stage, kept step {e2e.best_step} ({end:.4f})")
    else:
        moe = to_moefy_model(model)
    ordered = [reports[i] for i in sorted(reports)]
    layer_specs = [mlp_spec(layer.mlp) if isinstance(layer.mlp, MoefyMLP) else None for layer in moe.model.model.layers]
    record = build_record(model_spec, source, cfg, calib, layer_specs, ordered, e2e, time.time() - t0, d_ffn,
                          _loading(False, plan, dev))
    if allocation is not None:
        record["allocation"] = allocation
    save_checkpoint(moe, tok, out, record, overwrite=overwrite, max_shard_size=max_shard_size)
    shutil.rmtree(work.path, ignore_errors=True)
    return ConvertResult(out, record)


def _loading(layer_by_layer: bool, plan: MemoryPlan, dev: torch.device) -> dict[str, Any]:
    """How the conversion ran, for ``moefy.json`` (``cuda_peak_bytes``: the device's peak allocation)."""
    out = {"layer_by_layer": layer_by_layer, "device": str(dev), "activations": "disk" if plan.spill else "memory",
           "max_memory": plan.budget, "estimated_layer_bytes": plan.layer_bytes,
           "activation_bytes": plan.activation_bytes}
    if dev.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return out


def _output_units(work: WorkDir, host: OnloadHost, layers: torch.nn.ModuleList, prefix: str) -> list[Path]:
    """The output checkpoint's tensors as files in the work directory, in state-dict order: the
    tensors before the layers, every layer (converted: its work file; dense: read from the
    checkpoint now), the tensors after them; one in memory at a time."""
    lay = host.lay

    def unit(name: str, keys: dict[str, str], dtypes: dict[str, torch.dtype]) -> Path:
        path = work.path / name
        tensors = host.ckpt.read(keys, dtypes, torch.device("cpu"))
        _atomic_save(tensors, path, {"format": "pt"})
        return path

    units = [unit("unit_head.safetensors", {"model." + k: k for k in lay.head}, {"model." + k: lay.dtypes[k] for k in lay.head})]
    for i in range(len(layers)):
        if work.layer_file(i).is_file() and (work.path / f"layer_{i:04d}.json").is_file():
            units.append(work.layer_file(i))
        else:
            keys = {f"{prefix}.{i}.{k}": host.layer_key(i, k) for k in lay.layers[i]}
            units.append(unit(f"unit_dense_{i:04d}.safetensors", keys, {f"{prefix}.{i}.{k}": lay.dtypes[host.layer_key(i, k)] for k in lay.layers[i]}))
    if lay.tail:
        units.append(unit("unit_tail.safetensors", {"model." + k: k for k in lay.tail}, {"model." + k: lay.dtypes[k] for k in lay.tail}))
    return units


def build_record(
    model_spec: str,
    source: str,
    cfg: ConvertConfig,
    calib: CalibrationSet,
    specs: list[dict[str, Any] | None],
    reports: list[LayerReport],
    e2e: StageResult,
    seconds: float,
    d_ffn: int,
    loading: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``specs``: :func:`moefy.export.mlp_spec` of every decoder layer's MoE FFN (None: dense)."""
    layers = []
    for i, spec in enumerate(specs):
        if spec is not None:
            layers.append(
                {
                    "layer": i,
                    "expert_sizes": spec["expert_sizes"],
                    "n_shared": spec["n_shared"],
                    "top_k": spec["top_k"],  # LapSum: the (learned) mean budget k_l of this layer
                    **({"lapsum_alpha": spec["lapsum_alpha"], "lapsum_threshold": spec["lapsum_threshold"]}
                       if spec["router"] == "lapsum" else {}),
                    # dense neuron index of every MoE neuron: shared first, then expert by expert
                    "neurons": spec.get("source_neurons"),
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
        "calibration": {"source": calib.source, "tokens": calib.n_tokens, "sequences": int(calib.ids.shape[0]),
                        "seq_len": int(calib.ids.shape[1]), "files": calib_files(calib.source),
                        **({"sources": calib.parts} if calib.parts is not None else {})},
        "config": cfg.to_dict(),
        "dtype": cfg.dtype,
        **({"loading": loading} if loading is not None else {}),
        "layers": layers,
        "layer_reports": [r.to_dict() for r in reports],
        "e2e_kl": e2e.losses,
        "e2e_val_kl": [{"step": st, "kl": v} for st, v in e2e.val_kl],
        "e2e_best_step": e2e.best_step,
        **({"training": [e2e.entry]} if e2e.entry is not None else {}),
        "summary": summ,
        "wall_seconds": seconds,
    }

