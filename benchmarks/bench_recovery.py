"""Recovery training on SmolLM2-135M: WikiText-2 test perplexity against training tokens.

One layout per run (its own process, so peak RSS is that layout's):

1. layer-wise conversion (``moefy convert``) on the first ``--calib-tokens`` of WikiText-2 valid
   (reused when ``OUT/<layout>/lw`` exists);
2. ``moefy train`` on WikiText-2 valid past the calibration tokens (``moefy train`` skips the
   checkpoint's calibration text; the held-out sequences are the next ``--val-sequences``, never
   trained on); every ``--eval-tokens`` the perplexity of the student on the first
   ``--curve-windows`` 1024-token windows of WikiText-2 raw test (``0``: all of them, the full test)
   is measured in process (hard routing: the exported model's function), giving the curve;
3. the exported checkpoint's perplexity on the full test set (``--full-test``), and that of the
   layer-wise checkpoint, through ``moefy.evaluate.perplexity`` (the same code as ``moefy eval``);
4. dense fine-tuning tokens/s with the same loss and batch, for the overhead ratio.

Training text (WikiText-2 valid) is disjoint from the test text. Prints a table, writes JSON.

    python benchmarks/bench_recovery.py --layout shared25 --tokens 150000 --out benchmarks/results/recovery
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
LAYOUTS = {  # name: (experts, top_k, shared, shared_by)
    "e8k2": (8, 2, 0, "rate"),
    "shared25": (26, 2, 288, "importance"),
    "e8k4": (8, 4, 0, "rate"),
    "shared50": (20, 4, 576, "importance"),
}


def dense_finetune_tps(model_spec: str, ids: torch.Tensor, steps: int, batch: int) -> float:
    """Tokens/s of dense fine-tuning with the same distillation loss (teacher = frozen copy)."""
    import copy

    from moefy.models import load
    from moefy.training.losses import distill_loss

    teacher = load(model_spec).model
    student = copy.deepcopy(teacher).train()
    for n, p in student.named_parameters():
        p.requires_grad_("embed_tokens" not in n)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    t_total, n_tok = 0.0, 0
    for s in range(steps + 1):
        x = ids[s * batch : (s + 1) * batch]
        t0 = time.time()
        with torch.no_grad():
            th = teacher.model(input_ids=x, use_cache=False).last_hidden_state
        h = student.model(input_ids=x, use_cache=False).last_hidden_state
        labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1).reshape(-1)
        head = student.get_output_embeddings()
        loss, _ = distill_loss(h.reshape(-1, h.shape[-1]), head.weight, None, th.reshape(-1, th.shape[-1]),
                               teacher.get_output_embeddings().weight, None, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s > 0:  # the first step warms up
            t_total += time.time() - t0
            n_tok += x.numel()
    return n_tok / t_total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--eval-tokens", type=int, default=24_576, help="curve point every this many training tokens")
    ap.add_argument("--curve-windows", type=int, default=16, help="0: every 1024-token window of the test set (the full test)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--full-test", action="store_true")
    ap.add_argument("--dense-steps", type=int, default=3)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more moefy train settings as key=value")
    ap.add_argument("--tag", default="", help="suffix for the trained directory and result file (sweeps)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery")
    args = ap.parse_args()

    from moefy.config import ConvertConfig
    from moefy.evaluate import load_eval_ids, perplexity
    from moefy.models import load
    from moefy.runner import run_convert
    from moefy.training.config import TrainConfig
    from moefy.training.run import run_train

    valid, test = SHARED / "wiki.valid.tokens", SHARED / "wiki.test.raw"
    if not valid.is_file() or not test.is_file():
        sys.exit(f"needs {valid} and {test} (../shared beside the project)")
    E, k, shared, shared_by = LAYOUTS[args.layout]
    base = args.out / args.layout
    base.mkdir(parents=True, exist_ok=True)
    lw = base / "lw"
    t0 = time.time()
    if not (lw / "moefy.json").is_file():
        cfg = ConvertConfig(n_experts=E, top_k=k, n_shared=shared, shared_by=shared_by, calib_tokens=args.calib_tokens, seq_len=512)
        run_convert(args.model, lw, cfg, [str(valid)], overwrite=True, log=lambda m: print("convert:", m, flush=True))
    convert_s = time.time() - t0
    tok = load(args.model).tokenizer
    test_ids = load_eval_ids(tok, test)
    if args.curve_windows == 0:  # the full test at every curve point: the windows of `moefy eval --seq-len 1024`
        args.curve_windows = test_ids.numel() // 1024
    curve_ids = test_ids[: args.curve_windows * 1024].view(args.curve_windows, 1024)

    @torch.no_grad()
    def curve_ppl(model: torch.nn.Module) -> dict[str, float]:
        nll, n = 0.0, 0
        for w in curve_ids.split(2):
            logits = model(input_ids=w, use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
            n += w[:, 1:].numel()
        return {"test_ppl_curve": float(torch.tensor(nll / n).exp())}

    settings: dict[str, object] = {}
    for kv in args.extra:
        key, _, val = kv.partition("=")
        import yaml

        settings[key] = yaml.safe_load(val)
    step_tokens = args.seq_len * args.batch_size
    cfg = TrainConfig.from_dict({"tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
                                 "eval_every": max(1, args.eval_tokens // step_tokens), "checkpoint_every": 10, **settings})
    trained = base / f"trained-{args.tokens}{args.tag}"
    t1 = time.time()
    res = run_train(lw, trained, cfg, [str(valid)], teacher=args.model, overwrite=True,
                    log=lambda m: print("train:", m, flush=True),
                    report=lambda r: print(f"step {r['step']}/{r['steps']} kl {r['kl']:.4f} {r['tokens_per_s']:.1f} tok/s"
                                           + (f" val_kl {r['val_kl']:.4f}" if "val_kl" in r else ""), flush=True),
                    extra_eval=curve_ppl)
    train_s = time.time() - t1
    entry = res.record["training"][-1]
    result: dict[str, object] = {
        "layout": args.layout, "tag": args.tag, "experts": E, "top_k": k, "shared": shared, "active_fraction": res.record["active_fraction"],
        "calib_tokens": args.calib_tokens, "convert_seconds": round(convert_s, 1), "train_seconds": round(train_s, 1),
        "train": {k2: entry[k2] for k2 in ("tokens", "steps", "kept_step", "tokens_per_second", "peak_rss_mib", "neurons_moved_total")},
        "curve": [{"tokens": h["step"] * step_tokens, "test_ppl_first_windows": h["test_ppl_curve"], "val_kl": h["val_kl"],
                   "val_ppl": h["val_ppl"]} for h in entry["history"]],
        "curve_windows": args.curve_windows, "config": cfg.to_dict(),
        "command": "python benchmarks/bench_recovery.py " + " ".join(sys.argv[1:]),
    }
    if args.full_test:
        import moefy  # noqa: F401
        from transformers import AutoModelForCausalLM

        for name, path in (("layerwise", lw), ("trained", trained)):
            m = AutoModelForCausalLM.from_pretrained(path).eval()
            r = perplexity(m, test_ids, seq_len=1024)
            result[f"full_test_ppl_{name}"] = r["ppl"]
            result["full_test_windows"] = r["windows"]
            print(f"full test PPL {name}: {r['ppl']:.3f} ({r['windows']} windows)", flush=True)
            del m
    if args.dense_steps:
        from moefy.training.data import PackedData

        ids = PackedData(tok, [str(valid)], args.seq_len).rows(0, args.batch_size * (args.dense_steps + 1))
        dense_tps = dense_finetune_tps(args.model, ids, args.dense_steps, args.batch_size)
        result["dense_finetune_tokens_per_second"] = round(dense_tps, 2)
        result["overhead_vs_dense_finetune"] = round(dense_tps / entry["tokens_per_second"], 3)
    print(f"\n| tokens | test PPL (first {args.curve_windows} windows) | held-out KL |\n|---|---|---|")
    for c in result["curve"]:  # type: ignore[union-attr]
        print(f"| {c['tokens']} | {c['test_ppl_first_windows']:.2f} | {c['val_kl']:.4f} |")
    print(json.dumps({k2: v for k2, v in result.items() if k2 not in ("curve", "config")}, indent=1))
    out = base / f"result-{args.tokens}{args.tag}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
