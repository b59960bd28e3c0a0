"""Issue 14.1: which split wins on stories260K (E=4, k=1), and does DOT-MoE's layer-wise
training help?  Every variant goes through ``run_convert`` (the code behind ``moefy convert``);
perplexity on two held-out texts: the issue's ``sample_5_stories.txt`` (1,883 tokens) and the
last 300 kB of ``validation_head.txt`` (about 149k tokens; calibration reads only its first
``--calib-tokens``, so they never overlap).  Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/investigate_stories_split.py --calib-tokens 20000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VARIANTS: dict[str, dict[str, object]] = {
    "random": {"method": "random"},
    "act-cluster": {"method": "act-cluster"},
    "param-cluster": {"method": "param-cluster"},
    "dot (init act-cluster, default)": {},
    "dot (init param-cluster)": {"init": "param-cluster"},
    "dot (init random)": {"init": "random"},
    "dot-frozen (init act-cluster)": {"method": "dot-frozen"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-tokens", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stories_split")
    args = ap.parse_args()

    import moefy  # noqa: F401  (registers the moefy model classes)
    from transformers import AutoModelForCausalLM

    from moefy.config import ConvertConfig
    from moefy.evaluate import load_eval_ids, perplexity
    from moefy.models import load
    from moefy.runner import run_convert

    model = SHARED / "models" / "stories260K" / "hf"
    calib = SHARED / "data" / "tinystories" / "validation_head.txt"
    five = SHARED / "data" / "tinystories" / "sample_5_stories.txt"
    if not (model.is_dir() and calib.is_file() and five.is_file()):
        raise SystemExit(f"needs {model}, {calib} and {five} (../shared beside the project)")
    args.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    tail = Path(tempfile.mkdtemp()) / "validation_tail.txt"  # a slice of shared data: never kept in the project
    data = calib.read_bytes()
    tail.write_bytes(data[len(data) - 300_000 :])
    tok = load(str(model)).tokenizer
    sets = {"five_stories": load_eval_ids(tok, five), "validation_tail": load_eval_ids(tok, tail)}
    dense = AutoModelForCausalLM.from_pretrained(model).eval()
    rows: dict[str, dict[str, object]] = {"dense": {k: perplexity(dense, v, seq_len=256)["ppl"] for k, v in sets.items()}}
    for name, kw in VARIANTS.items():
        cfg = ConvertConfig(**{"n_experts": 4, "top_k": 1, "calib_tokens": args.calib_tokens, "seq_len": 256, **kw})  # type: ignore[arg-type]
        d = tail.parent / "ckpt" / name.split(" ")[0] / (str(kw.get("init", "")) or "default")
        t0 = time.time()
        run_convert(str(model), d, cfg, [str(calib)], overwrite=True, log=lambda _m: None)
        m = AutoModelForCausalLM.from_pretrained(d).eval()
        rec = json.loads((d / "moefy.json").read_text())
        reps = rec["layer_reports"]
        rows[name] = {
            **{k: perplexity(m, v, seq_len=256)["ppl"] for k, v in sets.items()},
            "mean_layer_error": sum(r["error_final"] for r in reps) / len(reps),
            "neurons_moved": [r["neurons_moved"] for r in reps],
            "seconds": round(time.time() - t0, 1),
        }
        print(name, rows[name], flush=True)
    n5, nt = (int(v.numel()) for v in sets.values())
    print(f"\n| split (calib {args.calib_tokens} tokens) | PPL 5 stories ({n5} tok) | PPL validation tail ({nt} tok) | layer err | moved |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        err = f"{r['mean_layer_error']:.3f}" if "mean_layer_error" in r else "–"
        print(f"| {name} | {r['five_stories']:.2f} | {r['validation_tail']:.2f} | {err} | {sum(r.get('neurons_moved', [])) if 'neurons_moved' in r else '–'} |")
    out = args.out / f"result-{args.calib_tokens}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"calib_tokens": args.calib_tokens, "eval_tokens": {"five_stories": n5, "validation_tail": nt}, "rows": rows}, indent=2))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
