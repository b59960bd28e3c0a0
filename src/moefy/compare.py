"""``moefy compare``: a grid of (method x (E, k)) conversions on one model and one calibration
budget, each evaluated the same way, written as a report directory:

- ``results.json``: every number (per cell: PPL, zero-shot accuracies, per-layer errors, loads);
- ``report.md``: the table, with the command that made it;
- ``ppl_vs_active.png``, ``layer_error.png``, ``expert_load.png``.

Resumable: a cell whose ``eval.json`` exists is not recomputed; an interrupted conversion
resumes from its work directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .config import ConvertConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class Cell:
    method: str
    n_experts: int
    top_k: int
    n_shared: int = 0

    @property
    def key(self) -> str:
        return f"{self.method}-E{self.n_experts}k{self.top_k}" + (f"s{self.n_shared}" if self.n_shared else "")


def parse_grid(grid: str, shared: int = 0) -> list[tuple[int, int, int]]:
    """``E:k`` or ``E:k:shared`` points (``shared`` defaults to ``--shared``)."""
    from .errors import ConfigError

    out = []
    for item in grid.split(","):
        try:
            parts = [int(v) for v in item.strip().split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else shared))
        except ValueError:
            raise ConfigError(f"--grid entries look like E:k or E:k:shared (e.g. 8:2,8:4,7:1:192), got {item!r}") from None
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def evaluate_model(model: str, ppl_file: str | None, seq_len: int, max_windows: int | None,
                   tasks: list[str], limit: int | None, data_root: str | None) -> dict[str, Any]:
    from .evaluate import load_eval_ids, perplexity
    from .models import load

    loaded = load(model)
    res: dict[str, Any] = {}
    if ppl_file:
        res.update(perplexity(loaded.model, load_eval_ids(loaded.tokenizer, ppl_file), seq_len=seq_len, max_windows=max_windows))
    if tasks:
        from .zeroshot import evaluate_tasks, lm_eval_version

        res["tasks"] = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, data_root=data_root, limit=limit)
        res["tasks_scored_by"] = f"lm-eval {lm_eval_version()}"
    return res


def run_compare(
    model: str,
    out: Path,
    methods: list[str],
    grid: list[tuple[int, int, int]],
    base: ConvertConfig,
    calib: list[str],
    ppl_file: str | None,
    seq_len: int = 1024,
    max_windows: int | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    data_root: str | None = None,
    keep_models: bool = True,
    log: Log = print,
    command: str = "",
) -> dict[str, Any]:
    from .runner import run_convert

    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks or []
    results: dict[str, Any] = {"model": model, "calibration": calib, "calib_tokens": base.calib_tokens,
                               "ppl_file": ppl_file, "max_windows": max_windows, "tasks": tasks, "limit": limit,
                               "command": command, "cells": {}}
    dense_eval = out / "cells" / "dense" / "eval.json"
    if not dense_eval.is_file():
        log("evaluating the dense model")
        _write_json(dense_eval, evaluate_model(model, ppl_file, seq_len, max_windows, tasks, limit, data_root))
    results["dense"] = json.loads(dense_eval.read_text())
    for e, k, n_shared in grid:
        for method in methods:
            cell = Cell(method, e, k, n_shared)
            cdir = out / "cells" / cell.key
            eval_path = cdir / "eval.json"
            if not eval_path.is_file():
                log(f"cell {cell.key}: converting")
                cfg = replace(base, method=method, n_experts=e, top_k=k, n_shared=n_shared)
                res = run_convert(model, cdir / "model", cfg, calib, overwrite=True, log=log)
                _write_json(cdir / "record.json", res.record)
                log(f"cell {cell.key}: evaluating")
                ev = evaluate_model(str(cdir / "model"), ppl_file, seq_len, max_windows, tasks, limit, data_root)
                _write_json(eval_path, ev)
                if not keep_models:
                    import shutil

                    shutil.rmtree(cdir / "model", ignore_errors=True)
            results["cells"][cell.key] = _cell_entry(cdir)
    return write_report(out, results)


def _cell_entry(cdir: Path) -> dict[str, Any]:
    rec = json.loads((cdir / "record.json").read_text())
    return {
        "method": rec["method"], "n_experts": rec["n_experts"], "top_k": rec["top_k"], "n_shared": rec.get("n_shared", 0),
        "shared_by": rec.get("config", {}).get("shared_by", "rate"), "active_fraction": rec["active_fraction"],
        "eval": json.loads((cdir / "eval.json").read_text()),
        "layer_errors": [r["error_final"] for r in rec["layer_reports"]],
        "layer_errors_routed": [r["error_routed"] for r in rec["layer_reports"]],
        "expert_load": [r["expert_load"] for r in rec["layer_reports"]],
        "summary": rec["summary"],
        "convert_seconds": rec.get("wall_seconds"),
    }


def write_report(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    _write_json(out / "results.json", results)
    (out / "report.md").write_text(markdown_report(results))
    plot_report(results, out)
    return results


def report_only(out: Path, command: str = "", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild the report from every finished cell under ``out/cells`` (cells copied in from
    other runs included) without converting or evaluating anything.  ``meta`` (model,
    calibration, ppl_file, max_windows, tasks, limit) fills what no earlier results.json says."""
    from .errors import ConfigError

    prev = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    dense = out / "cells" / "dense" / "eval.json"
    if not dense.is_file():
        raise ConfigError(f"{out} has no evaluated dense cell (cells/dense/eval.json); run moefy compare first")
    results: dict[str, Any] = {k: v for k, v in prev.items() if k not in ("cells", "dense")}
    for k, v in (meta or {}).items():
        if v is not None and v != [] and not results.get(k):
            results[k] = v
    results["dense"] = json.loads(dense.read_text())
    cells = {}
    records = []
    for cdir in sorted((out / "cells").iterdir()):
        if cdir.name != "dense" and (cdir / "eval.json").is_file() and (cdir / "record.json").is_file():
            cells[cdir.name] = _cell_entry(cdir)
            records.append(json.loads((cdir / "record.json").read_text()))
    if records:  # what the cells themselves say
        results.setdefault("model", records[0].get("source", "?"))
        results.setdefault("calibration", [records[0]["calibration"]["source"]])
        results.setdefault("calib_tokens", records[0]["calibration"]["tokens"])
    results.setdefault("model", "?")
    results.setdefault("calibration", [])
    results.setdefault("calib_tokens", "?")
    results.setdefault("ppl_file", None)
    results.setdefault("tasks", list(results["dense"].get("tasks", {})))
    results["command"] = command or results.get("command", "")
    results["cells"] = dict(sorted(cells.items(), key=lambda kv: (kv[1]["active_fraction"], kv[1]["n_shared"], kv[0])))
    return write_report(out, results)


def acc_cell(r: dict[str, Any], digits: int = 3) -> str:
    """``acc / acc_norm`` of one task result (``-`` for a metric the task does not report)."""
    return " / ".join(f"{r[k]:.{digits}f}" if isinstance(r.get(k), (int, float)) else "-" for k in ("acc", "acc_norm"))


def markdown_report(results: dict[str, Any]) -> str:
    tasks = results.get("tasks") or []
    head = ["model", "active FFN", "PPL", "mean layer err", "convert s"] + [f"{t} acc/acc_norm" for t in tasks]
    lines = [f"# moefy compare: {results['model']}", "",
             f"Calibration: {', '.join(results['calibration']) or 'data-free'} ({results['calib_tokens']} tokens budget); "
             f"PPL on `{results['ppl_file']}`" + (f" (first {results['max_windows']} windows)" if results.get("max_windows") else "")
             + (f"; zero-shot first {results['limit']} items per task" if results.get("limit") else ""), "",
             f"Command: `{results.get('command', '')}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, active: str, ev: dict[str, Any], err: str, secs: float | None = None) -> str:
        cells = [name, active, f"{ev['ppl']:.2f}" if "ppl" in ev else "-", err, f"{secs:.0f}" if secs else "-"]
        for t in tasks:
            r = ev.get("tasks", {}).get(t)
            cells.append(f"{acc_cell(r)} (n={r['n']})" if r else "-")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("dense", "1.000", results["dense"], "-"))
    for key, c in results["cells"].items():
        lines.append(row(key, f"{c['active_fraction']:.3f}", c["eval"], f"{c['summary']['mean_error_final']:.3f}",
                         c.get("convert_seconds")))
    return "\n".join(lines) + "\n"


def plot_report(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    def series(c: dict[str, Any]) -> str:
        """One line per method and layout family: balanced experts, or shared neurons + experts."""
        return c["method"] + (f" + shared ({c.get('shared_by', 'rate')})" if c.get("n_shared") else "")

    def layout(c: dict[str, Any]) -> str:
        return f"{c['n_experts']}:{c['top_k']}" + (f":{c['n_shared']}" if c.get("n_shared") else "")

    methods = sorted({series(c) for c in cells.values()})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        members = sorted((c for c in cells.values() if series(c) == m), key=lambda c: c["active_fraction"])
        xs = [c["active_fraction"] for c in members]
        ys = [c["eval"].get("ppl", float("nan")) for c in members]
        (line,) = ax.plot(xs, ys, marker="o", label=m)
        if m.endswith(")"):  # shared layouts differ in E:k:shared: name each point
            for c, x, y in zip(members, xs, ys):
                ax.annotate(layout(c), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=6, color=line.get_color())
    if "ppl" in results["dense"]:
        ax.axhline(results["dense"]["ppl"], color="k", ls="--", label="dense")
    ax.set_xlabel("active FFN fraction")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("PPL vs active FFN fraction")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_active.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, c in cells.items():
        ax.plot(c["layer_errors"], label=key)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out relative FFN output error")
    ax.legend(fontsize=7)
    ax.set_title("Per-layer reconstruction error")
    fig.tight_layout()
    fig.savefig(out / "layer_error.png", dpi=120)
    plt.close(fig)

    loads = [(key, c["expert_load"]) for key, c in cells.items() if c["expert_load"] and c["expert_load"][0]]
    if loads:
        n = len(loads)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 4), squeeze=False)
        for ax, (key, load) in zip(axes[0], loads):
            im = ax.imshow(load, aspect="auto", cmap="viridis")
            ax.set_title(key, fontsize=8)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle("Fraction of tokens routed to each expert")
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
