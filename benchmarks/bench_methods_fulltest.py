"""Every split method through the same pipeline, on the full WikiText-2 test (issue 14).

For each layout (``shared25``: 288 shared neurons by importance + 2 of 26 experts, 25% active;
``shared50``: 576 shared + 4 of 20, 50% active) and each split method, one layer-wise conversion
of SmolLM2-135M with ``moefy convert`` (the same flags for every method, only ``--method``
differs: same calibration tokens, layer-wise steps, least-squares router, ridge refit of W_down,
drift correction), then ``moefy eval`` on all of WikiText-2 raw test (297 windows of 1,024
tokens, 303,831 predicted tokens).  Checkpoints are kept under ``--out`` (gitignored) and reused,
evaluations too (``--out/fulltest-<cell>.json``), so the benchmark can be run one cell at a time
and resumed.  Prints a table with the exact command of every row, writes JSON.

    OMP_NUM_THREADS=2 python benchmarks/bench_methods_fulltest.py --layouts shared25 --methods act-cluster

A cell costs about 17 min of conversion (65,536 calibration tokens) and 10-11 min of evaluation
at 2 threads on this 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_recovery import LAYOUTS  # noqa: E402

ACTIVE = {"shared25": "25%", "shared50": "50%", "e8k2": "25%", "e8k4": "50%"}


def _moefy() -> str:
    exe = Path(sys.executable).with_name("moefy")
    return str(exe) if exe.is_file() else "moefy"


def convert_cmd(model: str, out: Path, layout: str, method: str, calib_tokens: int, drift: float) -> list[str]:
    E, k, shared, shared_by = LAYOUTS[layout]
    cmd = [_moefy(), "convert", model, "-o", str(out), "--calib", str(SHARED / "wiki.valid.tokens"),
           "--calib-tokens", str(calib_tokens), "--seq-len", "512", "--experts", str(E), "--top-k", str(k)]
    if shared:
        cmd += ["--shared", str(shared), "--shared-by", shared_by]
    return cmd + ["--method", method, "--drift-correction", str(drift)]


def eval_cmd(model: str, out_json: Path) -> list[str]:
    return [_moefy(), "eval", model, "--ppl", str(SHARED / "wiki.test.raw"), "--seq-len", "1024", "--json", str(out_json)]


def _show(cmd: list[str]) -> str:
    """The command as a user would type it (paths relative to the project root)."""
    exe = _moefy()
    return " ".join("moefy" if c == exe else c.replace(str(ROOT.parent / "shared"), "../shared").replace(str(ROOT) + "/", "")
                    for c in cmd)


def _run(cmd: list[str]) -> None:
    print("$", _show(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"command failed (exit {proc.returncode}): {_show(cmd)}")


def dense_fulltest(model: str, out: Path) -> dict:
    """The dense model on the same text, evaluated once and reused."""
    path = out / "fulltest-dense.json"
    if not path.is_file():
        _run(eval_cmd(model, path))
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layouts", default="shared25,shared50")
    ap.add_argument("--methods", default="dot,act-cluster,param-cluster,random")
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--drift-correction", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calib_size")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "methods_fulltest.json")
    ap.add_argument("--report-only", action="store_true", help="only tabulate the cells already evaluated")
    args = ap.parse_args()
    if not (SHARED / "wiki.valid.tokens").is_file() or not (SHARED / "wiki.test.raw").is_file():
        sys.exit(f"needs {SHARED}/wiki.valid.tokens and wiki.test.raw (../shared beside the project)")
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    for layout in args.layouts.split(","):
        for method in args.methods.split(","):
            cell = f"{layout}-{args.calib_tokens}-drift{args.drift_correction:g}-{method}"
            ckpt, ev_path = args.out / cell, args.out / f"fulltest-{cell}.json"
            ccmd = convert_cmd(args.model, ckpt, layout, method, args.calib_tokens, args.drift_correction)
            ecmd = eval_cmd(str(ckpt), ev_path)
            if not ev_path.is_file():
                if args.report_only:
                    print(f"{cell}: not evaluated yet", flush=True)
                    continue
                if not (ckpt / "moefy.json").is_file():
                    _run(ccmd)
                _run(ecmd)
            ev = json.loads(ev_path.read_text())
            rec = json.loads((ckpt / "moefy.json").read_text()) if (ckpt / "moefy.json").is_file() else {}
            reports = rec.get("layer_reports", [])
            errs = [r["error_final"] for r in reports if r.get("error_final") is not None]
            rows.append({"layout": layout, "active": ACTIVE.get(layout, "?"), "method": method, "ppl": ev["ppl"],
                         "tokens": ev["tokens"], "eval_seconds": round(ev.get("seconds", 0.0), 1),
                         "convert_seconds": round(rec["wall_seconds"]) if rec.get("wall_seconds") else None,
                         "drift_correction": rec.get("config", {}).get("drift_correction", args.drift_correction),
                         "mean_layer_error": sum(errs) / len(errs) if errs else None,
                         "convert_command": _show(ccmd), "eval_command": _show(ecmd)})
    dense = dense_fulltest(args.model, args.out) if rows or not args.report_only else None
    print(f"\nSmolLM2-135M, layer-wise only, {args.calib_tokens} calibration tokens of WikiText-2 valid, "
          f"drift correction {args.drift_correction:g}; PPL on the full WikiText-2 raw test")
    print("| layout | active | method | PPL | x dense | mean layer err | convert s |")
    print("|---|---|---|---|---|---|---|")
    if dense:
        print(f"| dense | 100% | – | {dense['ppl']:.3f} | 1 | – | – |")
    for r in rows:
        err = f"{r['mean_layer_error']:.4f}" if r["mean_layer_error"] is not None else "–"
        x = f"{r['ppl'] / dense['ppl']:.2f}x" if dense else "?"
        print(f"| {r['layout']} | {r['active']} | {r['method']} | {r['ppl']:.3f} | {x} | {err} | {r['convert_seconds']} |")
    for r in rows:
        print(f"{r['layout']} {r['method']}:\n  {r['convert_command']}\n  {r['eval_command']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps({"dense": dense, "rows": rows, "calib_tokens": args.calib_tokens,
                               "drift_correction": args.drift_correction,
                               "command": "python benchmarks/bench_methods_fulltest.py " + " ".join(sys.argv[1:])},
                              indent=1))
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
