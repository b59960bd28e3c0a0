"""Scale benchmark (issue 16): converting LLaMA-2-7B-shaped models on one machine.

Part 1 (``--part scale``): writes random-weight LLaMA-2-7B-shaped bf16 safetensors models (hidden 4096,
d_ffn 11008, 32 heads, one shard per layer, a 512-token vocabulary so the embeddings stay small; the
tokenizer is stories260K's) with 2, 4 and 8 layers, and converts each at E=8 k=2 in its own process,
layer by layer from the shards (``--onload``) and with the whole model loaded (``--no-onload``, in bf16
and fp32), measuring the process's peak RSS (``ru_maxrss``) and the time per layer; the time for 32
layers is projected from a linear fit ``wall = a + b * layers``.  ``--before DIR`` measures instead a
checkout of moefy from before this issue (``git worktree add DIR a1b08d9``): the whole model in fp32.

Part 2 (``--part smollm``): SmolLM2-135M (the ``smollm2-135m`` GGUF, loaded whole in process) converted
with ``--dtype bf16`` and ``--dtype fp32``: WikiText-2 perplexity (each checkpoint evaluated in its own
dtype, ``moefy eval --dtype auto``) and the conversion's peak RSS side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --part scale --layers 2,4,8 \\
        --json benchmarks/results/scale.json
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --part smollm --json benchmarks/results/scale_smollm2.json

Prints a Markdown table; ``--json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "hf"
TINYSTORIES = SHARED / "data" / "tinystories" / "validation_head.txt"
WIKI_VALID = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"
WIKI_TEST = SHARED / "data" / "wikitext2" / "wiki.test.raw"

# peak RSS of a child process: run it from a fresh interpreter and report RUSAGE_CHILDREN
_PEAK = ("import json, resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:]); "
         "print('PEAK ' + json.dumps({'rc': r.returncode, 'seconds': time.time() - t, "
         "'peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-c", _PEAK, *cmd], env=env, stdout=subprocess.PIPE, stderr=fh, text=True)
    line = next((x for x in res.stdout.splitlines() if x.startswith("PEAK ")), None)
    if line is None:
        raise SystemExit(f"no measurement from {cmd}; see {log}")
    out = json.loads(line[5:])
    if out["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out['rc']}); see {log}")
    out["peak_rss_gib"] = out.pop("peak_rss_kib") / 2**20
    return out


# ------------------------------------------------------------------------------ part 1
def write_model(path: Path, n_layers: int, vocab: int = 512, seed: int = 0) -> Path:
    """A LLaMA-2-7B-shaped model with ``n_layers`` random bf16 layers, written one shard per layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    cfg.save_pretrained(tmp)
    g = torch.Generator().manual_seed(seed)
    d, f = 4096, 11008

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    n_files = n_layers + 1  # the embeddings, then one shard per layer (the last with the norm and LM head)
    weight_map: dict[str, str] = {}
    total = 0

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    write(1, {"model.embed_tokens.weight": rand(vocab, d)})
    for i in range(n_layers):  # one layer in memory at a time: the benchmark itself never holds the model
        p = f"model.layers.{i}."
        tensors = {
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            **{p + f"self_attn.{n}_proj.weight": rand(d, d) for n in "qkvo"},
            p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d), p + "mlp.down_proj.weight": rand(d, f),
        }
        if i == n_layers - 1:
            tensors.update({"model.norm.weight": torch.ones(d, dtype=torch.bfloat16), "lm_head.weight": rand(vocab, d)})
        write(i + 2, tensors)
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (STORIES / name).is_file():
            shutil.copy2(STORIES / name, tmp / name)
    os.replace(tmp, path)
    return path


BEFORE = "moefy before issue 16 (whole model, fp32)"


def convert_cmd(model: Path, out: Path, a: argparse.Namespace, *extra: str, before: bool = False) -> list[str]:
    return [sys.executable, "-m", "moefy.cli", "convert", str(model), "--out", str(out), "--experts", "8", "--top-k", "2",
            "--calib", str(TINYSTORIES), "--calib-tokens", str(a.calib_tokens), "--seq-len", str(a.seq_len),
            "--steps", str(a.steps), "--overwrite", *([] if before else ["--device", a.device]), *extra]


def part_scale(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), COLUMNS="200")
    variants = {
        "layer by layer, bf16": ["--onload", "--dtype", "bf16"],
        "whole model, bf16": ["--no-onload", "--dtype", "bf16"],
        "whole model, fp32": ["--no-onload", "--dtype", "fp32"],
    }
    chosen = {k: v for k, v in variants.items() if any(k.startswith(p) for p in a.paths.split(","))}
    if a.before:  # a checkout of moefy before this issue: its only path, the whole model in fp32
        chosen = {BEFORE: []}
    rows: list[dict[str, Any]] = []
    for n in [int(v) for v in a.layers.split(",")]:
        model = write_model(work / f"llama7b-shape-{n}l", n)
        for name, flags in chosen.items():
            if name.startswith("whole model, fp32") and n > a.fp32_max_layers:
                continue
            out = work / (f"out-{n}l-before" if name == BEFORE else f"out-{n}l-{name.split(',')[0].replace(' ', '-')}-{flags[-1]}")
            print(f"converting {n} layers: {name}", file=sys.stderr, flush=True)
            run_env = dict(env, PYTHONPATH=str(Path(a.before) / "src")) if name == BEFORE else env
            m = measured(convert_cmd(model, out, a, *flags, before=name == BEFORE), run_env, work / f"{out.name}.log")
            rec = json.loads((out / "moefy.json").read_text())
            rec.setdefault("loading", {"estimated_layer_bytes": float("nan")})
            fit = [r["seconds"] for r in rec["layer_reports"]]
            row = {"layers": n, "variant": name, "peak_rss_gib": round(m["peak_rss_gib"], 3),
                   "wall_seconds": round(m["seconds"], 1), "fit_seconds_per_layer": round(sum(fit) / len(fit), 1),
                   "estimated_layer_gib": round(rec["loading"]["estimated_layer_bytes"] / 2**30, 3),
                   "mean_error_final": rec["summary"]["mean_error_final"],
                   **({"cuda_peak_gib": round(rec["loading"]["cuda_peak_bytes"] / 2**30, 3)} if "cuda_peak_bytes" in rec["loading"] else {}),
                   "checkpoint_files": sorted(p.name for p in out.iterdir() if p.name.startswith("model") and p.suffix in (".safetensors", ".json"))}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    projection = {}
    for name in chosen:
        pts = [(r["layers"], r["wall_seconds"]) for r in rows if r["variant"] == name]
        if len(pts) >= 2:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            projection[name] = {"seconds_per_layer": round(b, 1), "fixed_seconds": round(my - b * mx, 1),
                                "hours_for_32_layers": round((my - b * mx + 32 * b) / 3600, 2)}
    return {"rows": rows, "projection_32_layers": projection,
            "settings": {"calib_tokens": a.calib_tokens, "seq_len": a.seq_len, "steps": a.steps, "experts": 8, "top_k": 2,
                         "device": a.device, "threads": env["OMP_NUM_THREADS"]}}


def markdown_scale(res: dict[str, Any]) -> str:
    lines = ["| layers | path | peak RSS (GiB) | estimated per layer (GiB) | wall (s) | fit per layer (s) | output files |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        files = r["checkpoint_files"]
        lines.append(f"| {r['layers']} | {r['variant']} | {r['peak_rss_gib']:.2f} | {r['estimated_layer_gib']:.2f} | "
                     f"{r['wall_seconds']:.0f} | {r['fit_seconds_per_layer']:.0f} | {len(files)} ({files[0]}{', ...' if len(files) > 1 else ''}) |")
    lines += ["", "| path | seconds per layer (fit of wall time) | fixed (s) | 32 layers (h) |", "|---|---|---|---|"]
    for name, p in res["projection_32_layers"].items():
        lines.append(f"| {name} | {p['seconds_per_layer']:.0f} | {p['fixed_seconds']:.0f} | {p['hours_for_32_layers']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ part 2
def part_smollm(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), COLUMNS="200")
    rows = []
    for dtype in ("fp32", "bf16"):
        out = work / f"smollm2-{dtype}"
        cmd = [sys.executable, "-m", "moefy.cli", "convert", "smollm2-135m", "--out", str(out), "--calib", str(WIKI_VALID),
               "--calib-tokens", str(a.smollm_calib_tokens), "--seq-len", "512", "--dtype", dtype, "--overwrite"]
        print(f"converting SmolLM2-135M in {dtype}", file=sys.stderr, flush=True)
        m = measured(cmd, env, work / f"smollm2-{dtype}.log")
        ev = work / f"smollm2-{dtype}-eval.json"
        res = subprocess.run([sys.executable, "-m", "moefy.cli", "eval", str(out), "--ppl", str(WIKI_TEST),
                              "--max-windows", str(a.max_windows), "--dtype", "auto", "--json", str(ev)], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-2000:])
        rec = json.loads((out / "moefy.json").read_text())
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append({"dtype": dtype, "ppl": json.loads(ev.read_text())["ppl"], "peak_rss_gib": round(m["peak_rss_gib"], 3),
                     "convert_seconds": round(m["seconds"], 1), "checkpoint_mib": round(size / 2**20, 1),
                     "mean_error_final": rec["summary"]["mean_error_final"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "settings": {"calib_tokens": a.smollm_calib_tokens, "max_windows": a.max_windows, "experts": 8, "top_k": 2}}


def markdown_smollm(res: dict[str, Any]) -> str:
    lines = ["| --dtype | WikiText-2 PPL | peak RSS (GiB) | convert (s) | checkpoint (MiB) | mean rel. error (final) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['ppl']:.2f} | {r['peak_rss_gib']:.2f} | {r['convert_seconds']:.0f} | "
                     f"{r['checkpoint_mib']:.0f} | {r['mean_error_final']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("scale", "smollm"), default="scale")
    ap.add_argument("--layers", default="2,4,8")
    ap.add_argument("--paths", default="layer,whole", help="comma-separated prefixes of the variants: layer, whole")
    ap.add_argument("--fp32-max-layers", type=int, default=8, help="the fp32 whole-model variant only up to this many layers")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--before", default=None, help="a checkout of moefy before issue 16 (git worktree add DIR a1b08d9): "
                    "measure its whole-model fp32 path instead")
    ap.add_argument("--smollm-calib-tokens", type=int, default=8192)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--work", default="/tmp/moefy-bench-scale")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.time()
    res = part_scale(a) if a.part == "scale" else part_smollm(a)
    res["command"] = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    res["seconds"] = round(time.time() - t0, 1)
    print(markdown_scale(res) if a.part == "scale" else markdown_smollm(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
