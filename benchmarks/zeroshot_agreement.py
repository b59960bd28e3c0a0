"""Check moefy.zeroshot against lm-evaluation-harness, item by item, offline.

lm-eval is NOT a moefy dependency; run this with a separate virtual environment that has it::

    python3.11 -m venv /tmp/lmeval
    /tmp/lmeval/bin/pip install torch==2.13.0          # pinned, first (CPU wheel)
    /tmp/lmeval/bin/pip install lm-eval transformers==5.23.0 accelerate   # lm-eval's hf model needs accelerate
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /tmp/lmeval/bin/python benchmarks/zeroshot_agreement.py

What it does, for each task (default arc_easy, arc_challenge, piqa, winogrande, openbookqa; first ``--limit`` items in file order):

1. parses the local LLM-Adapters file with moefy's parser and writes the items back out in the
   original Hugging Face schema (ai2_arc / piqa / winogrande fields) as JSONL;
2. runs lm-eval's own task definition on it -- a YAML that ``include``s lm-eval's installed task
   YAML (its prompt templates, choices, target and for WinoGrande its partial-evaluation functions)
   and only swaps the dataset for ``dataset_path: json`` with ``data_files`` -- through
   ``lm_eval.simple_evaluate`` with the ``hf`` model on the local checkpoint, ``log_samples=True``;
3. scores the same items with ``moefy.zeroshot.score_items`` and compares, per choice, the
   (context, continuation) strings and the log-likelihoods, and the per-task acc / acc_norm.

Prints a table and writes ``benchmarks/results/zeroshot_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moefy import zeroshot as zs  # noqa: E402

# task -> (lm-eval task yaml, relative to lm_eval/tasks; converter raw -> HF-schema doc)
_LETTERS = "ABCDEFGH"


def _arc_doc(raw, gold):
    return {
        "question": raw.question,
        "choices": {"text": raw.choices, "label": list(_LETTERS[: len(raw.choices)])},
        "answerKey": _LETTERS[gold],
    }


def _piqa_doc(raw, gold):
    return {"goal": raw.question, "sol1": raw.choices[0], "sol2": raw.choices[1], "label": gold}


def _winogrande_doc(raw, gold):
    return {"sentence": raw.question, "option1": raw.choices[0], "option2": raw.choices[1], "answer": str(gold + 1)}


SPECS = {
    "arc_easy": ("arc/arc_easy.yaml", _arc_doc),
    "arc_challenge": ("arc/arc_challenge.yaml", _arc_doc),
    "piqa": ("piqa/piqa.yaml", _piqa_doc),
    "winogrande": ("winogrande/default.yaml", _winogrande_doc),
    "openbookqa": ("openbookqa/openbookqa.yaml",
                   lambda raw, gold: {"question_stem": raw.question,
                                      "choices": {"text": raw.choices, "label": list(_LETTERS[: len(raw.choices)])},
                                      "answerKey": _LETTERS[gold]}),
}


def raw_docs(task: str, data_root: Path | None, limit: int) -> list[dict]:
    path = zs.task_path(task, data_root)
    rows = json.loads(path.read_text(encoding="utf-8"))[:limit]
    items = zs.load_task(task, data_root, limit=limit)
    conv = SPECS[task][1]
    docs = []
    for i, (row, item) in enumerate(zip(rows, items)):
        raw = zs._split_instruction(row["instruction"], row["answer"], f"{task} item {i}")
        docs.append(conv(raw, item.gold))
    return docs


def write_task_yaml(task: str, lm_tasks_dir: Path, data_file: Path, out_dir: Path) -> str:
    name = f"moefy_agree_{task}"
    include = (lm_tasks_dir / SPECS[task][0]).resolve()
    text = (
        f"include: {include}\n"
        f"task: {name}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data_file}\n"
        "training_split: null\n"
        "validation_split: null\n"
        "test_split: test\n"
        "fewshot_split: null\n"
    )
    (out_dir / f"{name}.yaml").write_text(text)
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "stories260K" / "hf"))
    ap.add_argument("--tasks", default="arc_easy,arc_challenge,piqa,winogrande,openbookqa")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zeroshot_agreement.json"))
    args = ap.parse_args()

    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # pragma: no cover - environment dependent
        print(f"lm-eval is not importable here ({e}); run with the venv that has it (see module docstring)")
        return 2
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in SPECS:
            raise SystemExit(f"no lm-eval mapping for task {t!r}; have {sorted(SPECS)}")
    data_root = Path(args.data_root) if args.data_root else None
    lm_tasks_dir = Path(lm_eval.__file__).parent / "tasks"

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)

    report: dict = {
        "model": os.path.relpath(args.model, ROOT),
        "limit": args.limit,
        "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "tasks": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = {}
        for t in tasks:
            data_file = tmp / f"{t}.jsonl"
            with data_file.open("w", encoding="utf-8") as f:
                for d in raw_docs(t, data_root, args.limit):
                    f.write(json.dumps(d) + "\n")
            names[t] = write_task_yaml(t, lm_tasks_dir, data_file, tmp)

        t0 = time.time()
        lm_out = simple_evaluate(
            model="hf",
            model_args={"pretrained": args.model, "dtype": "float32", "device": "cpu"},
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=str(tmp)),
            batch_size=args.batch_size,
            log_samples=True,
            bootstrap_iters=1000,  # "mean" metrics get lm-eval's closed-form stderr
        )
        lm_time = time.time() - t0

    rows = []
    for t in tasks:
        name = names[t]
        items = zs.load_task(t, data_root, limit=args.limit)
        t0 = time.time()
        ours = zs.score_items(model, tok, items, batch_size=args.batch_size, return_details=True)
        our_time = time.time() - t0
        samples = sorted(lm_out["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(items), (len(samples), len(items))
        diffs, same_prompt, n_choices, pred_agree = [], 0, 0, 0
        worst = None
        for item, det, s in zip(items, ours["details"], samples):
            lm_lls = [float(r[0]) for r in s["filtered_resps"]]
            lm_args = [tuple(a) for a in s["arguments"]]
            our_args = item.requests()
            for k, (a, b) in enumerate(zip(det["lls"], lm_lls)):
                d = abs(a - b)
                diffs.append(d)
                if worst is None or d > worst[0]:
                    worst = (d, s["doc_id"], k, a, b)
            n_choices += len(lm_lls)
            same_prompt += sum(1 for x, y in zip(our_args, lm_args) if x == (y[0], y[1]))
            pred_agree += int(max(range(len(lm_lls)), key=lambda i: (lm_lls[i], -i)) == det["pred"])
        res = lm_out["results"][name]
        row = {
            "task": t,
            "items": len(items),
            "choices": n_choices,
            "identical_requests": same_prompt,
            "max_abs_diff_ll": max(diffs),
            "mean_abs_diff_ll": sum(diffs) / len(diffs),
            "worst": {"doc_id": worst[1], "choice": worst[2], "moefy": worst[3], "lm_eval": worst[4]},
            "argmax_agree": pred_agree,
            "acc": {"moefy": ours["acc"], "lm_eval": res.get("acc,none")},
            "acc_norm": {"moefy": ours["acc_norm"], "lm_eval": res.get("acc_norm,none")},
            "acc_stderr": {"moefy": ours["acc_stderr"], "lm_eval": res.get("acc_stderr,none")},
            "seconds_moefy": round(our_time, 2),
        }
        rows.append(row)
        report["tasks"][t] = row
    report["seconds_lm_eval_all_tasks"] = round(lm_time, 2)

    hdr = f"{'task':<14}{'items':>6}{'choices':>8}{'same req':>9}{'max|dLL|':>11}{'mean|dLL|':>11}{'acc ours/lm':>15}{'acc_norm ours/lm':>19}"
    print(hdr)
    print("-" * len(hdr))

    def f(x):
        return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    for r in rows:
        print(f"{r['task']:<14}{r['items']:>6}{r['choices']:>8}{r['identical_requests']:>9}"
              f"{r['max_abs_diff_ll']:>11.2e}{r['mean_abs_diff_ll']:>11.2e}"
              f"{f(r['acc']['moefy']) + '/' + f(r['acc']['lm_eval']):>15}"
              f"{f(r['acc_norm']['moefy']) + '/' + f(r['acc_norm']['lm_eval']):>19}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    ok = all(r["max_abs_diff_ll"] < 1e-4 and r["identical_requests"] == r["choices"] for r in rows)
    print("AGREE (all per-choice |dLL| < 1e-4, identical requests)" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
