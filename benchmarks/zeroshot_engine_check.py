"""lm-eval (moefy's zero-shot engine) against the scorer moefy had before, on stories260K.

    .venv/bin/python benchmarks/zeroshot_engine_check.py

Scores the first 100 items of arc_easy, piqa, hellaswag and winogrande with ``moefy.zeroshot``
(lm-eval's HFLM over moefy's offline task copies) and compares, per choice, the request strings and
log-likelihoods, and per task acc / acc_norm, with those the former scorer recorded in
``tests/data/zeroshot_reference_stories260k.json`` (tests/test_zeroshot.py asserts the same).
Writes ``benchmarks/results/zeroshot_lmeval_vs_former.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moefy.zeroshot import evaluate_tasks, lm_eval_version

    ref = json.loads((ROOT / "tests" / "data" / "zeroshot_reference_stories260k.json").read_text())
    model_dir = ROOT.parent / "shared" / "models" / "stories260K" / "hf"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.time()
    res = evaluate_tasks(model, tok, list(ref["tasks"]), data_root=ROOT.parent / "shared" / "data", limit=ref["limit"], details=True)
    seconds = time.time() - t0
    report = {"model": "stories260K", "limit": ref["limit"], "lm_eval": lm_eval_version(), "seconds_lm_eval": round(seconds, 1), "tasks": {}}
    print(f"{'task':<12}{'same requests':>15}{'max|dLL|':>11}{'acc former/lm-eval':>21}{'acc_norm former/lm-eval':>26}")
    for task, want in ref["tasks"].items():
        got = res[task]
        same = sum(hashlib.sha1(json.dumps(r).encode()).hexdigest()[:16] == h
                   for g, w in zip(got["items"], want["items"]) for r, h in zip(g["requests"], w["requests_sha1"]))
        total = sum(len(w["requests_sha1"]) for w in want["items"])
        dll = max(abs(a - b) for g, w in zip(got["items"], want["items"]) for a, b in zip(g["lls"], w["lls"]))
        row = {"identical_requests": f"{same}/{total}", "max_abs_diff_ll": dll,
               "acc": {"former": want["acc"], "lm_eval": got["acc"]}, "acc_norm": {"former": want["acc_norm"], "lm_eval": got["acc_norm"]}}
        report["tasks"][task] = row
        print(f"{task:<12}{row['identical_requests']:>15}{dll:>11.2g}{want['acc']:>12.2f} / {got['acc']:.2f}"
              f"{want['acc_norm']:>17.2f} / {got['acc_norm']:.2f}")
    out = ROOT / "benchmarks" / "results" / "zeroshot_lmeval_vs_former.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
