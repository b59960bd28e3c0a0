"""Gating comparison: how the chosen experts are weighted, through the layer-wise stage.

For each active fraction and gating, ``moefy convert smollm2-135m --active F --gating G`` (the
measured-best layout for F: shared neurons by importance plus experts of 48 neurons, moefy.layouts)
on the first ``--calib-tokens`` of WikiText-2 valid, then ``moefy eval`` on the first
``--max-windows`` 1024-token windows of WikiText-2 raw test (disjoint text).  Gatings:

* ``mask``: each chosen expert weighted 1 (DOT-MoE's, moefy's default); served by moefy's own
  classes only (and Mixtral/GGUF at top-1);
* ``softmax``: the router probability over all experts, not renormalised: a stock Qwen2-MoE
  (``norm_topk_prob`` False) and llama.cpp's ``qwen2moe``;
* ``softmax-renorm``: renormalised over the top-k: Mixtral, Qwen2-MoE (``norm_topk_prob`` True)
  and llama.cpp's ``llama`` experts (which refuse shared neurons).

Each run is a subprocess of the CLI, as a user runs it; a checkpoint already in ``--work`` (or
given with ``--reuse F:G=DIR``) is evaluated, not redone, so the benchmark resumes.  Prints a
table and writes JSON.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_gating.py --fractions 0.25,0.5 \\
        --gatings mask,softmax,softmax-renorm --json benchmarks/results/gating_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
MOEFY = [sys.executable, "-m", "moefy.cli"]


def run(cmd: list[str]) -> float:
    t0 = time.time()
    print("$ " + " ".join(cmd[2:] if cmd[:2] == MOEFY[:2] else cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.time() - t0


def complete(ckpt: Path) -> bool:
    return (ckpt / "config.json").is_file() and (ckpt / "moefy.json").is_file()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--gatings", default="mask,softmax,softmax-renorm")
    ap.add_argument("--calib", default=str(WIKI / "wiki.valid.tokens"))
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval", default=str(WIKI / "wiki.test.raw"))
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--reuse", action="append", default=[], help="F:G=DIR, an existing checkpoint of that setting")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gating")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gating_smollm2.json")
    args = ap.parse_args()
    for path in (args.calib, args.eval):
        if not Path(path).is_file():
            raise SystemExit(f"not found: {path} (../shared beside the project holds WikiText-2)")
    reuse = {}
    for item in args.reuse:
        key, _, path = item.partition("=")
        f, _, g = key.partition(":")
        reuse[(float(f), g)] = Path(path)
    results: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.setdefault("settings", {k: str(v) for k, v in vars(args).items() if k not in ("reuse", "json")})
    rows: dict = results.setdefault("rows", {})

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.json)

    if "dense" not in rows:
        out = args.work / "dense.json"
        run(MOEFY + ["eval", args.model, "--ppl", args.eval, "--seq-len", "1024", "--max-windows", str(args.max_windows), "--json", str(out)])
        rows["dense"] = {"ppl": json.loads(out.read_text())["ppl"]}
        save()
    for f in (float(v) for v in args.fractions.split(",")):
        for g in args.gatings.split(","):
            key = f"{f:g}:{g}"
            if key in rows:
                continue
            ckpt = reuse.get((f, g), args.work / f"{f:g}-{g}")
            convert_s = None
            if not complete(ckpt):
                convert_s = run(MOEFY + ["convert", args.model, "--active", str(f), "--gating", g, "--calib", args.calib,
                                         "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len),
                                         "--out", str(ckpt), "--overwrite"])
            out = args.work / f"{f:g}-{g}.eval.json"
            run(MOEFY + ["eval", str(ckpt), "--ppl", args.eval, "--seq-len", "1024", "--max-windows", str(args.max_windows),
                         "--json", str(out)])
            ev = json.loads(out.read_text())
            record = json.loads((ckpt / "moefy.json").read_text())
            if record.get("config", {}).get("gating", "mask") != g:
                raise SystemExit(f"{ckpt} was converted with gating {record.get('config', {}).get('gating')!r}, not {g!r}")
            rows[key] = {"active": f, "gating": g, "ppl": ev["ppl"], "tokens": ev.get("tokens"), "checkpoint": str(ckpt),
                         "experts": record.get("n_experts"), "top_k": record.get("top_k"), "shared": record.get("n_shared"),
                         "active_fraction": record.get("active_fraction"), "calib_tokens": record["calibration"]["tokens"],
                         "convert_seconds": convert_s}
            save()
    dense = rows["dense"]["ppl"]
    print(f"\n| active | gating | layout | PPL (first {args.max_windows} windows) | x dense |")
    print("|---|---|---|---|---|")
    print(f"| 100% | dense | - | {dense:.2f} | 1.00 |")
    for key, r in rows.items():
        if key == "dense":
            continue
        print(f"| {r['active']:.0%} | {r['gating']} | {r['experts']}:{r['top_k']} + {r['shared']} shared | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} |")
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
