"""Mixtral and Qwen2-MoE exports in vLLM itself (CPU build): greedy generation against transformers.

For each model (SmolLM2-135M; stories260K, which vLLM's CPU attention refuses: head_dim 8), convert
it to a small MoE as benchmarks/llamacpp_check.py does (DOT-MoE layer-wise, ``--gating
softmax-renorm``, few calibration tokens: the export is what is checked), ``moefy export --format
mixtral`` and ``--format qwen2-moe``, and for a few prompts generate 32 tokens greedily
(temperature 0, EOS ignored) with

- vLLM (``LLM(model=export, dtype="float32", enforce_eager=True)`` on CPU, all prompts in one batch),
- transformers' stock class (``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM``) on the same export,
- moefy's own model (the checkpoint the export came from),

the transformers/moefy sides one prompt at a time, argmax at every step with the KV cache, as
``generate(do_sample=False)`` does but without stopping at EOS (vLLM's ``ignore_eos``). Compared:
vLLM's prompt token ids with the HF tokenizer's, the 32 generated ids, and the log-probability of
each generated token (vLLM's ``logprobs`` against log-softmax of the transformers logits).

vLLM lives in another virtual environment (its CPU wheel pins its own torch and transformers):
``--vllm-python`` names its Python, which runs this file's ``--worker`` mode. Set it up with
``bash benchmarks/vllm_setup.sh`` (PyPI only).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_check.py --vllm-python /work/vllm-venv/bin/python \\
        --json benchmarks/results/vllm_check.json

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"
TINYSTORIES = SHARED / "data" / "tinystories" / "sample_5_stories.txt"
STORIES = SHARED / "models" / "stories260K" / "hf"
NEW_TOKENS = 32
FORMATS = ("mixtral", "qwen2-moe")

SMOLLM2_PROMPTS = [
    "The history of the city begins in",
    "In 1998, the band released their second album,",
    "The game was played in front of a crowd of",
    "Robert Boulter is an English film and television actor. He had a guest starring role",
]
STORIES_PROMPTS = [
    "Once upon a time, there was a little girl named",
    "One day, a big dog",
    "Tom and Sue went to the park. They",
]


# ------------------------------------------------------------------------------- vLLM side
def worker(request_path: str, out_path: str) -> None:
    """In a Python with vLLM: load one export, generate greedily for all prompts in one batch."""
    req = json.loads(Path(request_path).read_text())
    import vllm
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    cfg = json.loads((Path(req["model"]) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    info = {"vllm": vllm.__version__, "head_dim": head_dim, "supported_head_dims": supported}
    if head_dim not in supported:  # vLLM loads the weights, then fails at the first forward
        info["blocked"] = (f"vLLM's CPU attention supports head_dim {supported}; this model has {head_dim} "
                           f"(RuntimeError: Unsupported CPU attention configuration: head_dim={head_dim})")
        Path(out_path).write_text(json.dumps(info))
        return
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=req["model"], dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=len(req["prompts"]),
              seed=0, trust_remote_code=False)
    info["load_s"] = round(time.time() - t0, 1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    t0 = time.time()
    outs = llm.generate(req["prompts"], params, use_tqdm=False)
    info["generate_s"] = round(time.time() - t0, 2)
    info["results"] = []
    for o in outs:
        c = o.outputs[0]
        lps = [step[tid].logprob for step, tid in zip(c.logprobs, c.token_ids)]
        info["results"].append({"prompt_ids": list(o.prompt_token_ids), "ids": list(c.token_ids), "logprobs": lps,
                                "text": c.text})
    Path(out_path).write_text(json.dumps(info))


def run_vllm(vllm_python: str, model_dir: Path, prompts: list[str], work: Path, threads: int) -> dict:
    req, out = work / f"{model_dir.name}.request.json", work / f"{model_dir.name}.vllm.json"
    req.write_text(json.dumps({"model": str(model_dir), "prompts": prompts}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # the CPU wheel's docs ask for Intel OpenMP in LD_PRELOAD (the wheel depends on intel-openmp)
    iomp = Path(vllm_python).parent.parent / "lib" / "libiomp5.so"
    if iomp.exists() and "libiomp5" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    proc = subprocess.run([vllm_python, __file__, "--worker", str(req), str(out)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.exists():
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln]
        raise SystemExit(f"vLLM worker failed on {model_dir} (rc {proc.returncode}):\n" + "\n".join(errors[-10:] or
                         (proc.stdout + proc.stderr).splitlines()[-30:]))
    return json.loads(out.read_text())


# ------------------------------------------------------------------------ transformers side
def greedy(model, prompt_ids: list[int], n: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """Argmax at every step with the KV cache (generate(do_sample=False) without EOS stopping);
    returns the ids and each chosen token's log-probability."""
    import warnings

    import torch

    ids, lps = [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5.2x: past_key_values -> cache
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(n):
            logp = torch.log_softmax(out.logits[0, -1].float(), -1)
            nxt = int(logp.argmax())
            ids.append(nxt)
            lps.append(float(logp[nxt]))
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return ids, lps


def check(name: str, spec: str, prompts: list[str], calib_text: str, vllm_python: str, threads: int,
          n_experts: int, top_k: int, keep: Path | None) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llamacpp_check import convert

    from moefy.serving_export import export_checkpoint

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix=f"vllm-{name}-") as d:
        work = keep / name if keep is not None else Path(d)
        work.mkdir(parents=True, exist_ok=True)
        ckpt, tok = convert(spec, calib_text, work, n_experts, top_k)
        hf_prompt_ids = [tok(p).input_ids for p in prompts]
        moe = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        own = [greedy(moe, ids) for ids in hf_prompt_ids]
        rows = []
        for fmt in FORMATS:
            t0 = time.time()
            out = export_checkpoint(ckpt, fmt, work / fmt)
            stock = AutoModelForCausalLM.from_pretrained(out).eval()
            hf = [greedy(stock, ids) for ids in hf_prompt_ids]
            v = run_vllm(vllm_python, out, prompts, work, threads)
            row = {"model": name, "format": fmt, "class": type(stock).__name__, "experts": f"{n_experts}:{top_k}",
                   "prompts": len(prompts), "new_tokens": NEW_TOKENS, "vllm": v["vllm"], "head_dim": v["head_dim"],
                   "hf_equals_moefy": all(a[0] == b[0] for a, b in zip(hf, own))}
            if "blocked" in v:
                row.update(blocked=v["blocked"], seconds=round(time.time() - t0, 1))
                rows.append(row)
                continue
            res = v["results"]
            same_prompt = [r["prompt_ids"] == ids for r, ids in zip(res, hf_prompt_ids)]
            same = [r["ids"] == h[0] for r, h in zip(res, hf)]
            first = [next((i for i, (a, b) in enumerate(zip(r["ids"], h[0])) if a != b), None) for r, h in zip(res, hf)]
            # log-probabilities where both sides chose the same token so far
            dlp = [abs(a - b) for r, h, f in zip(res, hf, first) for a, b in list(zip(r["logprobs"], h[1]))[: NEW_TOKENS if f is None else f + 1]]
            row.update(
                prompt_ids_equal=all(same_prompt), sequences_equal=sum(same), vllm_equals_hf=all(same),
                vllm_equals_moefy=all(r["ids"] == o[0] for r, o in zip(res, own)),
                tokens_equal=sum(sum(a == b for a, b in zip(r["ids"], h[0])) for r, h in zip(res, hf)),
                tokens_total=NEW_TOKENS * len(prompts), first_mismatch=first,
                max_abs_dlogprob=max(dlp), load_s=v["load_s"], vllm_generate_s=v["generate_s"],
                seconds=round(time.time() - t0, 1), sample=tok.decode(res[0]["ids"]),
            )
            rows.append(row)
        return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,stories260k", help="comma-separated: smollm2, stories260k")
    ap.add_argument("--vllm-python", required=True, help="a Python that imports vllm (its CPU build)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1) or 1))
    ap.add_argument("--keep", type=Path, default=None, help="keep the checkpoints and exports under this folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    # (model, prompts, calibration text, experts, top-k)
    cases = {
        "smollm2": ("smollm2-135m", SMOLLM2_PROMPTS, lambda: WIKITEXT.read_text()[-20000:], 8, 2),
        "stories260k": (str(STORIES), STORIES_PROMPTS, lambda: "\n".join(TINYSTORIES.read_text().split("<|endoftext|>")[1:]), 4, 2),
    }
    rows = []
    for name in args.models.split(","):
        spec, prompts, calib, e, k = cases[name]
        rows.extend(check(name, spec, prompts, calib(), args.vllm_python, args.threads, e, k, args.keep))
    cols = ["model", "format", "experts", "head_dim", "prompt_ids_equal", "sequences_equal", "tokens_equal",
            "max_abs_dlogprob", "hf_equals_moefy", "vllm_equals_moefy", "load_s", "vllm_generate_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if "blocked" in r:
            print(f"| {r['model']} | {r['format']} | {r['experts']} | {r['head_dim']} | blocked: {r['blocked']} |")
            continue
        r = {**r, "sequences_equal": f"{r['sequences_equal']}/{r['prompts']}", "tokens_equal": f"{r['tokens_equal']}/{r['tokens_total']}"}
        print("| " + " | ".join(f"{r[c]:.2g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    for r in rows:
        if "sample" in r:
            print(f"{r['model']} {r['format']} first continuation: {r['sample']!r}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
