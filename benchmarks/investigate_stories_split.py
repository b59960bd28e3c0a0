"""Issue 14.1: which split wins on stories260K (E=4, k=1 or 2), and does DOT-MoE's layer-wise
training help?  Every variant goes through ``run_convert`` (the code behind ``moefy convert``);
perplexity on two held-out texts: the issue's ``sample_5_stories.txt`` (1,883 tokens) and the
last 300 kB of ``validation_head.txt`` (about 149k tokens; calibration reads only its first
``--calib-tokens``, so they never overlap).  Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/investigate_stories_split.py --calib-tokens 20000
    OMP_NUM_THREADS=1 python benchmarks/investigate_stories_split.py --calib-tokens 20000 --top-k 1,2 --seeds 0,1,2 \
        --variants random,act-cluster,param-cluster,dot,dot-best,dot-best-model

With several seeds the table gives each variant's mean and how many seeds it beats param-cluster on.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {  # key: (table name, ConvertConfig fields)
    "random": ("random", {"method": "random"}),
    "act-cluster": ("act-cluster", {"method": "act-cluster"}),
    "param-cluster": ("param-cluster", {"method": "param-cluster"}),
    "dot": ("dot (init act-cluster, default)", {}),
    "dot-param": ("dot (init param-cluster)", {"init": "param-cluster"}),
    "dot-random": ("dot (init random)", {"init": "random"}),
    "dot-frozen": ("dot-frozen (init act-cluster)", {"method": "dot-frozen"}),
    "dot-best": ("dot (init best)", {"init": "best"}),
    "dot-best-model": ("dot (init best, select model)", {"init": "best", "select": "model"}),
    # the layer-wise weight modes (``--weights``): gradient training of gate/up/down with the split frozen
    "act-cluster-grad": ("act-cluster, weights grad+ridge", {"method": "act-cluster", "weights": "grad+ridge"}),
    "param-cluster-grad": ("param-cluster, weights grad+ridge", {"method": "param-cluster", "weights": "grad+ridge"}),
    "dot-grad": ("dot (init act-cluster), weights grad+ridge", {"weights": "grad+ridge"}),
    "act-cluster-rgrad": ("act-cluster, weights ridge+grad", {"method": "act-cluster", "weights": "ridge+grad"}),
    "param-cluster-rgrad": ("param-cluster, weights ridge+grad", {"method": "param-cluster", "weights": "ridge+grad"}),
}
DEFAULT_VARIANTS = "random,act-cluster,param-cluster,dot,dot-param,dot-random,dot-frozen"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-tokens", type=int, default=20000)
    ap.add_argument("--top-k", default="1", help="comma-separated top-k values (E=4)")
    ap.add_argument("--seeds", default="0", help="comma-separated conversion seeds")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--drift-correction", type=float, default=0.0, help="ConvertConfig.drift_correction for every variant")
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
    keys = args.variants.split(",")
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    seeds = [int(v) for v in args.seeds.split(",")]
    for top_k in (int(v) for v in args.top_k.split(",")):
        for key in keys:
            name, kw = VARIANTS[key]
            for seed in seeds:
                cfg = ConvertConfig(**{"n_experts": 4, "top_k": top_k, "calib_tokens": args.calib_tokens, "seq_len": 256,
                                       "seed": seed, "drift_correction": args.drift_correction, **kw})  # type: ignore[arg-type]
                d = tail.parent / "ckpt" / f"k{top_k}-{key}-s{seed}"
                t0 = time.time()
                run_convert(str(model), d, cfg, [str(calib)], overwrite=True, log=lambda _m: None)
                m = AutoModelForCausalLM.from_pretrained(d).eval()
                rec = json.loads((d / "moefy.json").read_text())
                reps = rec["layer_reports"]
                row = {
                    "top_k": top_k, "seed": seed, "variant": name,
                    **{k: perplexity(m, v, seq_len=256)["ppl"] for k, v in sets.items()},
                    "mean_layer_error": sum(r["error_final"] for r in reps) / len(reps),
                    "neurons_moved": [r["neurons_moved"] for r in reps],
                    "init": [r.get("init") for r in reps], "selected": [r.get("selected") for r in reps],
                    "seconds": round(time.time() - t0, 1),
                }
                label = name if len(seeds) == 1 and args.top_k == "1" else f"k{top_k} {name} seed {seed}"
                rows[label] = row
                print(label, row, flush=True)
    n5, nt = (int(v.numel()) for v in sets.values())
    print(f"\n| split (calib {args.calib_tokens} tokens) | PPL 5 stories ({n5} tok) | PPL validation tail ({nt} tok) | layer err | moved |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        err = f"{r['mean_layer_error']:.3f}" if "mean_layer_error" in r else "–"
        print(f"| {name} | {r['five_stories']:.2f} | {r['validation_tail']:.2f} | {err} | {sum(r.get('neurons_moved', [])) if 'neurons_moved' in r else '–'} |")
    if len(seeds) > 1:
        print(f"\n| top-k | split | mean PPL, validation tail ({len(seeds)} seeds) | seeds better than param-cluster |")
        print("|---|---|---|---|")
        for top_k in (int(v) for v in args.top_k.split(",")):
            ref = {r["seed"]: r["validation_tail"] for r in rows.values() if r.get("top_k") == top_k and r.get("variant") == "param-cluster"}
            for key in keys:
                name = VARIANTS[key][0]
                mine = {r["seed"]: r["validation_tail"] for r in rows.values() if r.get("top_k") == top_k and r.get("variant") == name}
                wins = sum(1 for sd, v in mine.items() if sd in ref and v < ref[sd]) if ref and name != "param-cluster" else None
                print(f"| {top_k} | {name} | {sum(mine.values()) / len(mine):.2f} | {'–' if wins is None else f'{wins}/{len(mine)}'} |")
    tag = "" if len(seeds) == 1 and args.top_k == "1" else f"-k{args.top_k.replace(',', '')}-s{args.seeds.replace(',', '')}"
    if args.drift_correction:
        tag += f"-drift{args.drift_correction:g}"
    out = args.out / f"result-{args.calib_tokens}{tag}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"calib_tokens": args.calib_tokens, "drift_correction": args.drift_correction, "eval_tokens": {"five_stories": n5, "validation_tail": nt}, "rows": rows}, indent=2))
    os.replace(tmp, out)

if __name__ == "__main__":
    main()
