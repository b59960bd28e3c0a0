"""Command-line interface: ``moefy convert``, ``train``, ``tokenize``, ``eval``, ``export``, ``compare``.

Every user-facing failure is a :class:`moefy.errors.MoefyError`: one line on stderr and its
own exit code, never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import (
    CalibrationDataError,
    ConfigError,
    DiskFullError,
    InterruptedRun,
    MoefyError,
    OutOfMemoryError,
    OutputExistsError,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Convert dense decoder LLMs into sparse Mixture-of-Experts (DOT-MoE).")
console = Console(stderr=True)


class _Bars:
    """Rich progress bars keyed by stage name."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "_Bars":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _log(msg: str) -> None:
    console.print(f"[dim]moefy:[/dim] {msg}")


@app.command()
def convert(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="HF directory, .gguf file, hub id, or alias 'smollm2-135m' (or the recipe's model:).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output checkpoint directory (or the recipe's out:).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe of the whole conversion (model, out, calib, train_data, any ConvertConfig field); flags override it.")] = None,
    active: Annotated[Optional[float], typer.Option("--active", help="Active FFN fraction in (0, 1): the measured-best layout for it, scaled to the model's d_ffn (moefy.layouts); --experts/--top-k/--shared/--shared-by given too override its choice.")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", "-E", help="Routed experts per FFN. [default: 8]", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="Experts each token uses. [default: 2]", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="dot | dot-frozen | random | param-cluster | act-cluster | prune")] = "dot",
    shared: Annotated[Optional[int], typer.Option("--shared", help="Always-active shared neurons per layer (taken from the routed budget). [default: 0]", show_default=False)] = None,
    shared_by: Annotated[Optional[str], typer.Option(help="Shared neurons chosen by: rate (CMoE: most often active) | importance (|activation| x down norm) | obs (greedy structured Optimal Brain Surgeon on the layer's target; with --method prune it picks the kept neurons too). [default: rate]", show_default=False)] = None,
    allocate: Annotated[str, typer.Option(help="Shared neurons per layer: uniform (--shared in every layer) | kl (measured per layer on the calibration text and moved to the layers whose held-out KL drops most; the mean stays --shared; needs the whole model in memory)")] = "uniform",
    allocate_tokens: Annotated[int, typer.Option(help="--allocate kl measures on at most this many of the calibration tokens (the first ones).")] = 16384,
    calib: Annotated[Optional[list[str]], typer.Option("--calib", help="Calibration text (.txt/.jsonl/.json); repeatable. SOURCE@WEIGHT (any --data source of moefy train, or 'teacher': samples of the dense model) makes a weighted mixture. None: data-free.")] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration token budget.")] = 32768,
    seq_len: Annotated[int, typer.Option(help="Calibration sequence length.")] = 512,
    train_data: Annotated[Optional[list[str]], typer.Option("--train-data", help="End-to-end stage text (default: the --calib files past the calibration tokens); repeatable.")] = None,
    stage: Annotated[str, typer.Option(help="layerwise | e2e | both")] = "layerwise",
    weights: Annotated[str, typer.Option(help="Expert weight adaptation: none | ridge | grad | grad+ridge | ridge+grad")] = "ridge",
    steps: Annotated[int, typer.Option(help="Layer-wise assignment training steps per layer.")] = 40,
    e2e_steps: Annotated[int, typer.Option(help="End-to-end (recovery training) steps of --e2e-batch sequences.")] = 100,
    e2e_batch: Annotated[int, typer.Option(help="End-to-end: sequences per step.")] = 4,
    e2e_val_sequences: Annotated[int, typer.Option(help="End-to-end: calibration sequences held out to keep the best state (0: keep the last).")] = 4,
    init: Annotated[str, typer.Option(help="DOT-MoE initial split: act-cluster | param-cluster | random | best (per layer, whichever of act-cluster and param-cluster fits better on held-out tokens; by model KL with --select model)")] = "act-cluster",
    select: Annotated[str, typer.Option(help="Which fit each layer keeps: layer (lower held-out layer error) | model (trained or initial-split fit, by held-out KL of the model's logits; needs the whole model in memory)")] = "layer",
    rounding: Annotated[str, typer.Option(help="greedy (paper) | exact (transport LP)")] = "greedy",
    layers: Annotated[Optional[str], typer.Option(help="Comma-separated decoder layers to convert (default all).")] = None,
    router: Annotated[str, typer.Option(help="topk (hard top-k, STE) | lapsum (SoftMoE truncated LapSum soft top-k)")] = "topk",
    gating: Annotated[str, typer.Option(help="top-k expert weights: mask (1.0, the paper) | softmax (router probability; exact Qwen2-MoE and gguf-qwen2moe export) | softmax-renorm (renormalised over the top-k; exact Mixtral, Qwen2-MoE and GGUF export)")] = "mask",
    budget: Annotated[Optional[float], typer.Option(help="LapSum: total mean active experts over all layers K (default top-k x layers).")] = None,
    budget_mode: Annotated[str, typer.Option(help="LapSum: learned (per-layer k_l, needs --stage e2e|both) | fixed (K/L)")] = "learned",
    max_active: Annotated[Optional[int], typer.Option(help="LapSum: most experts one token may use.")] = None,
    token_weighting: Annotated[str, typer.Option(help="Layer loss: clip (cap outlier tokens' share) | none (plain summed MSE)")] = "none",
    drift_correction: Annotated[Optional[float], typer.Option(help="Layer targets: 0 fits each FFN to the dense FFN on the converted model's inputs; a in (0, 1] adds a x the drift of the residual stream from the dense model's, so each layer also undoes part of the error of the layers below (carries a second stream of calibration activations). [default: 0.5 with --shared neurons, else 0; always 0 on Gemma 2/3, whose FFN output is normalised]", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Weights and carried activations: bf16 | fp16 | fp32 (fitting runs in fp32). [default: the checkpoint's own; fp32 for GGUF and --stage e2e|both]", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="Where each layer is fitted: cpu | cuda | cuda:N | auto (the first GPU, else the CPU).")] = "auto",
    onload: Annotated[Optional[bool], typer.Option("--onload/--no-onload", help="Read the dense model layer by layer from its safetensors files (peak memory: one layer plus activations), or load it whole. [default: layer by layer whenever possible]", show_default=False)] = None,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory budget, e.g. 20GiB: refused if one layer cannot fit; calibration activations spill to disk when they do not fit beside a layer. [default: the memory available]", show_default=False)] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard of the output (model.safetensors.index.json when there are several).")] = "5GB",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Convert MODEL into an MoE checkpoint at --out (or as a --recipe records it)."""
    from .config import LAYOUT_FIELDS, ConvertConfig, ConvertRecipe, load_convert_recipe
    from .runner import run_convert, work_dir_for

    def given(name: str) -> bool:  # on the command line (or its environment), not a default
        source = ctx.get_parameter_source(name)  # by name: typer may bring its own copy of click
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    rec = load_convert_recipe(recipe) if recipe is not None else ConvertRecipe()
    model = model if model is not None else rec.model
    out = out if out is not None else (Path(rec.out) if rec.out is not None else None)
    if model is None:
        raise ConfigError("no model: give MODEL or a --recipe with model:")
    if out is None:
        raise ConfigError("no output: give --out or a --recipe with out:")
    calib_files = [str(c) for c in calib] if given("calib") and calib else list(rec.calib or [])
    train_files = list(train_data) if given("train_data") and train_data else rec.train_data
    overwrite = overwrite if given("overwrite") or rec.overwrite is None else rec.overwrite
    layer_list = None
    if layers:
        try:
            layer_list = [int(v) for v in layers.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--layers must be comma-separated integers, got {layers!r}") from None
    flags: dict[str, tuple[str, Any]] = {  # CLI parameter -> (ConvertConfig field, value)
        "active": ("active", active), "experts": ("n_experts", experts), "top_k": ("top_k", top_k),
        "shared": ("n_shared", shared), "shared_by": ("shared_by", shared_by), "method": ("method", method),
        "allocate": ("allocate", allocate), "allocate_tokens": ("allocate_tokens", allocate_tokens),
        "stage": ("stage", stage), "seed": ("seed", seed), "calib_tokens": ("calib_tokens", calib_tokens),
        "seq_len": ("seq_len", seq_len), "weights": ("weights", weights), "steps": ("steps", steps),
        "e2e_steps": ("e2e_steps", e2e_steps), "e2e_val_sequences": ("e2e_val_sequences", e2e_val_sequences),
        "e2e_batch": ("e2e_batch", e2e_batch), "init": ("init", init), "select": ("select", select), "rounding": ("rounding", rounding),
        "layers": ("layers", layer_list), "router": ("router", router), "gating": ("gating", gating),
        "budget": ("budget", budget), "budget_mode": ("budget_mode", budget_mode), "max_active": ("max_active", max_active),
        "token_weighting": ("token_weighting", token_weighting), "dtype": ("dtype", dtype),
        "drift_correction": ("drift_correction", drift_correction),
    }
    settings = dict(rec.config)
    if given("active"):  # --active on the command line picks the layout: the recipe's layout gives way
        for name in LAYOUT_FIELDS:
            settings.pop(name, None)
    if given("active") or given("shared") or given("allocate"):  # a recipe's per-layer counts belong to its own layout
        settings.pop("shared_per_layer", None)
    settings.update({fld: value for name, (fld, value) in flags.items() if given(name) and value is not None})
    explicit = [name for name in LAYOUT_FIELDS if name in settings] if settings.get("active") is not None else []
    cfg = ConvertConfig(**settings, explicit_layout=explicit)
    cfg.validate()
    try:
        with _Bars() as bars:
            result = run_convert(model, out, cfg, calib_files, overwrite=overwrite, log=_log, progress=bars,
                                 train_files=list(train_files) if train_files else None, device=device,
                                 onload=onload, max_memory=max_memory, max_shard_size=max_shard_size)
    except KeyboardInterrupt:
        raise InterruptedRun(
            f"interrupted; finished layers are saved in {work_dir_for(out)}; rerun the same command to resume"
        ) from None
    rec = result.record
    table = Table(title=f"moefy convert -> {result.out}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in [
        ("method", rec["method"]), ("experts / top-k", f"{rec['n_experts']} / {rec['top_k']}"),
        ("shared neurons", _shared_cell(rec)), ("active FFN fraction", f"{rec['active_fraction']:.3f}"),
        ("calibration tokens", rec["calibration"]["tokens"]),
        ("mean rel. error (init)", f"{rec['summary']['mean_error_init']:.4f}"),
        ("mean rel. error (routed)", f"{rec['summary']['mean_error_routed']:.4f}"),
        ("mean rel. error (final)", f"{rec['summary']['mean_error_final']:.4f}"),
        ("wall time", f"{rec['wall_seconds']:.0f} s"),
    ]:
        table.add_row(k, str(v))
    console.print(table)


def _shared_cell(rec: dict[str, Any]) -> str:
    """Shared neurons per layer: the count, or the mean and range when --allocate spread them."""
    per_layer = (rec.get("config") or {}).get("shared_per_layer")
    if not per_layer:
        return str(rec["n_shared"])
    return f"{rec['n_shared']} on average ({min(per_layer)}-{max(per_layer)} per layer)"


@app.command("eval")
def eval_cmd(
    models: Annotated[list[str], typer.Argument(help="Dense model(s) (as for convert) and/or converted directories; the first is the reference of the 'x ref' and retention rows.")],
    ppl: Annotated[Optional[list[Path]], typer.Option("--ppl", help="Text file for perplexity (e.g. wiki.test.raw); repeatable, one row per file.")] = None,
    seq_len: Annotated[int, typer.Option(help="Perplexity window length.")] = 1024,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate only the first N windows of each --ppl file.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated zero-shot tasks, scored by lm-eval: moefy's offline copies (arc_easy, arc_challenge, piqa, hellaswag, winogrande, openbookqa, boolq, sciq, social_iqa), tasks in --task-dir, or any lm-eval task whose data are reachable.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N items of each task.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Folder with commonsense/ and hellaswag/ data.")] = None,
    task_dir: Annotated[Optional[list[Path]], typer.Option("--task-dir", help="Folder of extra lm-eval task YAMLs (e.g. over local parquet files); repeatable.")] = None,
    batch_size: Annotated[int, typer.Option(help="Zero-shot batch size.")] = 16,
    metric: Annotated[str, typer.Option(help="Zero-shot metric of the retention row: acc_norm | acc.")] = "acc_norm",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write results as JSON here (rewritten after each model).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights while evaluating: fp32 | bf16 | fp16 | auto (the checkpoint's own).")] = "fp32",
) -> None:
    """Perplexity and/or zero-shot accuracy of each MODEL, side by side, with each model's
    perplexity as a multiple of the first model's and the share of the first model's
    above-chance zero-shot accuracy it keeps.

    Every model, file and task is checked before the first model runs; each model is loaded whole
    (in --dtype), one that cannot fit in this machine's memory is refused in one line; the JSON
    is rewritten after each model, so a later failure keeps what was computed."""
    from .evaluate import add_relative, check_eval_text, evaluate_model
    from .memory import DTYPES
    from .models import locate

    ppl = list(ppl or [])
    if not ppl and not tasks:
        raise ConfigError("nothing to evaluate: give --ppl FILE and/or --tasks")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    if metric not in ("acc", "acc_norm"):
        raise ConfigError(f"unknown --metric {metric!r}; choose acc_norm or acc")
    for f in ppl:
        check_eval_text(f)
    sources = [locate(m) for m in models]  # every model before any work
    names: list[str] = []
    if tasks:
        from .zeroshot import check_tasks

        try:
            names = check_tasks(tasks, data_root, limit, task_dir or [])
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
    labels = model_labels(models)
    results: list[dict[str, Any]] = []
    for m, src, label in zip(models, sources, labels):
        with _Bars() as bars:
            try:
                r = evaluate_model(m, src, ppl, seq_len, max_windows, names, limit, data_root, batch_size, dtype,
                                   task_dir or [], progress=bars, log=_log)
            except ValueError as exc:  # lm-eval could not run a task: one line
                raise ConfigError(str(exc).splitlines()[0]) from None
        r["label"] = label
        results.append(r)
        add_relative(results, metric)
        if json_out is not None:
            _write_json(json_out, {"reference": models[0], "metric": metric, "complete": len(results) == len(models),
                                   "models": results})
    console.print(eval_table(results, metric))
    for line in retention_notes(results):
        _log(line)


def model_labels(models: list[str]) -> list[str]:
    """Short, distinct column names: a directory's last component (more of its path where two
    share it), an alias or file name as given."""
    parts = [Path(m).parts or (m,) for m in models]
    depth = [1] * len(models)
    for _ in range(8):
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        dup = {lab for lab in labels if labels.count(lab) > 1}
        if not dup:
            return labels
        depth = [d + 1 if lab in dup and d < len(p) else d for lab, p, d in zip(labels, parts, depth)]
    return list(models)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def eval_table(results: list[dict[str, Any]], metric: str = "acc_norm") -> Table:
    """``moefy eval``'s table: a column per model (named by its label), a row per measure."""
    from .compare import acc_cell

    table = Table(title="moefy eval")
    table.add_column("metric")
    for r in results:
        table.add_column(r.get("label", r["model"]), justify="right", overflow="fold")
    ref = results[0]
    for name, p0 in ref.get("perplexity", {}).items():
        cells = [r.get("perplexity", {}).get(name) for r in results]
        table.add_row(f"perplexity, {Path(name).name} ({p0['tokens']} tokens)", *[f"{c['ppl']:.3f}" if c else "-" for c in cells])
        if len(results) > 1:
            table.add_row("  x ref (first column)", *[f"{c['x_ref']:.2f}x" if c and "x_ref" in c else "-" for c in cells])
    if any("mean_active_experts" in r for r in results):
        table.add_row("active experts / token / layer (measured)",
                      *[f"{r['mean_active_experts']:.3f}" if "mean_active_experts" in r else "-" for r in results])
    for name in ref.get("tasks", {}):
        table.add_row(f"{name} acc / acc_norm (n={ref['tasks'][name]['n']})", *[acc_cell(r["tasks"][name], 4) for r in results])
    if len(results) > 1 and ref.get("tasks"):
        ret = [r.get("retention") or {} for r in results]
        table.add_row(f"above-chance {metric} kept", *[f"{x['retention']:.0%} ± {x['stderr']:.0%}" if x.get("retention") is not None
                                                      else "-" for x in ret])
    return table


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="A moefy checkpoint directory (the output of moefy convert).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="hf | mixtral | qwen2-moe | gguf (llama.cpp llama arch) | gguf-qwen2moe (llama.cpp qwen2moe arch: shared neurons)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (hf, mixtral, qwen2-moe) or .gguf file (gguf, gguf-qwen2moe).")],
    dtype: Annotated[str, typer.Option("--dtype", help="GGUF tensor type: f32 | f16 (HF formats keep the checkpoint's dtype).")] = "f32",
    gguf_align: Annotated[int, typer.Option("--gguf-align", help="GGUF formats: pad experts to a multiple of N neurons (zero neurons, exact); 32 lets llama.cpp's Q8_0/Q5_0/Q4_0 quantize every expert tensor.")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Export MODEL for serving: stock Mixtral / Qwen2-MoE checkpoints, a llama.cpp GGUF, or a copy.

    Refused (exit 15, nothing written) when the target cannot compute exactly the same function."""
    from .serving_export import export_checkpoint

    _log(f"exporting {model} as {fmt}")
    path = export_checkpoint(model, fmt, out, overwrite=overwrite, dtype=dtype, gguf_align=gguf_align, log=_log)
    console.print(f"exported {fmt} -> {path}")


def _parse_lr_groups(items: list[str] | None, freeze: list[str] | None) -> dict[str, float]:
    lrs: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            lrs[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--lr-group takes GROUP=RATE, got {item!r}") from None
    for name in freeze or []:
        lrs[name.strip()] = 0.0
    return lrs


class _TrainBar:
    """A progress bar with tokens/s, ETA and the current KL."""

    def __init__(self) -> None:
        from rich.progress import TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console,
        )
        self.task: Any = None

    def __enter__(self) -> "_TrainBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, row: dict[str, Any]) -> None:
        info = f"{row['tokens_per_s']:.0f} tok/s  KL {row['kl']:.4f}"
        if "val_kl" in row:
            info += f"  held-out KL {row['val_kl']:.4f} PPL {row['val_ppl']:.2f}"
        if self.task is None:
            self.task = self.progress.add_task("train", total=row["steps"], info=info)
        self.progress.update(self.task, completed=row["step"], total=row["steps"], info=info)


@app.command()
def train(
    ckpt: Annotated[Path, typer.Argument(help="A moefy checkpoint (the output of moefy convert or moefy train).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint directory.")],
    teacher: Annotated[Optional[str], typer.Option(help="The dense model (as for convert); default: the checkpoint's recorded source.")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Training text: files, globs, directories, .jsonl/.parquet/.arrow, moefy tokenize shards, or 'teacher' (text sampled from it); SOURCE@WEIGHT makes a weighted mixture; repeatable. None: sampled from the teacher.")] = None,
    val_data: Annotated[Optional[list[str]], typer.Option("--val-data", help="Held-out text (default: the first --val-sequences of --data, or of each mixture source, never trained on); repeatable: one held-out set per file, each scored apart.")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Training tokens (all processes together).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Sequence length.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per process and micro-batch.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr_scale: Annotated[Optional[float], typer.Option("--lr-scale", help="Multiply every group's learning rate.")] = None,
    lr_group: Annotated[Optional[list[str]], typer.Option("--lr-group", help="GROUP=RATE (experts, routers, assignment, attention, norms, embeddings, lm_head, other); repeatable.")] = None,
    freeze: Annotated[Optional[list[str]], typer.Option("--freeze", help="Freeze a parameter group; repeatable.")] = None,
    kl_weight: Annotated[Optional[float], typer.Option(help="Weight of KL(teacher || student).")] = None,
    ce_weight: Annotated[Optional[float], typer.Option(help="Weight of the LM cross-entropy.")] = None,
    z_loss_weight: Annotated[Optional[float], typer.Option(help="Weight of the router z-loss.")] = None,
    balance_weight: Annotated[Optional[float], typer.Option(help="Weight of the load-balance loss.")] = None,
    learn_assignment: Annotated[Optional[bool], typer.Option("--learn-assignment/--freeze-assignment", help="Train the Sinkhorn assignment jointly, annealed tau_start -> tau_end (default: frozen at the checkpoint's split; measured better).")] = None,
    tau_start: Annotated[Optional[float], typer.Option(help="Sinkhorn temperature at the start.")] = None,
    tau_end: Annotated[Optional[float], typer.Option(help="Sinkhorn temperature when the assignment freezes.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warmup steps.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Held-out evaluation every N steps.")] = None,
    val_sequences: Annotated[Optional[int], typer.Option(help="Held-out sequences.")] = None,
    keep_best: Annotated[Optional[bool], typer.Option("--keep-best/--keep-last", help="Export the state with the best held-out --select-by figure, or the last.")] = None,
    teacher_cache: Annotated[Optional[Path], typer.Option("--teacher-cache", help="Folder where the teacher's top-k next-token distributions are kept per sequence and reused across epochs and runs (one process). [default: the live teacher at every step]", show_default=False)] = None,
    cache_top_k: Annotated[Optional[int], typer.Option("--cache-top-k", help="Tokens kept per position in --teacher-cache (plus the mass of the rest). [default: 64]", show_default=False)] = None,
    select_by: Annotated[Optional[str], typer.Option("--select-by", help="What keep-best minimises on the held-out text: loss (the trained objective: kl-weight x KL + ce-weight x CE) | kl | ppl. [default: loss]", show_default=False)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Resumable checkpoint every N steps.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on GPU) | no | bf16 | fp16")] = None,
    num_processes: Annotated[int, typer.Option(help="Data-parallel processes on this machine (gloo on CPU, NCCL on GPUs); or use accelerate launch.")] = 1,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe (train: settings, data, teacher, val_data); flags override it.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Recovery training: continue training a moefy checkpoint against its dense teacher."""
    from .training.config import TrainConfig, load_recipe
    from .training.run import launch_processes, run_train, work_dir_for

    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        argv = [a for a in sys.argv[1:]]
        cleaned: list[str] = []
        skip = False
        for a in argv:
            if skip:
                skip = False
                continue
            if a == "--num-processes":
                skip = True
                continue
            if a.startswith("--num-processes="):
                continue
            cleaned.append(a)
        raise typer.Exit(launch_processes(cleaned, num_processes))
    settings: dict[str, Any] = {}
    if recipe is not None:
        r = load_recipe(recipe)
        settings.update(r.get("train", {}) or {})
        data = data or r.get("data")
        val_data = val_data or r.get("val_data")
        teacher = teacher or r.get("teacher")
    flags = dict(tokens=tokens, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr_scale=lr_scale,
                 kl_weight=kl_weight, ce_weight=ce_weight, z_loss_weight=z_loss_weight, balance_weight=balance_weight,
                 learn_assignment=learn_assignment, tau_start=tau_start, tau_end=tau_end, warmup_steps=warmup_steps,
                 eval_every=eval_every, val_sequences=val_sequences, keep_best=keep_best, select_by=select_by,
                 teacher_cache=str(teacher_cache) if teacher_cache is not None else None, cache_top_k=cache_top_k,
                 checkpoint_every=checkpoint_every,
                 gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, seed=seed)
    settings.update({k: v for k, v in flags.items() if v is not None})
    group_lrs = _parse_lr_groups(lr_group, freeze)
    if group_lrs:
        settings["lrs"] = {**(settings.get("lrs") or {}), **group_lrs}
    cfg = TrainConfig.from_dict(settings)
    cfg.validate()
    _check_training_memory(ckpt)
    try:
        with _TrainBar() as bar:
            res = run_train(ckpt, out, cfg, [d if isinstance(d, dict) else str(d) for d in data or []] or None, teacher=teacher,
                            val_data=[str(v) for v in val_data or []] or None, overwrite=overwrite, log=_log, report=bar)
    except KeyboardInterrupt:
        raise InterruptedRun(f"interrupted; progress is saved in {work_dir_for(out)}; rerun the same command to resume") from None
    entry = res.record["training"][-1] if "training" in res.record else None
    if entry is not None:
        table = Table(title=f"moefy train -> {res.out}")
        table.add_column("step")
        table.add_column("tokens", justify="right")
        table.add_column("held-out KL", justify="right")
        table.add_column("held-out PPL", justify="right")
        table.add_column("held-out loss", justify="right")
        sets = [k[len("val_ppl/"):] for k in (entry["history"][0] if entry["history"] else {}) if k.startswith("val_ppl/")]
        for name in sets:
            table.add_column(f"PPL {name}", justify="right")
        tps = cfg.seq_len * cfg.batch_size * cfg.grad_accum * entry["processes"]
        for h in entry["history"]:
            mark = " (kept)" if h["step"] == entry["kept_step"] else ""
            table.add_row(f"{h['step']}{mark}", str(h["step"] * tps), f"{h['val_kl']:.4f}", f"{h['val_ppl']:.2f}",
                          f"{h.get('val_loss', h['val_kl']):.4f}", *[f"{h[f'val_ppl/{n}']:.2f}" for n in sets])
        _log(f"kept by held-out {cfg.select_by}")
        console.print(table)
        _log(f"{entry['tokens']} tokens in {entry['seconds']:.0f} s ({entry['tokens_per_second']:.1f} tokens/s), "
             f"peak RSS {entry['peak_rss_mib']:.0f} MiB")


def _check_training_memory(ckpt: Path) -> None:
    """``moefy train`` holds the whole student (fp32 weights, gradients and two AdamW states for
    what trains) and the dense teacher: refuse in one line when even their weights cannot fit."""
    from .memory import available_memory, check_whole_model, format_size
    from .models import locate, parameter_count

    try:
        n_params = parameter_count(locate(str(ckpt)))
    except MoefyError:
        return  # run_train says what is wrong with the checkpoint
    if not n_params:
        return
    check_whole_model("moefy train (the student and the teacher in fp32)", n_params * 8, "train on a machine with more memory")
    if n_params * 20 > available_memory():
        _log(f"moefy train holds the student and the teacher whole: about {format_size(n_params * 20)} for "
             f"{n_params / 1e6:.0f}M parameters when every group trains (fp32 weights, gradients, AdamW states), "
             f"{format_size(available_memory())} is available; --freeze groups to need less")


@app.command()
def tokenize(
    model: Annotated[str, typer.Argument(help="Model (or checkpoint) whose tokenizer to use.")],
    data: Annotated[list[str], typer.Argument(help="Text files, globs, directories, .jsonl/.parquet/.arrow.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder of memory-mapped token shards.")],
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 1 << 26,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Tokenize text once into memory-mapped shards that moefy train --data reads directly."""
    from transformers import AutoTokenizer

    from .models import load
    from .training.data import write_token_shards

    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; pass --overwrite to replace it")
    p = Path(model)
    tok = AutoTokenizer.from_pretrained(str(p)) if p.is_dir() else load(model).tokenizer
    index = write_token_shards(tok, data, out, shard_tokens=shard_tokens)
    console.print(f"{index['tokens']} tokens in {len(index['shards'])} shard(s) -> {out}")


def retention_notes(results: list[dict[str, Any]]) -> list[str]:
    """Which tasks the retention row counts, and why the others are not counted."""
    ret = results[-1].get("retention") if len(results) > 1 else None
    if not ret:
        return []
    lines = [f"retention against {results[0].get('label', results[0]['model'])} counts "
             f"{', '.join(ret['tasks']) or 'no task'}"]
    lines += [f"not counted: {task}: {why}" for task, why in ret["excluded"].items()]
    return lines


@app.command()
def compare(
    model: Annotated[str, typer.Argument(help="Dense model (as for convert).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory (resumable).")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "dot,dot-frozen,random,param-cluster,act-cluster,prune",
    grid: Annotated[str, typer.Option(help="Comma-separated E:k or E:k:shared points.")] = "8:2,8:4",
    calib: Annotated[Optional[list[Path]], typer.Option("--calib", help="Calibration text; repeatable.")] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration token budget (same for every method).")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Calibration sequence length.")] = 512,
    shared: Annotated[int, typer.Option("--shared", help="Always-active shared neurons per layer.")] = 0,
    shared_by: Annotated[str, typer.Option(help="Shared neurons chosen by: rate | importance | obs")] = "rate",
    steps: Annotated[int, typer.Option(help="Layer-wise assignment steps (DOT-MoE).")] = 40,
    weights: Annotated[str, typer.Option(help="none | ridge | grad | grad+ridge | ridge+grad")] = "ridge",
    ppl: Annotated[Optional[Path], typer.Option("--ppl", help="Perplexity text.")] = None,
    eval_seq_len: Annotated[int, typer.Option(help="Perplexity window.")] = 1024,
    max_windows: Annotated[Optional[int], typer.Option(help="First N perplexity windows.")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Zero-shot tasks, comma-separated.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="First N items per task.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Folder with commonsense/ and hellaswag/.")] = None,
    keep_models: Annotated[bool, typer.Option(help="Keep each cell's converted checkpoint.")] = True,
    token_weighting: Annotated[str, typer.Option(help="Layer loss: clip | none")] = "none",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    report_only: Annotated[bool, typer.Option(help="Only rebuild the report from the finished cells in --out.")] = False,
) -> None:
    """Run a (method x E:k) grid through the same pipeline and write a report."""
    from .compare import parse_grid, report_only as rebuild_report, run_compare
    from .config import ConvertConfig

    if report_only:
        meta = {"model": model, "calibration": [str(c) for c in calib or []], "ppl_file": str(ppl) if ppl else None,
                "max_windows": max_windows, "tasks": [t.strip() for t in tasks.split(",")] if tasks else None,
                "limit": limit}
        res = rebuild_report(out, command="moefy " + " ".join(sys.argv[1:]), meta=meta)
        console.print(f"report of {len(res['cells'])} cell(s) written to {out}/report.md")
        return

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    points = parse_grid(grid, shared)
    base = ConvertConfig(calib_tokens=calib_tokens, seq_len=seq_len, n_shared=shared, shared_by=shared_by, steps=steps, weights=weights, seed=seed,
                          token_weighting=token_weighting)
    for m in method_list:
        for e, k, s in points:
            replace_cfg = ConvertConfig(**{**base.to_dict(), "method": m, "n_experts": e, "top_k": k, "n_shared": s})
            replace_cfg.validate()
    if ppl is None and not tasks:
        raise ConfigError("nothing to evaluate: give --ppl FILE and/or --tasks")
    results = run_compare(
        model, out, method_list, points, base, [str(c) for c in calib or []], str(ppl) if ppl else None,
        seq_len=eval_seq_len, max_windows=max_windows,
        tasks=[t.strip() for t in tasks.split(",")] if tasks else [], limit=limit,
        data_root=str(data_root) if data_root else None, keep_models=keep_models, log=_log,
        command="moefy " + " ".join(sys.argv[1:]),
    )
    console.print((out / "report.md").read_text())
    _log(f"report written to {out} ({len(results['cells'])} cells)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning moefy errors into one line and an exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except MoefyError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[bold red]error:[/bold red] interrupted")
        sys.exit(130)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            err = DiskFullError(f"no space left on the device{f' writing {exc.filename}' if exc.filename else ''}; free space and rerun (a conversion resumes)")
            console.print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
            sys.exit(err.exit_code)
        raise
    except MemoryError:
        err = OutOfMemoryError("out of memory; lower --calib-tokens or --seq-len (or convert fewer --layers at a time)")
        console.print(f"[bold red]error:[/bold red] {err}")
        sys.exit(err.exit_code)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower() or "not enough memory" in str(exc).lower():
            err = OutOfMemoryError("out of memory; lower --calib-tokens or --seq-len (or convert fewer --layers at a time)")
            console.print(f"[bold red]error:[/bold red] {err}")
            sys.exit(err.exit_code)
        raise
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors etc.
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
