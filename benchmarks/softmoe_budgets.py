"""Issue 4: DOT-MoE + top-k against DOT-MoE + LapSum (learned per-layer budget) on equal terms.

Reads two converted checkpoints and the ``moefy eval`` JSON that scored both on the same
perplexity windows, prints a table (PPL, *measured* mean active experts per token and layer,
active FFN fraction) and plots the learned budget ``k_l`` next to the experts each layer
actually ran at inference.  Produce the inputs with ``runs/softmoe.sh``-style commands:

    moefy convert smollm2-135m --experts 8 --top-k 2 --stage both --e2e-steps 40 \\
        --calib ../shared/data/wikitext2/wiki.valid.tokens --calib-tokens 16384 --out runs/softmoe/top2
    moefy convert smollm2-135m ... --router lapsum --budget 60 --budget-mode learned --max-active 4 \\
        --out runs/softmoe/lapsum
    moefy eval runs/softmoe/top2 runs/softmoe/lapsum --ppl ../shared/data/wikitext2/wiki.test.raw \\
        --max-windows 40 --json runs/softmoe/eval.json
    python benchmarks/softmoe_budgets.py runs/softmoe/top2 runs/softmoe/lapsum --eval runs/softmoe/eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--eval", type=Path, required=True, help="moefy eval --json output covering the checkpoints")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/softmoe_budgets.json"))
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/results/softmoe_budgets.png"))
    args = ap.parse_args()

    ev = json.loads(args.eval.read_text())
    evals = {Path(m["model"]).resolve(): m for m in ev.get("models", [ev])}
    rows = []
    for ck in args.checkpoints:
        rec = json.loads((ck / "moefy.json").read_text())
        e = evals.get(ck.resolve())
        if e is None:
            raise SystemExit(f"{args.eval} has no result for {ck}")
        d_ffn = sum(rec["layers"][0]["expert_sizes"]) + rec["layers"][0]["n_shared"]
        measured = e.get("active_experts_per_layer", [])
        sizes = [sum(layer["expert_sizes"]) / len(layer["expert_sizes"]) for layer in rec["layers"]]
        shared = [layer["n_shared"] for layer in rec["layers"]]
        active_frac = (
            sum(sh + m * s for sh, m, s in zip(shared, measured, sizes)) / (len(measured) * d_ffn)
            if measured else float("nan")
        )
        rows.append({
            "checkpoint": str(ck), "router": rec["router"], "stage": rec["stage"],
            "calib_tokens": rec["calibration"]["tokens"], "e2e_steps": rec["config"]["e2e_steps"],
            "ppl": e["ppl"], "ppl_tokens": e["tokens"],
            "budget_k_l": [layer["top_k"] for layer in rec["layers"]],
            "measured_active_per_layer": measured,
            "measured_mean_active": e.get("mean_active_experts"),
            "measured_active_ffn_fraction": active_frac,
            "convert_seconds": rec["wall_seconds"],
        })
    print(f"{'checkpoint':<28}{'router':<8}{'PPL':>9}{'active/layer':>14}{'active FFN':>12}{'k_l min..max':>16}")
    for r in rows:
        ks = r["budget_k_l"]
        print(f"{Path(r['checkpoint']).name:<28}{r['router']:<8}{r['ppl']:>9.2f}{r['measured_mean_active']:>14.3f}"
              f"{r['measured_active_ffn_fraction']:>12.3f}{min(ks):>8.2f}..{max(ks):<6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"eval_file": str(args.eval), "rows": rows}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r in rows:
        name = Path(r["checkpoint"]).name
        if r["router"] == "lapsum":
            ax.plot(r["budget_k_l"], marker="o", label=f"{name}: learned budget k_l")
        ax.plot(r["measured_active_per_layer"], marker=".", ls="--", label=f"{name}: measured experts/token")
    ax.set_xlabel("layer")
    ax.set_ylabel("experts per token")
    ax.set_title("Learned per-layer expert budget vs measured routing (E=8)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
