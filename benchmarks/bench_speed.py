"""Speed of the moefy MoE fast path against the dense FFN it came from (CPU by default).

Part 1 - one FFN layer, random weights, at LLaMA-2-7B (4096 x 11008) and LLaMA-3-8B
(4096 x 14336) shapes.  For each expert layout ``E:k`` (default 8:2, 8:4, and the finer
16:4, 32:8, 64:16, all at 25 % active) and dtype (fp32, bf16):

* batch-1 decode (one token) and ``--prefill``-token prefill, each the median of ``--repeats``
  timed calls after ``--warmup`` untimed ones, for the dense FFN (``down(silu(gate x) * up x)``
  with nn.Linear-layout weights, as transformers runs it) and the :class:`MoefyMLP` fast path
  sharing the same weights, measured in the same run; reported as speed-up = dense / MoE;
* the physical limit of that speed-up: bytes of weights read per token, dense / MoE (router
  included); decode is memory-bound, so ``achieved / limit`` is how close decode gets to
  reading only the chosen experts.  Above 100 % means the MoE streams its bytes faster than
  PyTorch's dense GEMVs do: on CPU the MoE decodes through moefy's compiled kernel
  (``moefy.kernels``).  So the same kernel is also run on the whole dense FFN (every neuron
  active, ``kernel-dense``), and ``of limit vs kernel-dense`` is the fraction of the limit
  measured against that: the like-for-like figure.  The JSON has GB/s for all three;
* for half precision on CPU, prefill is also compared with dense computed in fp32 from the same
  half weights (what the MoE prefill does per expert: PyTorch's CPU bf16 GEMM without native
  bf16 instructions is several times slower than fp32), ``pre x vs fp32-dense``;
* decode with both memory layouts of ``down_proj`` unless ``--default-layout-only``
  (``transposed``: ``transpose_down=True``, each expert's down-projection one contiguous block,
  the CPU default; ``linear``: nn.Linear's layout, which takes the PyTorch GEMV fallback).

Part 2 (with ``--model-dense`` and ``--model-moe``, loaded by :func:`moefy.models.load`):
whole-model greedy decode tokens/s with the KV cache (``--gen-tokens`` after a
``--prompt-tokens`` prompt) and prefill time of ``--prefill`` tokens, MoE vs dense.

Prints tables and writes JSON (``--json``, default ``benchmarks/results/speed.json``)::

    .venv/bin/python benchmarks/bench_speed.py                       # full run (minutes, quiet machine)
    .venv/bin/python benchmarks/bench_speed.py --quick               # tiny smoke run -> speed_quick.json
    .venv/bin/python benchmarks/bench_speed.py --model-dense DIR --model-moe DIR [--skip-ffn]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moefy.hf.modeling_moefy import MoefyMLP  # noqa: E402

SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
QUICK_SHAPES = {"tiny": (256, 704)}
CONFIGS = [(8, 2), (8, 4), (16, 4), (32, 8), (64, 16)]
QUICK_CONFIGS = [(8, 2), (16, 4), (10, 2, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_ms(fn: Callable[[int], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn(i)`` in ms (``i`` = call index, to vary the input); on a GPU
    the device is synchronised before and after each call."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn(warmup + i)
        _sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def expert_sizes(d_ffn: int, n_experts: int) -> list[int]:
    base, extra = divmod(d_ffn, n_experts)
    return [base + (1 if e < extra else 0) for e in range(n_experts)]


class DenseFFN(nn.Module):
    """The gated FFN as transformers' LlamaMLP computes it."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


class DenseFFNUpcast(DenseFFN):
    """The same FFN computed in fp32 from half-precision weights (cast per call): the trick the
    MoE prefill uses on CPU, applied to dense, so the prefill comparison is like for like."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        h = F.silu(F.linear(xf, self.gate.float())) * F.linear(xf, self.up.float())
        return F.linear(h, self.down.float()).to(x.dtype)


class DenseFFNKernel:
    """Dense decode through moefy's CPU kernel (every neuron active): the bandwidth the kernel
    reaches on a full FFN, so "of limit" can be read against the same code path."""

    def __init__(self, dense: DenseFFN) -> None:
        from moefy import kernels

        self.kernels = kernels
        self.gate, self.up, self.down_t = dense.gate, dense.up, dense.down.t().contiguous()
        self.n = dense.gate.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernels.moe_decode(x.reshape(-1), self.gate, self.up, self.down_t, [0], [self.n], [1.0], "silu")
        assert out is not None
        return out.to(x.dtype)


def moe_sharing(dense: DenseFFN, n_experts: int, top_k: int, gating: str, seed: int, n_shared: int = 0) -> MoefyMLP:
    """A MoefyMLP over the dense weights (no copy of gate/up; the first call lays out its own
    transposed down_proj) with a random router; the first ``n_shared`` neurons are always active."""
    d_ffn, hidden = dense.gate.shape
    with torch.device("meta"):
        mlp = MoefyMLP(hidden, expert_sizes(d_ffn - n_shared, n_experts), top_k=top_k, gating=gating, n_shared=n_shared)
    g = torch.Generator().manual_seed(seed)
    router = (torch.randn(n_experts, hidden, generator=g) / hidden**0.5).to(dense.gate.dtype).to(DEVICE)
    mlp.gate_proj.weight = nn.Parameter(dense.gate, requires_grad=False)
    mlp.up_proj.weight = nn.Parameter(dense.up, requires_grad=False)
    mlp.down_proj.weight = nn.Parameter(dense.down, requires_grad=False)
    mlp.router.weight = nn.Parameter(router, requires_grad=False)
    return mlp.eval()


def ffn_rows(
    shape_name: str, hidden: int, d_ffn: int, dtype_name: str, configs: list[tuple[int, ...]],
    prefill: int, repeats: int, warmup: int, gating: str, both_layouts: bool, seed: int,
    prefill_repeats: int | None = None,
) -> list[dict[str, Any]]:
    pre_repeats = prefill_repeats or max(1, repeats // 2)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    std = 1.0 / hidden**0.5
    dense = DenseFFN(
        (torch.randn(d_ffn, hidden, generator=g) * std).to(dtype).to(DEVICE),
        (torch.randn(d_ffn, hidden, generator=g) * std).to(dtype).to(DEVICE),
        (torch.randn(hidden, d_ffn, generator=g) * std).to(dtype).to(DEVICE),
    )
    n_inputs = max(repeats + warmup, 1)
    xs = (torch.randn(n_inputs, 1, hidden, generator=g)).to(dtype).to(DEVICE)
    xp = (torch.randn(prefill, hidden, generator=g)).to(dtype).to(DEVICE)
    esize = torch.finfo(dtype).bits // 8
    # MoefyMLP's default (transpose_down=None): transposed on CPU
    auto_t = DEVICE.type == "cpu"
    rows = []
    with torch.no_grad():
        dense_dec = median_ms(lambda i: dense(xs[i % n_inputs]), repeats, warmup)
        dense_pre = median_ms(lambda i: dense(xp), pre_repeats, 1) if prefill else float("nan")
        dense_pre_up = float("nan")
        if prefill and dtype in (torch.bfloat16, torch.float16) and DEVICE.type == "cpu":
            up_ffn = DenseFFNUpcast(dense.gate, dense.up, dense.down)
            dense_pre_up = median_ms(lambda i: up_ffn(xp), pre_repeats, 1)
        kernel_dec = float("nan")
        if DEVICE.type == "cpu":
            from moefy import kernels

            if kernels.load() is not None:
                kdense = DenseFFNKernel(dense)
                kernel_dec = median_ms(lambda i: kdense(xs[i % n_inputs]), repeats, warmup)
                del kdense
                gc.collect()
        dense_bytes = 3 * hidden * d_ffn * esize
        for cfg in configs:
            n_experts, top_k = cfg[0], cfg[1]
            n_shared = cfg[2] if len(cfg) > 2 else 0
            sizes = expert_sizes(d_ffn - n_shared, n_experts)
            active = n_shared + top_k * max(sizes)
            moe_bytes = (3 * active * hidden + n_experts * hidden) * esize
            decode = {}
            for layout, flag in (("transposed", True), ("linear", False)):
                moe = moe_sharing(dense, n_experts, top_k, gating, seed + n_experts, n_shared)
                moe.transpose_down = flag
                moe(xs[0])  # lays out down_proj once (not timed)
                decode[layout] = median_ms(lambda i: moe(xs[i % n_inputs]), repeats, warmup) if both_layouts or flag == auto_t else float("nan")
                if flag == auto_t:
                    moe_pre = median_ms(lambda i: moe(xp), pre_repeats, 1) if prefill else float("nan")
                del moe
                gc.collect()
            moe_dec = decode["transposed" if auto_t else "linear"]
            limit = dense_bytes / moe_bytes
            flop_limit = (3 * d_ffn) / (3 * active + n_experts)
            row = {
                "shape": shape_name, "hidden": hidden, "d_ffn": d_ffn, "dtype": dtype_name,
                "experts": n_experts, "top_k": top_k, "shared": n_shared, "expert_size": max(sizes),
                "active_fraction": active / d_ffn,
                "down_layout": "transposed" if auto_t else "linear",
                "dense_decode_ms": dense_dec, "moe_decode_ms": moe_dec, "decode_speedup": dense_dec / moe_dec,
                "bytes_per_token_dense": dense_bytes, "bytes_per_token_moe": moe_bytes,
                "decode_limit": limit, "decode_fraction_of_limit": (dense_dec / moe_dec) / limit,
                "dense_decode_GBps": dense_bytes / dense_dec / 1e6, "moe_decode_GBps": moe_bytes / moe_dec / 1e6,
                "dense_kernel_decode_ms": kernel_dec, "dense_kernel_decode_GBps": dense_bytes / kernel_dec / 1e6,
                "decode_speedup_vs_kernel_dense": kernel_dec / moe_dec,
                "decode_fraction_of_limit_vs_kernel_dense": (kernel_dec / moe_dec) / limit,
                "decode_ms_down_transposed": decode["transposed"], "decode_ms_down_linear": decode["linear"],
                "decode_speedup_down_transposed": dense_dec / decode["transposed"],
                "decode_speedup_down_linear": dense_dec / decode["linear"],
                "prefill_tokens": prefill, "dense_prefill_ms": dense_pre, "moe_prefill_ms": moe_pre,
                "prefill_speedup": dense_pre / moe_pre if prefill else float("nan"), "prefill_flop_limit": flop_limit,
                "dense_prefill_ms_fp32_compute": dense_pre_up,
                "prefill_speedup_vs_fp32_compute_dense": dense_pre_up / moe_pre if prefill else float("nan"),
            }
            rows.append(row)
    return rows


# ------------------------------------------------------------------------ whole model
def weights_read_per_token(model: nn.Module) -> int:
    """Parameters a batch-1 decode step reads: all of them, except that an untied input
    embedding gives one row, and a MoE FFN its router, shared block and ``top_k`` average
    experts (for LapSum routing, the layer's budget ``k_l`` as the expected count)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    total = 0
    moe_params: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, MoefyMLP):
            ids = {id(p) for p in mod.parameters()}
            moe_params |= ids
            mean_size = sum(mod.expert_sizes) / max(1, mod.n_experts)
            active = mod.n_shared + float(mod.top_k) * mean_size
            total += int(mod.router.weight.numel() + 3 * mod.hidden_size * active)
    for p in model.parameters():
        if id(p) in moe_params:
            continue
        if p is emb and not tied:
            total += p.shape[-1]
            continue
        total += p.numel()
    return total


def model_speed(spec: str, dtype: torch.dtype, prompt_tokens: int, gen_tokens: int, prefill: int, repeats: int, warmup: int) -> dict[str, Any]:
    from transformers import DynamicCache

    from moefy.models import load

    loaded = load(spec, dtype=dtype)
    model = loaded.model.eval().to(DEVICE)
    cfg = getattr(model.config, "base_config", None) or model.config.to_dict()
    vocab = int(cfg["vocab_size"] if isinstance(cfg, dict) else cfg.vocab_size)
    max_pos = int((cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None) or 2048)
    prefill = min(prefill, max_pos)
    prompt_tokens = min(prompt_tokens, max_pos - gen_tokens - 1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=g).to(DEVICE)
    long = torch.randint(3, vocab, (1, prefill), generator=g).to(DEVICE)

    def decode_run() -> float:
        cache = DynamicCache()
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync()
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync()
        return time.perf_counter() - t0

    with torch.no_grad():
        for _ in range(warmup):
            decode_run()
        decode_s = statistics.median(decode_run() for _ in range(max(1, repeats)))
        prefill_ms = median_ms(lambda i: model(input_ids=long, use_cache=False), max(1, repeats), warmup)
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": spec, "params": params, "params_read_per_token": weights_read_per_token(model),
        "decode_tokens_per_s": gen_tokens / decode_s,
        "decode_ms_per_token": 1e3 * decode_s / gen_tokens, "prefill_tokens": prefill, "prefill_ms": prefill_ms,
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
    }


# --------------------------------------------------------------------------- output
def print_table(title: str, headers: list[str], cells: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="right")
        for c in cells:
            table.add_row(*c)
        Console(width=max(160, sum(len(h) + 3 for h in headers))).print(table)
    except ImportError:  # pragma: no cover
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for c in cells:
            print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


def ffn_table(rows: list[dict[str, Any]], title: str) -> None:
    headers = [
        "shape", "dtype", "E:k", "active", "dense dec ms", "MoE dec ms", "dec x", "limit x", "of limit",
        "MoE GB/s", "kernel-dense GB/s", "of limit vs kernel-dense",
        "dense pre ms", "MoE pre ms", "pre x", "pre x vs fp32-dense", "FLOP limit x",
    ]
    cells = [
        [
            r["shape"], r["dtype"], f"{r['experts']}:{r['top_k']}" + (f":{r['shared']}" if r.get("shared") else ""), f"{100 * r['active_fraction']:.0f}%",
            f"{r['dense_decode_ms']:.3f}", f"{r['moe_decode_ms']:.3f}", f"{r['decode_speedup']:.2f}",
            f"{r['decode_limit']:.2f}", f"{100 * r['decode_fraction_of_limit']:.0f}%",
            f"{r['moe_decode_GBps']:.1f}", f"{r['dense_kernel_decode_GBps']:.1f}",
            f"{100 * r['decode_fraction_of_limit_vs_kernel_dense']:.0f}%",
            f"{r['dense_prefill_ms']:.2f}", f"{r['moe_prefill_ms']:.2f}",
            f"{r['prefill_speedup']:.2f}", f"{r['prefill_speedup_vs_fp32_compute_dense']:.2f}", f"{r['prefill_flop_limit']:.2f}",
        ]
        for r in rows
    ]
    print_table(title, headers, cells)


def _kernel_status() -> dict[str, Any]:
    from moefy import kernels

    if DEVICE.type == "cpu":
        kernels.load()
    return kernels.status()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    ap.add_argument("--shapes", nargs="+", default=None, help="NAME=HIDDENxDFFN or a known name (llama2-7b, llama3-8b)")
    ap.add_argument("--configs", nargs="+", default=None, help="E:k or E:k:shared (default 8:2 8:4 16:4 32:8 64:16)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--prefill", type=int, default=512, help="prefill tokens (0: skip prefill)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prefill-repeats", type=int, default=None, help="timed prefill calls (default: repeats // 2)")
    ap.add_argument("--gating", default="mask", help="MoefyMLP gating for the FFN rows (mask, softmax, softmax-renorm)")
    ap.add_argument("--default-layout-only", action="store_true", help="skip timing the non-default down_proj layout")
    ap.add_argument("--skip-ffn", action="store_true", help="only the whole-model part")
    ap.add_argument("--model-dense", default=None, help="dense model (directory, .gguf, hub id) for part 2")
    ap.add_argument("--model-moe", default=None, help="its converted moefy checkpoint for part 2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (results are labelled by device)")
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/speed.json (speed_quick.json with --quick)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.json is None:
        args.json = ROOT / "benchmarks" / "results" / ("speed_quick.json" if args.quick else "speed.json")
    if args.quick:
        shapes = dict(QUICK_SHAPES)
        configs = QUICK_CONFIGS
        args.prefill = min(args.prefill, 32)
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 1)
        args.gen_tokens, args.prompt_tokens = min(args.gen_tokens, 8), min(args.prompt_tokens, 16)
    else:
        shapes = dict(SHAPES)
        configs = CONFIGS
    if args.shapes:
        shapes = {}
        for s in args.shapes:
            if s in SHAPES:
                shapes[s] = SHAPES[s]
            else:
                name, _, dims = s.rpartition("=")
                h, n = dims.lower().split("x")
                shapes[name or dims] = (int(h), int(n))
    if args.configs:
        configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]  # type: ignore[misc]

    meta = {
        "benchmark": "speed", "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "repeats": args.repeats, "prefill_repeats": args.prefill_repeats or max(1, args.repeats // 2),
        "warmup": args.warmup, "gating": args.gating,
        "statistic": "median wall time; speed-up = dense / MoE in the same run",
        "cpu_kernel": _kernel_status(),
    }
    result: dict[str, Any] = {"meta": meta, "ffn": [], "model": None}
    if not args.skip_ffn:
        for shape_name, (hidden, d_ffn) in shapes.items():
            for dtype_name in args.dtypes:
                rows = ffn_rows(
                    shape_name, hidden, d_ffn, dtype_name, configs, args.prefill, args.repeats, args.warmup,
                    args.gating, not args.default_layout_only, args.seed, args.prefill_repeats,
                )
                result["ffn"].extend(rows)
                ffn_table(
                    rows,
                    f"FFN {shape_name} {hidden}x{d_ffn} {dtype_name} on {meta['device']}: batch-1 decode and {args.prefill}-token prefill, "
                    f"speed-up = dense / MoE ({torch.get_num_threads()} threads, median of {args.repeats})",
                )
    if args.model_dense or args.model_moe:
        if not (args.model_dense and args.model_moe):
            ap.error("--model-dense and --model-moe go together")
        models: dict[str, Any] = {}
        for dtype_name in args.dtypes:
            dt = DTYPES[dtype_name]
            d = model_speed(args.model_dense, dt, args.prompt_tokens, args.gen_tokens, args.prefill, args.repeats, args.warmup)
            m = model_speed(args.model_moe, dt, args.prompt_tokens, args.gen_tokens, args.prefill, args.repeats, args.warmup)
            models[dtype_name] = {
                "dense": d, "moe": m,
                "decode_speedup": m["decode_tokens_per_s"] / d["decode_tokens_per_s"],
                "decode_limit": d["params_read_per_token"] / m["params_read_per_token"],
                "prefill_speedup": d["prefill_ms"] / m["prefill_ms"],
            }
        result["model"] = models
        cells = [
            [
                k, f"{v['dense']['decode_tokens_per_s']:.1f}", f"{v['moe']['decode_tokens_per_s']:.1f}",
                f"{v['decode_speedup']:.2f}", f"{v['decode_limit']:.2f}", f"{100 * v['decode_speedup'] / v['decode_limit']:.0f}%",
                f"{v['dense']['prefill_ms']:.1f}", f"{v['moe']['prefill_ms']:.1f}",
                f"{v['prefill_speedup']:.2f}",
            ]
            for k, v in models.items()
        ]
        print_table(
            f"whole model: {args.model_moe} vs {args.model_dense} (greedy decode with KV cache, "
            f"{args.gen_tokens} tokens after a {args.prompt_tokens}-token prompt; prefill {args.prefill} tokens)",
            ["dtype", "dense tok/s", "MoE tok/s", "decode x", "bytes limit x", "of limit", "dense prefill ms", "MoE prefill ms", "prefill x"],
            cells,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
