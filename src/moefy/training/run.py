"""``moefy train``: one recovery-training job end to end, resumable.

load the checkpoint and its teacher -> check they match -> data (files, shards or sampled from
the teacher) -> :func:`moefy.training.trainer.train` -> export -> an atomic checkpoint with
``moefy.json`` (the training appended to the conversion record), ``metrics.jsonl`` and
``recovery.png``. Progress lives in ``.<out>.moefy-work/`` beside the output; rerunning the
same command continues from the last checkpointed step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..calibration import calib_files
from ..errors import ConfigError, ModelNotFoundError, OutputExistsError, TeacherMismatchError
from ..export import save_checkpoint
from ..hf.modeling_moefy import MoefyForCausalLM
from .config import TrainConfig
from ..mixture import SourceSpec, check_teacher_only_once, is_mixture, parse_specs, shares, weights
from .data import HeldOut, MixedData, PackedData, resolve_sources, sample_data_free
from .student import Student, build_student, export_student
from .trainer import Log, Report, Teacher, TrainOutcome, TrainState, make_accelerator, plot_curve, train


@dataclass
class TrainResult:
    out: Path
    record: dict[str, Any]
    outcome: TrainOutcome


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.moefy-work"


def _file_id(p: Path) -> Any:
    if p.is_dir():
        return sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file())
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def fingerprint(ckpt: Path, teacher: str, cfg: TrainConfig, data: list[Path], val: list[Path],
                specs: list[str] | None = None) -> str:
    blob = json.dumps({
        "ckpt": str(ckpt), "ckpt_files": _file_id(ckpt), "teacher": teacher, "cfg": cfg.to_dict(),
        "data": [(str(p), _file_id(p)) for p in data], "val": [(str(p), _file_id(p)) for p in val], "v": __version__,
        **({"specs": specs} if specs and any("@" in sp or sp == "teacher" for sp in specs) else {}),
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_teacher(student: torch.nn.Module, s_tok: Any, teacher: torch.nn.Module, t_tok: Any, spec: str) -> None:
    """The teacher must be the dense model the student was made from: same vocabulary and
    tokenizer, same architecture family and shape."""
    sc, tc = student.config, teacher.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(sc, key, None) != getattr(tc, key, None):
            raise TeacherMismatchError(
                f"teacher {spec} does not match the student: {key} {getattr(tc, key, None)} vs {getattr(sc, key, None)}"
            )
    if sc.model_type != tc.model_type:
        raise TeacherMismatchError(f"teacher {spec} is a {tc.model_type} model; the student was converted from {sc.model_type}")
    if hasattr(s_tok, "get_vocab") and hasattr(t_tok, "get_vocab") and s_tok.get_vocab() != t_tok.get_vocab():
        raise TeacherMismatchError(f"teacher {spec} has another tokenizer vocabulary than the student")


def load_student(ckpt: Path) -> tuple[MoefyForCausalLM, Any, dict[str, Any]]:
    from ..models import load

    if not ckpt.is_dir():
        raise ModelNotFoundError(f"checkpoint not found: {ckpt}")
    rec_path = ckpt / "moefy.json"
    if not rec_path.is_file():
        raise ConfigError(f"{ckpt} is not a moefy checkpoint (no moefy.json); convert it first with moefy convert")
    loaded = load(str(ckpt))
    if not isinstance(loaded.model, MoefyForCausalLM):
        raise ConfigError(f"{ckpt} does not load as a moefy MoE model")
    return loaded.model, loaded.tokenizer, json.loads(rec_path.read_text())


def training_entry(cfg: TrainConfig, outcome: TrainOutcome, teacher: str, data_desc: str, val_desc: str, world: int) -> dict[str, Any]:
    return {
        "teacher": teacher, "data": data_desc, "held_out": val_desc, "tokens": outcome.tokens, "steps": outcome.steps,
        "kept_step": outcome.best_step if outcome.best_step is not None else outcome.steps,
        "history": outcome.history, "neurons_moved": {str(k): v for k, v in outcome.neurons_moved.items()},
        "neurons_moved_total": sum(outcome.neurons_moved.values()),
        "tokens_per_second": round(outcome.tokens_per_second, 2), "peak_rss_mib": round(outcome.peak_rss_mib, 1),
        "peak_gpu_mib": outcome.peak_gpu_mib, "seconds": round(outcome.seconds, 1), "processes": world,
        "config": cfg.to_dict(),
    }


def finish(
    student: Student, tok: Any, record: dict[str, Any], entry: dict[str, Any], out: Path, overwrite: bool,
    metrics: Path | None, tokens_per_step: int,
) -> dict[str, Any]:
    """Export the trained student and write the checkpoint (one atomic directory)."""
    moe, provenance = export_student(student)
    record = dict(record)
    layers = [dict(layer) for layer in record.get("layers", [])]
    for k, layer in enumerate(layers):
        if k < len(provenance):
            layer["neurons"] = provenance[k]
    record["layers"] = layers
    record["training"] = list(record.get("training", [])) + [entry]
    extra: dict[str, Path] = {}
    if metrics is not None and metrics.is_file():
        extra["metrics.jsonl"] = metrics
        if entry["history"]:
            png = metrics.with_name("recovery.png")
            plot_curve(entry["history"], tokens_per_step, png, f"{record.get('name', 'moefy')}: recovery")
            extra["recovery.png"] = png
    save_checkpoint(moe, tok, out, record, overwrite=overwrite, extra_files=extra)
    return record


def skipped_note(skip: int) -> str:
    """What a data description adds when :func:`calibration_skip` dropped ``skip`` tokens."""
    return f" after the first {skip} tokens (the calibration text)" if skip else ""


def calibration_spans(record: dict[str, Any]) -> list[tuple[list[str], int, int]]:
    """The calibration text a checkpoint's layer-wise stage fitted, per calibration source:
    ``(files, tokens fitted from the start of those files, seq_len)``."""
    cal = record.get("calibration") or {}
    seq_len = int(cal.get("seq_len", 0))
    if cal.get("sources"):  # a calibration mixture: each source's share, from its start
        return [(list(src["files"]), int(src["sequences"]) * seq_len, seq_len) for src in cal["sources"] if src.get("files")]
    cfiles = cal.get("files")
    if cfiles is None:  # checkpoints written before the files were recorded
        cfiles = calib_files(str(cal.get("source", "")))
    return [(list(cfiles), int(cal.get("sequences", 0)) * seq_len, seq_len)] if cfiles else []


def calibration_skip(record: dict[str, Any], files: Sequence[str | Path]) -> tuple[int, str]:
    """Stream tokens ``moefy train`` drops from ``files`` so that its held-out sequences (and
    its training) start past the text the layer-wise stage fitted, with a note for the log.

    The layer-wise stage fitted its routers, split and ridge refit on the first ``sequences x
    seq_len`` tokens of its calibration files, read in order (of each source's files, for a
    calibration mixture).  Measured on SmolLM2-135M (E=8, k=2, 16,384 tokens of WikiText-2
    valid): the converted model scores 2.3x dense perplexity on those tokens but 3.6-4.7x on
    later valid text, so a held-out set drawn from them reports a model far better than it is.
    When ``files`` opens with a calibration source's first file the same tokens open this
    stream: they are skipped, plus one sequence of margin (the two readers' windows differ by a
    BOS).  A calibration file later in ``files`` only adds its fitted tokens to training, never
    to the held-out set; a calibration that spans several files while ``files`` starts inside
    one of its later files is reported, not guessed at."""
    if not files:
        return 0, ""
    names = [str(Path(f).expanduser().resolve()) for f in files]
    for cfiles, span, seq_len in calibration_spans(record):
        if names[0] == cfiles[0]:
            skip = span + seq_len
            return skip, f"skipping the first {skip} tokens of {files[0]} (the checkpoint's calibration text)"
    for cfiles, _, _ in calibration_spans(record):
        if names[0] in cfiles:
            return 0, (f"warning: {files[0]} is one of the checkpoint's calibration files but not its first; the "
                       "held-out sequences may overlap the calibration text; pass --val-data with other text")
    return 0, ""


TEACHER_SAMPLE_SEED_OFFSET = 7919  # training samples of the teacher never repeat calibration's (seeded cfg.seed)


def build_stream(
    tok: Any, specs: list[SourceSpec], cfg: TrainConfig, record: dict[str, Any], teacher: Any, work: Path,
    held_given: bool, world: int, main: bool, log: Log, barrier: Any = lambda: None,
) -> tuple[Any, str, dict[str, Any]]:
    """The training stream of ``specs`` (files in order, data-free, or a weighted mixture), its
    description, and what the record keeps of it (each mixture source's weight and share)."""
    val = 0 if held_given else cfg.val_sequences
    if not specs:
        cache = work / "data_free"
        if main:
            sample_data_free(teacher, tok, cfg.tokens + cfg.val_sequences * cfg.seq_len, cfg.seq_len, cache, cfg.seed, log=log)
        barrier()
        desc = f"data-free: {cfg.tokens} tokens sampled from the teacher (seed {cfg.seed})"
        log(f"no --data given: training on text sampled from the teacher ({desc})")
        return PackedData(tok, [str(cache)], cfg.seq_len, seed=cfg.seed, val_sequences=val,
                          shuffle_window=cfg.shuffle_window), desc, {}
    if not is_mixture(specs):
        files = resolve_sources([sp.spec for sp in specs])
        skip, note = calibration_skip(record, files)
        if note:
            log(note)
        stream = PackedData(tok, [str(f) for f in files], cfg.seq_len, seed=cfg.seed, val_sequences=val,
                            skip_tokens=skip, shuffle_window=cfg.shuffle_window)
        return stream, ", ".join(str(f) for f in files) + skipped_note(skip), {}
    ws = weights(specs)
    vals = shares(ws, val, at_least_one=True) if val else [0] * len(specs)
    n_train = cfg.steps(world) * cfg.batch_size * cfg.grad_accum * world
    parts, names, descs = [], [], []
    for sp, w, v in zip(specs, ws, vals):
        if sp.is_teacher:
            need = math.ceil(w * n_train) + v + 1
            seed = cfg.seed + TEACHER_SAMPLE_SEED_OFFSET
            cache = work / "teacher_samples"
            if main:
                sample_data_free(teacher, tok, need * cfg.seq_len, cfg.seq_len, cache, seed, log=log)
            barrier()
            parts.append(PackedData(tok, [str(cache)], cfg.seq_len, seed=cfg.seed, val_sequences=v,
                                    shuffle_window=cfg.shuffle_window))
            descs.append(f"teacher@{w:.3g} ({need} sequences sampled, seed {seed})")
        else:
            files = resolve_sources([sp.spec])
            skip, note = calibration_skip(record, files)
            if note:
                log(note)
            parts.append(PackedData(tok, [str(f) for f in files], cfg.seq_len, seed=cfg.seed, val_sequences=v,
                                    skip_tokens=skip, shuffle_window=cfg.shuffle_window))
            descs.append(f"{sp.spec}@{w:.3g}" + skipped_note(skip))
        names.append(sp.name)
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    stream = MixedData(parts, names, ws)
    counts = stream.share_report(n_train)
    log("mixture: " + ", ".join(f"{n} {c} of {n_train} training sequences ({c / max(n_train, 1):.1%})" for n, c in counts.items()))
    info = {"mixture": [{"source": str(sp), "name": n, "weight": w, "train_sequences": counts[n], "held_out_sequences": v}
                        for sp, n, w, v in zip(specs, names, ws, vals)]}
    return stream, "mixture: " + ", ".join(descs), info


def run_train(
    ckpt: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    data: list[str] | None,
    teacher: str | None = None,
    val_data: list[str] | None = None,
    overwrite: bool = False,
    log: Log = print,
    report: Report | None = None,
    extra_eval: Any = None,
) -> TrainResult:
    from ..models import load

    t0 = time.time()
    out, ckpt = Path(out), Path(ckpt)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    cfg.validate()
    specs = parse_specs(data)
    check_teacher_only_once(specs)
    files = resolve_sources([sp.spec for sp in specs if not sp.is_teacher]) if any(not sp.is_teacher for sp in specs) else []
    val_files = resolve_sources(list(val_data)) if val_data else []  # fail on bad paths before loading models
    model, tok, record = load_student(ckpt)
    teacher_spec = teacher or record.get("source")
    if not teacher_spec:
        raise ConfigError("no --teacher given and the checkpoint does not record its dense source")
    t_loaded = load(teacher_spec)
    check_teacher(model.model, tok, t_loaded.model, t_loaded.tokenizer, teacher_spec)
    learn = cfg.learn_assignment
    student = build_student(model, learn, neurons=[layer.get("neurons") for layer in record.get("layers", [])],
                            rounding=record.get("config", {}).get("rounding", "greedy"), margin=cfg.affinity_margin)
    accelerator = make_accelerator(cfg)
    work = TrainState(work_dir_for(out), fingerprint(ckpt, teacher_spec, cfg, files, val_files, [str(sp) for sp in specs]))
    if accelerator.is_main_process:
        resuming = work.open()
    accelerator.wait_for_everyone()
    stream, data_desc, data_info = build_stream(tok, specs, cfg, record, t_loaded.model, work.path, bool(val_files),
                                                accelerator.num_processes, accelerator.is_main_process, log,
                                                barrier=accelerator.wait_for_everyone)
    held: Any = None
    if val_files:
        sets = []
        for f in val_files:
            vskip, vnote = calibration_skip(record, [f])
            if vnote:
                log(vnote.replace("skipping", "held out: skipping"))
            pd = PackedData(tok, [str(f)], cfg.seq_len, seed=cfg.seed, val_sequences=cfg.val_sequences, skip_tokens=vskip)
            sets.append((f.stem, pd, skipped_note(vskip)))
        held = sets[0][1] if len(sets) == 1 else HeldOut([(n, pd.val_rows()) for n, pd, _ in sets])
        val_desc = "; ".join(f"first {cfg.val_sequences} sequences of {f}{note}" for f, (_, _, note) in zip(val_files, sets))
    elif isinstance(stream, MixedData):
        val_desc = "each mixture source's first sequences (never trained on): " + ", ".join(
            f"{m['name']} {m['held_out_sequences']}" for m in data_info["mixture"])
    else:
        val_desc = f"first {cfg.val_sequences} sequences of the training data (never trained on)"
    log(f"data: {data_desc}; held out: {val_desc}")
    metrics = work.path / "metrics.jsonl"
    cache = None
    if cfg.teacher_cache:
        from .teacher_cache import TeacherCache, teacher_fingerprint

        if accelerator.num_processes > 1:
            raise ConfigError("--teacher-cache runs in one process (its files are appended by one writer)")
        cache = TeacherCache(cfg.teacher_cache, teacher_fingerprint(t_loaded.model), cfg.cache_top_k,
                             int(t_loaded.model.get_output_embeddings().weight.shape[0]), cfg.seq_len)
        log(f"teacher cache {cfg.teacher_cache}: {len(cache.slots)} sequences stored, top-{cache.k}")
    outcome = train(student, Teacher(t_loaded.model), stream, cfg, work, accelerator, learn, log=log, report=report,
                    metrics_path=metrics, extra_eval=extra_eval, held_out=held, teacher_cache=cache)
    if cache is not None:
        data_info["teacher_cache"] = {"path": str(cfg.teacher_cache), "k": cache.k, "hits": cache.hits, "misses": cache.misses}
        log(f"teacher cache: {cache.hits} sequences read, {cache.misses} computed by the teacher")
    if learn:
        log(f"assignment: {sum(outcome.neurons_moved.values())} neurons moved expert "
            f"({', '.join(f'{i}:{n}' for i, n in outcome.neurons_moved.items())})")
    entry = training_entry(cfg, outcome, teacher_spec, data_desc, val_desc, accelerator.num_processes) | data_info
    if accelerator.is_main_process:
        model.model.to("cpu")
        record = finish(student, tok, record, entry, out, overwrite, metrics,
                        cfg.seq_len * cfg.batch_size * cfg.grad_accum * accelerator.num_processes)
        shutil.rmtree(work.path, ignore_errors=True)
    accelerator.wait_for_everyone()
    record["wall_seconds_training"] = time.time() - t0
    return TrainResult(out, record, outcome)


def launch_processes(argv: list[str], n: int) -> int:
    """Run this command in ``n`` processes through torch's launcher (``torchrun``): gloo on
    CPU, NCCL on GPUs; accelerate reads the environment it sets."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "moefy.cli", *argv]
    return subprocess.call(cmd, env=env)


@dataclass
class StageResult:
    """What ``moefy convert --stage e2e|both`` records of its recovery training."""

    losses: list[float]
    val_kl: list[tuple[int, float]]
    best_step: int | None
    entry: dict[str, Any] | None = None


def convert_stage(
    model: torch.nn.Module, teacher_model: torch.nn.Module, tok: Any, ccfg: Any, calib_ids: torch.Tensor,
    calib_files: list[str], train_files: list[str] | None, work_path: Path, log: Log, progress: Any,
) -> tuple[MoefyForCausalLM, StageResult]:
    """The end-to-end stage of ``moefy convert``: the layer-wise result trained by the same
    trainer as ``moefy train``, on text past the calibration tokens (never the same tokens)."""
    from ..export import to_moefy_model

    learn = ccfg.method == "dot" and ccfg.e2e_learn_assignment
    tcfg = TrainConfig(
        tokens=ccfg.e2e_steps * ccfg.e2e_batch * ccfg.seq_len, seq_len=ccfg.seq_len, batch_size=ccfg.e2e_batch,
        lrs={"assignment": ccfg.e2e_lr_affinity, "routers": ccfg.e2e_lr_router, "experts": ccfg.e2e_lr_weights,
             "attention": ccfg.e2e_lr_rest, "norms": ccfg.e2e_lr_rest, "lm_head": ccfg.e2e_lr_rest,
             "other": ccfg.e2e_lr_rest, "embeddings": 0.0},
        kl_weight=ccfg.kl_weight, ce_weight=ccfg.ce_weight, z_loss_weight=ccfg.z_loss_weight,
        balance_weight=ccfg.balance_weight, val_sequences=ccfg.e2e_val_sequences, eval_every=ccfg.e2e_eval_every,
        keep_best=ccfg.e2e_val_sequences > 0, checkpoint_every=ccfg.e2e_checkpoint_every, seed=ccfg.seed,
        warmup_steps=min(10, max(0, ccfg.e2e_steps // 10)),
        learn_budget=ccfg.router == "lapsum" and ccfg.budget_mode == "learned", total_budget=ccfg.budget,
        learn_assignment=learn,
    )
    tcfg.validate()
    moe = to_moefy_model(model)
    student = build_student(moe, learn, rounding=ccfg.rounding, sinkhorn_iters=ccfg.sinkhorn_iters)
    accelerator = make_accelerator(tcfg)
    state = TrainState(work_path / "e2e", fingerprint_blob(tcfg))
    state.open()
    if train_files or calib_files:
        # the same rule as `moefy train` on a saved checkpoint: skip the calibration tokens when
        # the stream opens with the calibration's first file (also when --train-data names it)
        specs = list(train_files or calib_files)
        cal = {"files": [str(Path(f).expanduser().resolve()) for f in calib_files],
               "sequences": int(calib_ids.shape[0]), "seq_len": ccfg.seq_len}
        skip, note = calibration_skip({"calibration": cal}, specs)
        if note and not skip:  # a warning; a skip is said by the description
            log(note)
        desc = ", ".join(specs) + skipped_note(skip)
    else:
        cache = work_path / "e2e_data_free"
        sample_data_free(teacher_model, tok, tcfg.tokens + tcfg.val_sequences * tcfg.seq_len, tcfg.seq_len, cache,
                         ccfg.seed + 1, log=log)
        specs, skip, desc = [str(cache)], 0, f"data-free: {tcfg.tokens} tokens sampled from the dense model (seed {ccfg.seed + 1})"
    try:
        data = PackedData(tok, specs, tcfg.seq_len, seed=tcfg.seed, val_sequences=tcfg.val_sequences, skip_tokens=skip,
                          shuffle_window=tcfg.shuffle_window)
    except Exception as exc:
        from ..errors import CalibrationDataError

        if isinstance(exc, CalibrationDataError) and calib_files and not train_files:
            raise CalibrationDataError(
                f"the end-to-end stage trains on the calibration files past the calibration tokens, and {exc}; "
                "give --train-data or lower --calib-tokens"
            ) from None
        raise
    log(f"end-to-end: training on {desc}")

    def report(row: dict[str, Any]) -> None:
        if progress is not None:
            progress("end-to-end", row["step"], row["steps"])

    outcome = train(student, Teacher(teacher_model), data, tcfg, state, accelerator, learn, log=log, report=report)
    moe, _ = export_student(student)
    val = [(int(h["step"]), float(h["val_kl"])) for h in outcome.history]
    entry = training_entry(tcfg, outcome, "the dense model (in process)", desc,
                           f"first {tcfg.val_sequences} sequences of the training text", 1)
    return moe, StageResult(outcome.losses, val, outcome.best_step if tcfg.keep_best else None, entry)


def fingerprint_blob(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
