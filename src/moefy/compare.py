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

    @property
    def key(self) -> str:
        return f"{self.method}-E{self.n_experts}k{self.top_k}"


def parse_grid(grid: str) -> list[tuple[int, int]]:
    from .errors import ConfigError

    out = []
    for item in grid.split(","):
        try:
            e, k = item.strip().split(":")
            out.append((int(e), int(k)))
        except ValueError:
            raise ConfigError(f"--grid entries look like E:k (e.g. 8:2,8:4), got {item!r}") from None
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
        from .zeroshot import evaluate_tasks

        res["tasks"] = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, data_root=data_root, limit=limit)
    return res


def run_compare(
    model: str,
    out: Path,
    methods: list[str],
    grid: list[tuple[int, int]],
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
    for e, k in grid:
        for method in methods:
            cell = Cell(method, e, k)
            cdir = out / "cells" / cell.key
            eval_path = cdir / "eval.json"
            if not eval_path.is_file():
                log(f"cell {cell.key}: converting")
                cfg = replace(base, method=method, n_experts=e, top_k=k)
                res = run_convert(model, cdir / "model", cfg, calib, overwrite=True, log=log)
                _write_json(cdir / "record.json", res.record)
                log(f"cell {cell.key}: evaluating")
                ev = evaluate_model(str(cdir / "model"), ppl_file, seq_len, max_windows, tasks, limit, data_root)
                _write_json(eval_path, ev)
                if not keep_models:
                    import shutil

                    shutil.rmtree(cdir / "model", ignore_errors=True)
            rec = json.loads((cdir / "record.json").read_text())
            results["cells"][cell.key] = {
                "method": method, "n_experts": e, "top_k": k, "active_fraction": rec["active_fraction"],
                "eval": json.loads(eval_path.read_text()),
                "layer_errors": [r["error_final"] for r in rec["layer_reports"]],
                "layer_errors_routed": [r["error_routed"] for r in rec["layer_reports"]],
                "expert_load": [r["expert_load"] for r in rec["layer_reports"]],
                "summary": rec["summary"],
            }
    _write_json(out / "results.json", results)
    (out / "report.md").write_text(markdown_report(results))
    plot_report(results, out)
    return results


def markdown_report(results: dict[str, Any]) -> str:
    tasks = results.get("tasks") or []
    head = ["model", "active FFN", "PPL", "mean layer err"] + [f"{t} acc/acc_norm" for t in tasks]
    lines = [f"# moefy compare: {results['model']}", "",
             f"Calibration: {', '.join(results['calibration']) or 'data-free'} ({results['calib_tokens']} tokens budget); "
             f"PPL on `{results['ppl_file']}`" + (f" (first {results['max_windows']} windows)" if results.get("max_windows") else "")
             + (f"; zero-shot first {results['limit']} items per task" if results.get("limit") else ""), "",
             f"Command: `{results.get('command', '')}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, active: str, ev: dict[str, Any], err: str) -> str:
        cells = [name, active, f"{ev['ppl']:.2f}" if "ppl" in ev else "-", err]
        for t in tasks:
            r = ev.get("tasks", {}).get(t)
            cells.append(f"{r['acc']:.3f} / {r['acc_norm']:.3f} (n={r['n']})" if r else "-")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("dense", "1.000", results["dense"], "-"))
    for key, c in results["cells"].items():
        lines.append(row(key, f"{c['active_fraction']:.3f}", c["eval"], f"{c['summary']['mean_error_final']:.3f}"))
    return "\n".join(lines) + "\n"


def plot_report(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    methods = sorted({c["method"] for c in cells.values()})
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((c["active_fraction"], c["eval"].get("ppl", float("nan"))) for c in cells.values() if c["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
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
