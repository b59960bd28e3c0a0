"""Why does DOT-MoE not beat structured pruning on SmolLM2?  Single-layer ablations.

On the held-out FFN output of chosen layers (dense inputs, as ``bench_reconstruction.py``),
DOT-MoE E=8 k=2 is varied one knob at a time - training length, temperature schedule,
affinity learning rate, rounding, initial split, always-active shared neurons and how they are
chosen - and compared with ``prune`` (the same 25 % of neurons for every token) at the same
active budget.  Errors are relative output errors on held-out tokens: after routing
(``routed``), after the ridge refit of W_down (``ridge``), and with greedy-oracle routing of
the final split (``oracle``).

    python benchmarks/investigate_dot.py --layers 15 --json benchmarks/results/investigate_dot.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reconstruction import _save, capture, fit, neuron_oracle_error  # noqa: E402

VARIANTS: list[tuple[str, str, int, int, int, dict]] = [
    # name, method, E, k, shared, overrides
    ("prune (reference)", "prune", 8, 2, 0, {}),
    ("act-cluster (DOT init)", "act-cluster", 8, 2, 0, {}),
    ("dot: 40 steps, tau 1->0.05 (default)", "dot", 8, 2, 0, {}),
    ("dot: 150 steps", "dot", 8, 2, 0, {"steps": 150}),
    ("dot: tau 1->0.2", "dot", 8, 2, 0, {"tau_end": 0.2}),
    ("dot: tau 0.3->0.01", "dot", 8, 2, 0, {"tau_start": 0.3, "tau_end": 0.01}),
    ("dot: lr_affinity 0.01", "dot", 8, 2, 0, {"lr_affinity": 0.01}),
    ("dot: lr_affinity 0.2", "dot", 8, 2, 0, {"lr_affinity": 0.2}),
    ("dot: exact rounding (LP)", "dot", 8, 2, 0, {"rounding": "exact"}),
    ("dot: init random", "dot", 8, 2, 0, {"init": "random"}),
    ("dot: init param-cluster", "dot", 8, 2, 0, {"init": "param-cluster"}),
    ("dot: 192 shared (rate) + 1 of 7", "dot", 7, 1, 192, {}),
    ("dot: 192 shared (importance) + 1 of 7", "dot", 7, 1, 192, {"shared_by": "importance"}),
    ("dot: 192 shared (importance) + 2 of 14", "dot", 14, 2, 192, {"shared_by": "importance"}),
    ("dot: 192 shared (importance) + 4 of 28", "dot", 28, 4, 192, {"shared_by": "importance"}),
    ("dot: 288 shared (importance) + 2 of 26", "dot", 26, 2, 288, {"shared_by": "importance"}),
    ("act-cluster: 192 shared (importance) + 4 of 28", "act-cluster", 28, 4, 192, {"shared_by": "importance"}),
    # 50 % active
    ("prune 50% (reference)", "prune", 8, 4, 0, {}),
    ("dot 50%: 4 of 8 (default)", "dot", 8, 4, 0, {}),
    ("dot 50%: 384 shared (importance) + 8 of 24", "dot", 24, 8, 384, {"shared_by": "importance"}),
    ("dot 50%: 576 shared (importance) + 4 of 20", "dot", 20, 4, 576, {"shared_by": "importance"}),
    ("act-cluster 50%: 576 shared (importance) + 4 of 20", "act-cluster", 20, 4, 576, {"shared_by": "importance"}),
    # the assignment scored with its refitted least-squares router (ls_router_eval, default since session 2)
    # against the STE router alone (session 1)
    ("dot: 4 of 8, STE router only at eval", "dot", 8, 4, 0, {"ls_router_eval": False}),
    ("dot: 2 of 8, STE router only at eval", "dot", 8, 2, 0, {"ls_router_eval": False}),
    ("dot: 16 of 64", "dot", 64, 16, 0, {}),
    ("dot: 16 of 64, STE router only at eval", "dot", 64, 16, 0, {"ls_router_eval": False}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="../shared/data/wikitext2/wiki.valid.tokens")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--layers", default="15")
    ap.add_argument("--only", default=None, help="comma-separated variant indices")
    ap.add_argument("--json", default="benchmarks/results/investigate_dot.json")
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    model, adapter, io, n_tok = capture(args.model, args.calib, args.calib_tokens, 512, layers)
    out = {"setup": vars(args) | {"calib_tokens_used": n_tok}, "rows": []}
    chosen = [int(v) for v in args.only.split(",")] if args.only else range(len(VARIANTS))
    print(f"{'layer':>5} {'variant':<48}{'active':>7}{'routed':>8}{'ridge':>8}{'oracle':>8}{'moved':>7}{'sec':>5}")
    for i in layers:
        for v in chosen:
            name, method, e, k, s, over = VARIANTS[v]
            r, (ffn, act, xv, yv, wv) = fit(model, adapter, io, i, method, e, k, s, over.get("steps", 40), "ridge",
                                            **{kk: vv for kk, vv in over.items() if kk != "steps"})
            active = (s + k * (ffn.d_ffn - s) / e) / ffn.d_ffn
            if method == "prune":
                r["neuron_oracle"] = neuron_oracle_error(ffn, act, xv, yv, active)
            out["rows"].append({"layer": i, "variant": name, "method": method, "E": e, "k": k, "shared": s,
                                "active_fraction": active, **over, **r})
            print(f"{i:>5} {name:<48}{active:>7.3f}{r['routed']:>8.3f}{r['ridge']:>8.3f}"
                  f"{r.get('oracle', float('nan')):>8.3f}{r['moved']:>7}{r['seconds']:>5.0f}", flush=True)
            _save(args.json, out)


if __name__ == "__main__":
    main()
