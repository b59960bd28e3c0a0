"""Markdown tables of docs/BENCHMARKS.md sections 4 and 6.5 from the speed JSON files
(``bash benchmarks/speed_run.sh`` writes them), so the document shows exactly what was measured::

    .venv/bin/python benchmarks/speed_markdown.py [RESULTS_DIR]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE_NAMES = {"llama2-7b": "LLaMA-2-7B 4096×11008", "llama3-8b": "LLaMA-3-8B 4096×14336", "smollm2": "SmolLM2 576×1536"}


def layout(r: dict[str, Any]) -> str:
    return f"{r['experts']}:{r['top_k']}" + (f":{r['shared']}" if r.get("shared") else "")


def ffn_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| shape | dtype | E:k[:shared] | active | dense decode ms | MoE decode ms | decode × | limit × | of limit "
        "| of limit vs kernel-dense | MoE GB/s | prefill × | prefill × vs fp32-compute dense | FLOP limit × |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    last_shape = None
    for r in rows:
        shape = SHAPE_NAMES.get(r["shape"], r["shape"]) if r["shape"] != last_shape else ""
        last_shape = r["shape"]
        vs_up = r.get("prefill_speedup_vs_fp32_compute_dense")
        out.append(
            f"| {shape} | {r['dtype']} | {layout(r)} | {100 * r['active_fraction']:.0f}% | {r['dense_decode_ms']:.2f} "
            f"| {r['moe_decode_ms']:.2f} | {r['decode_speedup']:.2f} | {r['decode_limit']:.2f} "
            f"| **{100 * r['decode_fraction_of_limit']:.0f}%** | {100 * r['decode_fraction_of_limit_vs_kernel_dense']:.0f}% "
            f"| {r['moe_decode_GBps']:.1f} | {r['prefill_speedup']:.2f} "
            f"| {'–' if vs_up is None or math.isnan(vs_up) else f'{vs_up:.2f}'} | {r['prefill_flop_limit']:.2f} |"
        )
    return "\n".join(out)


def model_table(models: dict[str, Any]) -> str:
    out = [
        "| dtype | dense tok/s | MoE tok/s | decode × | bytes limit × | of limit | dense prefill ms | MoE prefill ms | prefill × |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dt, v in models.items():
        out.append(
            f"| {dt} | {v['dense']['decode_tokens_per_s']:.1f} | {v['moe']['decode_tokens_per_s']:.1f} | {v['decode_speedup']:.2f} "
            f"| {v['decode_limit']:.2f} | {100 * v['decode_speedup'] / v['decode_limit']:.0f}% "
            f"| {v['dense']['prefill_ms']:,.1f} | {v['moe']['prefill_ms']:,.1f} | {v['prefill_speedup']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    for name in ("speed.json", "speed_shared_llama2.json", "speed_shared_smollm2.json", "speed_model.json"):
        path = root / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        meta = data["meta"]
        print(f"### {name} ({meta['device']}, {meta['threads']} threads, median of {meta['repeats']} decode calls)\n")
        if data.get("ffn"):
            print(ffn_table(data["ffn"]) + "\n")
        if data.get("model"):
            print(model_table(data["model"]) + "\n")


if __name__ == "__main__":
    main()
