"""Micro-benchmark: LapSum soft top-k vs softmax + torch.topk (straight-through) routing.

For each expert count E, a batch of router scores ``[tokens, E]`` (float32, CPU) is routed by

* ``lapsum``:  ``w = lapsum_topk(scores, k, alpha)`` with a learnable ``alpha`` tensor
  (gradients w.r.t. scores and alpha; exact implicit backward);
* ``topk_st``: ``probs = softmax(scores)``, ``hard = one_hot(topk(probs, k))``,
  ``w = hard + probs - probs.detach()`` (straight-through top-k mask);

and the loss ``(w * v).sum()`` (fixed random ``v``) is back-propagated.  Forward and
forward+backward wall times are the median over ``--repeats`` timed runs after ``--warmup``
untimed ones.  Prints a table and writes JSON (``--json``, default
``benchmarks/results/lapsum_cost.json``)::

    .venv/bin/python benchmarks/bench_lapsum.py [--tokens 4096] [--experts 8 16 64] [--k 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moefy.lapsum import lapsum_topk  # noqa: E402


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _topk_st(scores: torch.Tensor, k: int) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1)
    idx = torch.topk(probs, k, dim=-1).indices
    hard = torch.zeros_like(probs).scatter_(-1, idx, 1.0)
    return hard + probs - probs.detach()


def bench_one(n_experts: int, tokens: int, k: int, alpha: float, repeats: int, warmup: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, n_experts, generator=g)
    v = torch.randn(tokens, n_experts, generator=g)
    scores = base.clone().requires_grad_(True)
    alpha_t = torch.tensor(alpha, requires_grad=True)

    def lapsum_fwd() -> None:
        with torch.no_grad():
            lapsum_topk(scores, float(k), alpha_t)

    def lapsum_fwd_bwd() -> None:
        scores.grad = None
        alpha_t.grad = None
        (lapsum_topk(scores, float(k), alpha_t) * v).sum().backward()

    def topk_fwd() -> None:
        with torch.no_grad():
            _topk_st(scores, k)

    def topk_fwd_bwd() -> None:
        scores.grad = None
        (_topk_st(scores, k) * v).sum().backward()

    # sanity: LapSum rows sum to k
    with torch.no_grad():
        err = float((lapsum_topk(base, float(k), alpha).double().sum(-1) - k).abs().max())
    res = {
        "n_experts": n_experts,
        "tokens": tokens,
        "k": k,
        "alpha": alpha,
        "lapsum_fwd_ms": _median_ms(lapsum_fwd, repeats, warmup),
        "lapsum_fwd_bwd_ms": _median_ms(lapsum_fwd_bwd, repeats, warmup),
        "topk_st_fwd_ms": _median_ms(topk_fwd, repeats, warmup),
        "topk_st_fwd_bwd_ms": _median_ms(topk_fwd_bwd, repeats, warmup),
        "lapsum_max_abs_sum_error": err,
    }
    res["fwd_bwd_ratio"] = res["lapsum_fwd_bwd_ms"] / res["topk_st_fwd_bwd_ms"]
    return res


def _print_table(rows: list[dict], title: str) -> None:
    headers = ["E", "LapSum fwd ms", "LapSum fwd+bwd ms", "topk-ST fwd ms", "topk-ST fwd+bwd ms", "ratio fwd+bwd"]
    cells = [
        [
            str(r["n_experts"]),
            f"{r['lapsum_fwd_ms']:.3f}",
            f"{r['lapsum_fwd_bwd_ms']:.3f}",
            f"{r['topk_st_fwd_ms']:.3f}",
            f"{r['topk_st_fwd_bwd_ms']:.3f}",
            f"{r['fwd_bwd_ratio']:.2f}x",
        ]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="right")
        for c in cells:
            table.add_row(*c)
        Console().print(table)
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for c in cells:
            print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--k", type=int, default=2, help="experts per token (integer, for torch.topk)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "lapsum_cost.json")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = [
        bench_one(e, args.tokens, args.k, args.alpha, args.repeats, args.warmup, args.seed + e) for e in args.experts
    ]
    title = (
        f"LapSum vs softmax+topk (straight-through): {args.tokens} tokens, k={args.k}, float32 CPU, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    _print_table(rows, title)
    out = {
        "benchmark": "lapsum_cost",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "device": "cpu",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
