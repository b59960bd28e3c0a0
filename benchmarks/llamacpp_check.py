"""GGUF exports in llama.cpp itself: tokens and next-token logits against the HF side.

For each case (SmolLM2-135M on a WikiText-2 paragraph, stories260K on a TinyStories story): convert
the model to a small MoE (DOT-MoE layer-wise, as ``moefy convert`` would but with few calibration
tokens: the export is what is checked, not the MoE's quality), save the moefy checkpoint
(tokenizer.json only, as ``moefy convert`` writes it), ``moefy export``, then in llama.cpp
(llama-cpp-python) tokenize the text and evaluate it.  Cases:

* ``smollm2``, ``stories260k``: 8/4 experts, top-2, ``--gating softmax-renorm``, ``--format gguf``
  (llama.cpp's ``llama`` architecture, Mixtral-style experts).
* ``smollm2-shared`` (and ``-f16``): the best SmolLM2 layout at 25% active, 26 experts, top-2, 288
  shared neurons chosen by importance, ``softmax`` gating, ``--format gguf-qwen2moe`` (llama.cpp's
  ``qwen2moe``: the shared neurons are its shared expert), f32 (and f16) tensors.  Compared: llama.cpp's token ids against the HF tokenizer's (BOS as each adds it), on
that text and on a longer one (the first 100,000 characters of WikiText-2 test; all of
sample_5_stories.txt), and llama.cpp's logits at every position against the moefy model's (PyTorch,
fp32, K/V cache fp32 in llama.cpp too) on the same ids.  Logits are bounded up to the first position
where some router's k-th and (k+1)-th logits are closer than ``Case.tie_margin`` (there two correct
implementations may pick different experts); the rest is reported, with the number of near-ties,
and whether every position, near-ties included, is within the bound anyway (the strong result).

llama-cpp-python may live in another virtual environment: ``--llama-python`` names its Python, which
runs this file's ``--worker`` mode (it needs only llama_cpp and numpy).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llamacpp_check.py --llama-python /work/llamacpp-venv/bin/python \\
        --json benchmarks/results/llamacpp_check.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"
TINYSTORIES = SHARED / "data" / "tinystories" / "sample_5_stories.txt"
STORIES = SHARED / "models" / "stories260K" / "hf"


def worker(gguf_path: str, text_path: str, out_dir: str, threads: int) -> None:
    """In a Python with llama_cpp: tokenize the text, evaluate all positions, save ids and logits;
    tokenize ``bulk.txt`` beside the text too (tokens only)."""
    import llama_cpp
    import numpy as np

    text = Path(text_path).read_text()
    # fp32 K/V cache (llama.cpp's default is f16, which alone moves logits by ~1e-2)
    f32 = int(llama_cpp.GGML_TYPE_F32)
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=2048, logits_all=True, n_threads=threads, n_batch=512,
                          type_k=f32, type_v=f32, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    np.save(Path(out_dir) / "ids.npy", np.asarray(ids, dtype=np.int64))
    np.save(Path(out_dir) / "logits.npy", logits)
    bulk = (Path(text_path).parent / "bulk.txt").read_text()
    np.save(Path(out_dir) / "bulk_ids.npy", np.asarray(llm.tokenize(bulk.encode("utf-8"), add_bos=True, special=False), dtype=np.int64))
    (Path(out_dir) / "info.json").write_text(json.dumps({"llama_cpp": llama_cpp.__version__}))


def wikitext_paragraph(min_chars: int = 600) -> str:
    """The first WikiText-2 test paragraph (not a heading) of at least ``min_chars`` characters."""
    for para in WIKITEXT.read_text().split("\n"):
        p = para.strip()
        if len(p) >= min_chars and not p.startswith("="):
            return p
    raise SystemExit("no WikiText-2 paragraph found")


def tinystory() -> str:
    return TINYSTORIES.read_text().split("<|endoftext|>")[0].strip()


def convert(spec: str, calib_text: str, work: Path, n_experts: int, top_k: int, n_shared: int = 0,
            shared_by: str = "rate", gating: str = "softmax-renorm"):
    """A moefy checkpoint of ``spec`` (few calibration tokens: the export is what is checked).
    Trained with ``gating`` where ``moefy convert`` takes it, else with softmax-renorm and then
    set to ``gating`` (the exported function is the saved model's either way)."""
    import torch

    from moefy.config import ConvertConfig
    from moefy.convert import layerwise_stage
    from moefy.errors import ConfigError
    from moefy.export import save_checkpoint, to_moefy_model
    from moefy.models import load
    from moefy.serving_export import set_gating

    loaded = load(spec)
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor(tok(calib_text, add_special_tokens=False).input_ids)
    seq = 64
    n = min(8, ids.numel() // seq)
    calib = ids[: n * seq].reshape(n, seq)
    layout = dict(n_experts=n_experts, top_k=top_k, n_shared=n_shared, shared_by=shared_by, calib_tokens=n * seq,
                  seq_len=seq, steps=3, weights="none", eval_every=1)
    try:
        cfg = ConvertConfig(gating=gating, **layout)
    except ConfigError:  # a gating convert does not train with (yet)
        cfg = ConvertConfig(gating="softmax-renorm", **layout)
    layerwise_stage(model, calib, cfg, batch=4)
    moe = set_gating(to_moefy_model(model), gating).eval()
    return save_checkpoint(moe, tok, work / "moe", {"method": "dot", "source": spec}), tok


@dataclass(frozen=True)
class Case:
    spec: str  # model
    text: Callable[[], str]  # evaluated text
    bulk: Callable[[], str]  # text only tokenized
    calib: Callable[[], str]  # calibration text
    n_experts: int
    top_k: int
    n_shared: int = 0
    shared_by: str = "rate"
    gating: str = "softmax-renorm"
    fmt: str = "gguf"
    dtype: str = "f32"

    @property
    def tie_margin(self) -> float:
        """A router gap (k-th minus (k+1)-th logit) below this is a near-tie: two correct
        implementations may choose different experts there (summation order in f32; f16 rounding of
        weights and activations), so when not every position is within the logit bound, it must hold
        for the positions before the first one."""
        # f32: summation-order noise in a router logit is about 1e-6 (the measured flip, layer 25 of
        # the smollm2 case, was at a gap of 3.4e-6), so 1e-4 leaves a 30x margin
        return 1e-4 if self.dtype == "f32" else 5e-2

    @property
    def tolerance(self) -> float:
        """Max |logit difference| allowed, relative to max(1, max |logit|): f32 summation order, or f16 weights
        (llama.cpp's CPU f16 matmul also rounds the activations to f16)."""
        return 1e-3 if self.dtype == "f32" else 3e-2


def router_gaps(moe, ids) -> "np.ndarray":
    """Per position, the smallest gap between the k-th and (k+1)-th router logit over all MoE
    layers of ``moe`` (fp32, the HF model) on ``ids``; +inf where no layer routes."""
    import numpy as np
    import torch

    from moefy.hf.modeling_moefy import MoefyMLP

    gaps: list[torch.Tensor] = []

    def hook(mlp: MoefyMLP):
        def fn(_module, _inputs, logits):
            k = int(mlp.top_k)
            if 0 < k < logits.shape[-1]:
                top = logits.detach().float().topk(k + 1, dim=-1).values
                gaps.append((top[..., k - 1] - top[..., k]).reshape(-1))
        return fn

    handles = [m.router.register_forward_hook(hook(m)) for m in moe.modules()
               if isinstance(m, MoefyMLP) and getattr(m, "router", None) is not None]
    try:
        with torch.no_grad():
            moe(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    if not gaps:
        return np.full(len(ids), np.inf)
    return torch.stack(gaps).min(0).values.numpy()


def check(name: str, case: Case, llama_python: str, threads: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from moefy.serving_export import export_checkpoint

    text, bulk = case.text(), case.bulk()
    with tempfile.TemporaryDirectory(prefix=f"llamacpp-{name}-") as d:
        work = Path(d)
        t0 = time.time()
        ckpt, tok = convert(case.spec, case.calib(), work, case.n_experts, case.top_k, case.n_shared, case.shared_by, case.gating)
        gguf_path = export_checkpoint(ckpt, case.fmt, work / "model.gguf", dtype=case.dtype)
        (work / "text.txt").write_text(text)
        (work / "bulk.txt").write_text(bulk)
        proc = subprocess.run([llama_python, __file__, "--worker", str(gguf_path), str(work / "text.txt"), str(work), str(threads)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llama.cpp worker failed:\n{proc.stdout}\n{proc.stderr}")
        cpp_ids = np.load(work / "ids.npy").tolist()
        cpp_logits = np.load(work / "logits.npy")
        info = json.loads((work / "info.json").read_text())
        hf_ids = tok(text).input_ids
        bulk_cpp, bulk_hf = np.load(work / "bulk_ids.npy").tolist(), tok(bulk).input_ids
        first_diff = next((i for i, (a, b) in enumerate(zip(cpp_ids, hf_ids)) if a != b), None)
        if first_diff is None and len(cpp_ids) != len(hf_ids):
            first_diff = min(len(cpp_ids), len(hf_ids))
        moe = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        with torch.no_grad():
            ref = moe(input_ids=torch.tensor([hf_ids])).logits[0].float().numpy()
        n = min(len(ref), len(cpp_logits))
        # a near-tie in any router may change that position's hidden state in every later layer, and every
        # later position attends to it: positions from the first near-tie on may legitimately differ
        gaps = router_gaps(moe, hf_ids)[:n]
        near = np.flatnonzero(gaps < case.tie_margin)
        diff_all = np.abs(ref[:n] - cpp_logits[:n])
        max_abs_logit = float(np.abs(ref).max())
        bound = case.tolerance * max(1.0, max_abs_logit)
        # every position within the bound is the strong result, and then every position is checked;
        # otherwise only the positions before the first near-tie must be
        all_ok = bool(diff_all.max() <= bound)
        n_checked = n if all_ok or not len(near) else int(near[0])
        if n_checked == 0:
            raise SystemExit(f"{name}: logits differ by {diff_all.max():.3g} (bound {bound:.3g}) and a router near-tie "
                             f"at position 0 (gap {gaps[0]:.2g}) leaves no position to bound; use another text")
        diff = diff_all[:n_checked]
        argmax = (ref[:n_checked].argmax(-1) == cpp_logits[:n_checked].argmax(-1))
        tokens_equal, bulk_equal = cpp_ids == hf_ids, bulk_cpp == bulk_hf
        logits_ok = bool(diff.max() <= bound)
        # f16: a near-tie may flip an argmax; the logit bound is what is checked
        argmax_ok = bool(argmax.all()) if case.dtype == "f32" else float(argmax.mean()) >= 0.95
        return {
            "model": name, "format": case.fmt, "dtype": case.dtype, "gating": case.gating, "shared": case.n_shared,
            "text_chars": len(text), "hf_tokens": len(hf_ids), "llamacpp_tokens": len(cpp_ids),
            "tokens_equal": tokens_equal, "first_token_mismatch": first_diff,
            "bulk_chars": len(bulk), "bulk_hf_tokens": len(bulk_hf), "bulk_tokens_equal": bulk_equal,
            "bulk_first_mismatch": next((i for i, (a, b) in enumerate(zip(bulk_cpp, bulk_hf)) if a != b), None),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "max_abs_logit": max_abs_logit,
            "positions_checked": n_checked, "positions": n, "tie_margin": case.tie_margin,
            "min_router_gap": float(gaps.min()) if n else None, "near_ties": len(near),
            "max_abs_diff_all_positions": float(diff_all.max()), "all_positions_within_bound": all_ok,
            "tolerance": case.tolerance, "argmax_equal": bool(argmax.all()), "argmax_agreement": float(argmax.mean()),
            "experts": f"{case.n_experts}:{case.top_k}", "gguf_mb": round(gguf_path.stat().st_size / 2**20, 1),
            "llama_cpp": info["llama_cpp"], "seconds": round(time.time() - t0, 1),
            "ok": tokens_equal and bulk_equal and logits_ok and argmax_ok,
        }


def _wikitext() -> str:
    return WIKITEXT.read_text()


def _stories_calib() -> str:
    return "\n".join(TINYSTORIES.read_text().split("<|endoftext|>")[1:])


CASES: dict[str, Case] = {
    "smollm2": Case("smollm2-135m", wikitext_paragraph, lambda: _wikitext()[:100_000], lambda: _wikitext()[-20000:], 8, 2),
    "stories260k": Case(str(STORIES), tinystory, TINYSTORIES.read_text, _stories_calib, 4, 2),
    # the best SmolLM2 layout at 25% active (moefy.layouts), exported with its shared neurons
    "smollm2-shared": Case("smollm2-135m", wikitext_paragraph, lambda: _wikitext()[:100_000], lambda: _wikitext()[-20000:],
                           26, 2, n_shared=288, shared_by="importance", gating="softmax", fmt="gguf-qwen2moe"),
    "smollm2-shared-f16": Case("smollm2-135m", wikitext_paragraph, lambda: _wikitext()[:100_000], lambda: _wikitext()[-20000:],
                               26, 2, n_shared=288, shared_by="importance", gating="softmax", fmt="gguf-qwen2moe", dtype="f16"),
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5], threads=int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,stories260k,smollm2-shared",
                    help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--llama-python", default=sys.executable, help="a Python that imports llama_cpp")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1) or 1))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    unknown = [m for m in args.models.split(",") if m not in CASES]
    if unknown:
        raise SystemExit(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    rows = [check(name, CASES[name], args.llama_python, args.threads) for name in args.models.split(",")]
    cols = ["model", "format", "dtype", "experts", "shared", "gating", "hf_tokens", "llamacpp_tokens", "tokens_equal", "bulk_chars",
            "bulk_hf_tokens", "bulk_tokens_equal", "max_abs_logit", "near_ties", "positions_checked", "max_abs_diff", "all_positions_within_bound",
            "max_abs_diff_all_positions", "mean_abs_diff", "argmax_agreement", "gguf_mb",
            "seconds", "ok"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"llama_cpp": rows[0]["llama_cpp"] if rows else None, "rows": rows}, indent=2) + "\n")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
