"""Conversion benchmark: dense vs MoE perplexity, conversion wall time and peak memory.

Each conversion runs in its own process so its peak resident memory is its own.

    python benchmarks/bench_convert.py --model smollm2-135m \
        --calib ../shared/data/wikitext2/wiki.valid.tokens --calib-tokens 32768 \
        --eval ../shared/data/wikitext2/wiki.test.raw --configs 8:2,8:4 \
        --json benchmarks/results/convert_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    from moefy.config import ConvertConfig
    from moefy.runner import run_convert

    e, k = (int(v) for v in args.child.split(":"))
    cfg = ConvertConfig(
        n_experts=e, top_k=k, method=args.method, n_shared=args.shared, calib_tokens=args.calib_tokens,
        seq_len=args.seq_len, stage=args.stage, weights=args.weights, steps=args.steps, seed=args.seed,
    )
    t0 = time.time()
    res = run_convert(args.model, args.out_dir, cfg, [args.calib] if args.calib else [], overwrite=True, log=lambda m: print(m, flush=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": time.time() - t0, "peak_rss_mib": peak, "summary": res.record["summary"], "calib_tokens": res.record["calibration"]["tokens"]}), flush=True)


def evaluate(model: str, text: str, seq_len: int, max_windows: int | None) -> dict:
    from moefy.evaluate import load_eval_ids, perplexity
    from moefy.models import load

    loaded = load(model)
    ids = load_eval_ids(loaded.tokenizer, text)
    return perplexity(loaded.model, ids, seq_len=seq_len, max_windows=max_windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="../shared/data/wikitext2/wiki.valid.tokens")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval", default="../shared/data/wikitext2/wiki.test.raw")
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--configs", default="8:2,8:4", help="comma-separated E:k")
    ap.add_argument("--method", default="dot")
    ap.add_argument("--shared", type=int, default=0)
    ap.add_argument("--stage", default="layerwise")
    ap.add_argument("--weights", default="ridge")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench_convert")
    ap.add_argument("--json", default="benchmarks/results/convert.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    out_json = Path(args.json)
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results.setdefault("setup", {})
    results["setup"].update({k: v for k, v in vars(args).items() if k not in ("child", "out_dir", "json")})
    rows = results.setdefault("rows", {})
    if "dense" not in rows:
        r = evaluate(args.model, args.eval, args.eval_seq_len, args.max_windows)
        rows["dense"] = {"ppl": r["ppl"], "tokens": r["tokens"]}
        _save(out_json, results)
    for spec in args.configs.split(","):
        key = f"{args.method}-E{spec.replace(':', 'k')}" + (f"-s{args.shared}" if args.shared else "")
        if key in rows:
            continue
        out_dir = Path(args.work) / key
        cmd = [sys.executable, __file__, "--child", spec, "--out-dir", str(out_dir)] + [
            a for pair in (("--model", args.model), ("--calib", args.calib), ("--calib-tokens", str(args.calib_tokens)),
                           ("--seq-len", str(args.seq_len)), ("--method", args.method), ("--shared", str(args.shared)),
                           ("--stage", args.stage), ("--weights", args.weights), ("--steps", str(args.steps)),
                           ("--seed", str(args.seed))) for a in pair
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"conversion {key} failed")
        conv = json.loads(line[0][7:])
        r = evaluate(str(out_dir), args.eval, args.eval_seq_len, args.max_windows)
        rows[key] = {"ppl": r["ppl"], "tokens": r["tokens"], **conv}
        _save(out_json, results)
    _table(results)


def _save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _table(results: dict) -> None:
    print(f"{'model':<22}{'PPL':>10}{'eval tokens':>13}{'calib tok':>11}{'convert s':>11}{'peak MiB':>10}{'rel.err':>9}")
    for key, r in results["rows"].items():
        print(
            f"{key:<22}{r['ppl']:>10.2f}{r['tokens']:>13}{r.get('calib_tokens', ''):>11}"
            f"{r.get('seconds', 0):>11.0f}{r.get('peak_rss_mib', 0):>10.0f}"
            f"{r.get('summary', {}).get('mean_error_final', float('nan')):>9.3f}"
        )


if __name__ == "__main__":
    main()
