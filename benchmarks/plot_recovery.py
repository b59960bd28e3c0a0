"""Plot recovery curves: test perplexity (first windows of WikiText-2 test) against training tokens.

Reads the JSON files that ``bench_recovery.py`` writes and draws one line per run, each labelled by
layout, tag and the number of test windows its curve is measured on (curves on different windows
are not comparable point for point; the label says which is which). Writes a PNG atomically.

    python benchmarks/plot_recovery.py benchmarks/results/recovery/shared25/result-*.json \
        --out benchmarks/results/recovery/recovery_curves.png
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dense", action="append", default=[], metavar="WINDOWS=PPL",
                    help="dense PPL on the first WINDOWS test windows, drawn as a dashed line (repeatable)")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in args.results:
        r = json.loads(path.read_text())
        curve = r.get("curve") or []
        if not curve:
            continue
        xs = [c["tokens"] for c in curve]
        ys = [c["test_ppl_first_windows"] for c in curve]
        budget = r.get("train", {}).get("tokens", xs[-1])
        label = f"{r['layout']}{r.get('tag', '')}, {budget:,}-token schedule ({r['curve_windows']} windows)"
        ax.plot(xs, ys, marker="o", label=label)
    for spec in args.dense:
        windows, _, ppl = spec.partition("=")
        ax.axhline(float(ppl), linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"dense ({windows} windows) {float(ppl):.2f}", (0, float(ppl)), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color="grey")
    ax.set_xlabel("training tokens (moefy train, WikiText-2 valid)")
    ax.set_ylabel("PPL, first windows of WikiText-2 test (log)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.stem + ".tmp" + args.out.suffix)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
