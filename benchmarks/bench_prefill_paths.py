"""The two multi-token paths of MoefyMLP against each other and the dense FFN (docs/BENCHMARKS.md 6.13).

``grouped`` runs one small GEMM per used expert over its tokens; ``masked`` computes every neuron
in two large GEMMs and zeroes the unused experts' neurons.  For each layout (SmolLM2's 576 x 1536
at 50% active by default: 576 shared neurons and E experts over the other 960, top E/5) and token
count, the median time of each path and of the dense FFN (random weights, inference mode).  The
automatic choice, ``MASKED_PREFILL_MAX_EXPERT_SIZE``, is read from these figures.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_prefill_paths.py --threads 2

Prints a table and writes JSON (default benchmarks/results/prefill_paths.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_lapsum import _median_ms as median_ms  # the benchmarks' median-of-repeats timer
from moefy.hf.modeling_moefy import MASKED_PREFILL_MAX_EXPERT_SIZE, MoefyMLP

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--d-ffn", type=int, default=1536)
    ap.add_argument("--shared", type=int, default=576)
    ap.add_argument("--experts", type=int, nargs="+", default=[20, 40, 80, 160, 320])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "prefill_paths.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    h, d, s = args.hidden, args.d_ffn, args.shared
    gate, up, down = torch.randn(d, h) * 0.02, torch.randn(d, h) * 0.02, torch.randn(h, d) * 0.02
    rows = []
    for e in args.experts:
        k = max(1, e // 5)
        sizes = [(d - s) // e + (1 if i < (d - s) % e else 0) for i in range(e)]
        mlp = MoefyMLP(h, sizes, n_shared=s, top_k=k).eval()
        auto = "masked" if mlp._use_masked() else "grouped"
        for t in args.tokens:
            x = torch.randn(t, h)
            row = {"experts": e, "top_k": k, "expert_neurons": (d - s) / e, "tokens": t, "auto": auto}
            with torch.inference_mode():
                for path in ("grouped", "masked"):
                    mlp.prefill_path = path
                    row[f"{path}_ms"] = median_ms(lambda: mlp(x), args.repeats, args.warmup)
                row["dense_ms"] = median_ms(
                    lambda: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down), args.repeats, args.warmup
                )
            rows.append(row)
    print(f"MoefyMLP multi-token paths, {h} x {d}, {s} shared, top E/5 (median ms of {args.repeats}; "
          f"{torch.get_num_threads()} threads, {platform.machine()}; automatic: masked below "
          f"{MASKED_PREFILL_MAX_EXPERT_SIZE} neurons per expert)")
    print("| E:k | neurons per expert | tokens | grouped ms | masked ms | dense ms | automatic | automatic x dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r[f"{r['auto']}_ms"]
        print(f"| {r['experts']}:{r['top_k']} | {r['expert_neurons']:g} | {r['tokens']} | {r['grouped_ms']:.2f} | "
              f"{r['masked_ms']:.2f} | {r['dense_ms']:.2f} | {r['auto']} | {r['dense_ms'] / a:.2f} |")
    out = {"hidden": h, "d_ffn": d, "shared": s, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "masked_prefill_max_expert_size": MASKED_PREFILL_MAX_EXPERT_SIZE, "rows": rows,
           "command": " ".join(["python", "benchmarks/bench_prefill_paths.py", *sys.argv[1:]])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
