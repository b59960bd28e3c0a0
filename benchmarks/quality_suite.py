"""The quality suite: perplexity on three domains plus zero-shot, for dense and MoE models.

Every figure moefy reports for quality comes from here or from ``moefy eval`` with the same
settings.  Texts (``moefy.eval_texts``): WikiText-2 raw test, held-out TinyStories (the half no
calibration or training mixture reads) and HellaSwag items 8042+ as text (never trained on);
zero-shot: lm-eval on moefy's offline copies (first ``--limit`` items), with each model's
retention of the first model's above-chance accuracy (``moefy.zeroshot.retention``).

Results are cached per model (its files' sizes and times and the settings), so a reference
model is scored once per setting::

    python benchmarks/quality_suite.py smollm2-135m out/smollm2-135m-25pct/layerwise \\
        out/smollm2-135m-25pct/recovered --windows 20 --limit 250 --json benchmarks/results/quality/main_job.json

Also imported by the probes (``benchmarks/probes/``) to score a model held in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moefy.eval_texts import TEXT_NAMES, prepare
from moefy.evaluate import add_relative, evaluate_loaded, evaluate_model

ROOT = Path(__file__).resolve().parents[1]
TEXTS_DIR = ROOT / "runs" / "quality" / "texts"
CACHE_DIR = ROOT / "runs" / "quality" / "cache"
DEFAULT_TASKS = ("sciq", "piqa", "arc_easy", "hellaswag")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"windows": args.windows, "seq_len": args.seq_len, "limit": args.limit, "tasks": list(args.tasks),
            "texts": list(args.texts)}


def _model_id(spec: str) -> Any:
    p = Path(spec)
    if p.is_dir():
        return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
    return spec


def cache_key(name: str, ident: Any, st: dict[str, Any]) -> str:
    blob = json.dumps({"model": name, "id": ident, "settings": st, "v": 2}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _texts(names: list[str]) -> list[Path]:
    paths = prepare(TEXTS_DIR)
    return [paths[n] for n in names]


def score(spec: str, st: dict[str, Any], model: torch.nn.Module | None = None, tokenizer: Any = None,
          ident: Any = None, log: Any = print) -> dict[str, Any]:
    """The suite's figures for ``spec`` (loaded from disk) or for ``model`` (in memory; ``ident``
    names its state for the cache, None: not cached)."""
    ident = _model_id(spec) if model is None else ident
    key = cache_key(spec, ident, st) if ident is not None else None
    cached = CACHE_DIR / f"{key}.json" if key else None
    if cached is not None and cached.is_file():
        log(f"{spec}: cached ({cached.name})")
        return json.loads(cached.read_text())
    t0 = time.time()
    texts = _texts(st["texts"])
    kw = dict(ppl=texts, seq_len=st["seq_len"], max_windows=st["windows"], tasks=st["tasks"], limit=st["limit"])
    if model is None:
        r = evaluate_model(spec, **kw, log=log)
    else:
        r = {"model": spec, **evaluate_loaded(model, tokenizer, **kw, name=spec)}
    r["domains"] = {name: r["perplexity"][str(p)]["ppl"] for name, p in zip(st["texts"], texts)}
    r["seconds"] = round(time.time() - t0, 1)
    if cached is not None:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        os.replace(tmp, cached)
    return r


def summarize(results: list[dict[str, Any]], metric: str = "acc_norm") -> list[dict[str, Any]]:
    """One row per model: PPL and x-ref per domain, each task's metric, the retention."""
    add_relative(results, metric)
    rows = []
    for r in results:
        row: dict[str, Any] = {"model": r.get("label", r["model"])}
        for name, p in r.get("domains", {}).items():
            row[f"{name}_ppl"] = round(p, 3)
            row[f"{name}_x"] = round(p / results[0]["domains"][name], 3)
        for t, v in r.get("tasks", {}).items():
            row[t] = round(v[metric], 4)
        ret = r.get("retention") or {}
        row["retention"] = None if ret.get("retention") is None else round(ret["retention"], 4)
        row["retention_stderr"] = None if ret.get("stderr") is None else round(ret["stderr"], 4)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join("-" if r.get(k) is None else str(r.get(k)) for k in keys) + " |")
    return "\n".join(out)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--windows", type=int, default=20, help="windows of --seq-len tokens per text")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=250, help="first N items per zero-shot task (0: the full sets)")
    ap.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=list(DEFAULT_TASKS))
    ap.add_argument("--texts", type=lambda s: [t for t in s.split(",") if t], default=list(TEXT_NAMES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="dense model and MoE checkpoints; the first is the reference")
    ap.add_argument("--labels", type=lambda s: s.split(","), default=None)
    ap.add_argument("--json", type=Path, required=True)
    add_args(ap)
    args = ap.parse_args()
    if args.limit == 0:
        args.limit = None
    st = settings(args)
    results = []
    for i, m in enumerate(args.models):
        r = score(m, st)
        r["label"] = args.labels[i] if args.labels else m
        results.append(r)
        rows = summarize(results)
        write_json(args.json, {"command": " ".join(sys.argv), "settings": st, "rows": rows, "results": results})
    print(markdown(rows))


if __name__ == "__main__":
    main()
