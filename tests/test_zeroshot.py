"""Zero-shot evaluation: moefy's offline task copies (moefy.task_data) scored by lm-eval (moefy.zeroshot).

The agreement test pins lm-eval's numbers on stories260K to those of the scorer moefy had before
(tests/data/zeroshot_reference_stories260k.json): same prompts, same log-likelihoods to float32
rounding, the same acc and acc_norm.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefy import task_data as td

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K" / "hf"
REFERENCE = Path(__file__).resolve().parent / "data" / "zeroshot_reference_stories260k.json"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA} (expected ../shared next to the project)")
needs_model = pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES} (expected ../shared next to the project)")
try:
    import lm_eval  # noqa: F401

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - lm-eval is a dependency; a broken install skips, and says so
    HAVE_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not importable (pip install 'lm-eval>=0.4,<0.5')")


@pytest.fixture(scope="module")
def stories():
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(STORIES)


def _sha(context: str, continuation: str) -> str:
    return hashlib.sha1(json.dumps([context, continuation]).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# lm-eval against the former scorer
# ------------------------------------------------------------------------------------------


@needs_lm_eval
@needs_data
@needs_model
def test_lm_eval_gives_the_former_scorers_numbers(stories):
    from moefy.zeroshot import evaluate_tasks

    ref = json.loads(REFERENCE.read_text())
    model, tok = stories
    res = evaluate_tasks(model, tok, list(ref["tasks"]), data_root=DATA, limit=ref["limit"], details=True)
    for task, want in ref["tasks"].items():
        got = res[task]
        assert got["n"] == want["n"] == 100
        assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"]), task
        assert got["acc_stderr"] == pytest.approx(want["acc_stderr"], rel=1e-9)
        assert [it["doc_id"] for it in got["items"]] == list(range(100))
        for i, (g, w) in enumerate(zip(got["items"], want["items"])):
            assert [_sha(c, x) for c, x in g["requests"]] == w["requests_sha1"], (task, i)  # identical prompts
            # fp32 sums of ~1e3 differ by an ulp (1.2e-4) between thread counts: relative tolerance too
            assert g["lls"] == pytest.approx(w["lls"], rel=1e-6, abs=1e-4), (task, i)


@needs_lm_eval
@needs_data
@needs_model
def test_every_offline_task_runs_with_its_prompt(stories):
    from moefy.zeroshot import evaluate_tasks

    model, tok = stories
    res = evaluate_tasks(model, tok, list(td.LOCAL_TASKS), data_root=DATA, limit=3, details=True)
    for task, r in res.items():
        assert r["n"] == 3 and set(r) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}, task
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
        for it in r["items"]:
            assert all(math.isfinite(x) and x < 0 for x in it["lls"])
    first = {t: r["items"][0]["requests"] for t, r in res.items()}
    assert first["boolq"] == [["Question: does ethanol take more energy make that produces?\nAnswer:", " no"],
                              ["Question: does ethanol take more energy make that produces?\nAnswer:", " yes"]]
    assert first["sciq"][0][0].startswith("Question: ") and first["sciq"][3][1] == " oxidants"  # lm-eval: correct last
    assert first["social_iqa"][0][0].startswith("Q: ") and first["social_iqa"][0][0].endswith("\nA:")
    assert first["hellaswag"][0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first["winogrande"][1] == ["Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."]
    assert first["arc_challenge"][2][1] == " Planetary days will become shorter."


# ------------------------------------------------------------------------------------------
# any lm-eval task: configs from --task-dir, other output types
# ------------------------------------------------------------------------------------------


def _word_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    pre = pre_tokenizers.Whitespace()
    for t in texts:
        for w, _ in pre.pre_tokenize_str(t):
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@needs_lm_eval
def test_task_configs_from_a_folder(tmp_path):
    """Any lm-eval task config works: a multiple-choice and a loglikelihood task over local JSONL."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moefy.zeroshot import evaluate_tasks

    docs = [{"q": f"is {w} a colour ?", "choices": ["yes", "no"], "gold": g, "text": f"the {w} cat sat"}
            for w, g in [("red", 0), ("table", 1), ("blue", 0), ("chair", 1), ("green", 0)]]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    (tmp_path / "toy_mc.yaml").write_text(json.dumps({
        "task": "toy_mc", **common, "output_type": "multiple_choice", "doc_to_text": "Question: {{q}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    (tmp_path / "toy_ll.yaml").write_text(json.dumps({
        "task": "toy_ll", **common, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}]}))
    tok = _word_tokenizer([d["q"] + " yes no " + d["text"] + " Question Answer :" for d in docs])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    res = evaluate_tasks(model, tok, "toy_mc,toy_ll", task_dirs=[tmp_path], limit=4, batch_size=2)
    assert res["toy_mc"]["n"] == 4 and 0.0 <= res["toy_mc"]["acc"] <= 1.0 and "acc_norm" in res["toy_mc"]
    assert res["toy_ll"]["n"] == 4 and res["toy_ll"]["word_perplexity"] > 1.0


def test_errors_are_one_line_and_come_before_the_model(tmp_path):
    from moefy.zeroshot import evaluate_tasks

    with pytest.raises(ValueError, match="not found") as e:
        evaluate_tasks(None, None, ["arc_easy", "piqa"], data_root=tmp_path)
    assert "\n" not in str(e.value) and "ARC-Easy.test.json" in str(e.value)
    with pytest.raises(ValueError, match="task config folder not found"):
        evaluate_tasks(None, None, ["x"], task_dirs=[tmp_path / "nope"])
    with pytest.raises(ValueError, match="no tasks"):
        evaluate_tasks(None, None, " , ")
    with pytest.raises(ValueError, match="not found"):
        td.load_docs("hellaswag", data_root=tmp_path)
    with pytest.raises(ValueError, match="no offline copy"):
        td.load_docs("mmlu")


@needs_lm_eval
@needs_data
def test_unknown_task_names_every_source(stories):
    from moefy.zeroshot import evaluate_tasks

    model, tok = stories
    with pytest.raises(ValueError, match="unknown task 'no_such_task'") as e:
        evaluate_tasks(model, tok, ["arc_easy", "no_such_task"], data_root=DATA, limit=2)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------
# the offline copies as lm-eval documents
# ------------------------------------------------------------------------------------------

EXPECTED = {  # task: items
    "arc_challenge": 1172, "arc_easy": 2376, "boolq": 3270, "openbookqa": 500, "piqa": 1838,
    "social_iqa": 1954, "winogrande": 1267, "sciq": 1000, "hellaswag": 10042,
}


def test_task_names():
    assert set(td.LOCAL_TASKS) == set(EXPECTED)


@needs_data
@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_documents_of_the_real_files(task):
    docs = td.load_docs(task, data_root=DATA)
    assert len(docs) == EXPECTED[task]
    assert td.load_docs(task, data_root=DATA, limit=3) == docs[:3]  # deterministic, file order
    for d in docs:
        if task in ("arc_easy", "arc_challenge", "openbookqa"):
            assert d["answerKey"] in d["choices"]["label"] and len(d["choices"]["text"]) in (3, 4, 5)
        elif task == "piqa":
            assert d["label"] in (0, 1) and d["goal"].strip()
        elif task == "winogrande":
            assert d["sentence"].count("_") >= 1 and d["answer"] in ("1", "2")
        elif task == "boolq":
            assert d["label"] in (0, 1) and not d["question"].endswith("?")
        elif task == "sciq":
            assert all(d[k].strip() for k in ("correct_answer", "distractor1", "distractor2", "distractor3"))
        elif task == "social_iqa":
            assert d["label"] in ("1", "2", "3") and all(d[k] for k in ("answerA", "answerB", "answerC"))
        else:
            assert len(d["endings"]) == 4 and d["label"] in ("0", "1", "2", "3")
    if task == "hellaswag":  # ctx_b exists for the ActivityNet items only
        assert sum(1 for d in docs if d["ctx_b"]) == 3243
        assert all(d["ctx_b"] == d["ctx_b"].lower() for d in docs)  # so str.capitalize only raises the first letter


@needs_data
def test_first_documents_exact():
    arc = td.load_docs("arc_challenge", data_root=DATA, limit=1)[0]
    assert arc["question"] == ("An astronomer observes that a planet rotates faster after a meteorite impact. "
                               "Which is the most likely effect of this increase in rotation?")
    assert arc["choices"]["text"][2] == "Planetary days will become shorter." and arc["answerKey"] == "C"
    piqa = td.load_docs("piqa", data_root=DATA, limit=2)
    assert piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and piqa[0]["label"] == 0
    assert (piqa[1]["sol1"], piqa[1]["sol2"]) == ("replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ")
    hs = td.load_docs("hellaswag", data_root=DATA, limit=1)[0]
    assert (hs["activity_label"], hs["ctx_a"], hs["ctx_b"]) == ("Roof shingle removal", "A man is sitting on a roof.", "he")
    assert hs["endings"][3] == "starts pulling up roofing on a roof." and hs["label"] == "3"
    wg = td.load_docs("winogrande", data_root=DATA, limit=1)[0]
    assert wg == {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                  "option1": "Sarah", "option2": "Maria", "answer": "2"}
    bq = td.load_docs("boolq", data_root=DATA, limit=1)[0]
    assert bq["question"] == "does ethanol take more energy make that produces" and bq["label"] == 0
    ob = td.load_docs("openbookqa", data_root=DATA, limit=2)[1]
    assert ob["question_stem"] == "There is most likely going to be fog around:" and ob["choices"]["text"][0] == "a marsh"
    assert ob["answerKey"] == "A"
    sq = td.load_docs("sciq", data_root=DATA, limit=1)[0]
    assert sq["correct_answer"] == "oxidants" and [sq[f"distractor{i}"] for i in (1, 2, 3)] == ["Oxygen", "residues", "antioxidants"]


# ------------------------------------------------------------------------------------------
# the command line and the JSON moefy compare reads
# ------------------------------------------------------------------------------------------


@needs_lm_eval
@needs_data
@needs_model
def test_moefy_eval_json(tmp_path):
    out = tmp_path / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "moefy.cli", "eval", str(STORIES), "--tasks", "arc_easy,winogrande", "--limit", "5",
         "--data-root", str(DATA), "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["models"][0]
    assert res["tasks_scored_by"].startswith("lm-eval 0.4")
    for name in ("arc_easy", "winogrande"):
        assert list(res["tasks"][name]) == ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "per_item"]
        assert res["tasks"][name]["n"] == 5
        items = res["tasks"][name]["per_item"]
        assert len(items["acc_norm"]) == 5 and sum(items["acc_norm"]) / 5 == pytest.approx(res["tasks"][name]["acc_norm"])
    assert "arc_easy acc / acc_norm (n=5)" in proc.stdout + proc.stderr


def test_compare_report_cells():
    from moefy.compare import markdown_report

    ev = {"tasks": {"arc_easy": {"acc": 0.25, "acc_norm": 0.5, "n": 4}, "lambada_openai": {"acc": 0.125, "perplexity": 9.0, "n": 8}}}
    md = markdown_report({"model": "m", "calibration": [], "calib_tokens": 0, "ppl_file": None, "tasks": ["arc_easy", "lambada_openai"],
                          "dense": ev, "cells": {}})
    assert "| 0.250 / 0.500 (n=4) | 0.125 / - (n=8) |" in md


# ------------------------------------------------------------------------------------------
# retention: the share of the reference's above-chance accuracy a model keeps
# ------------------------------------------------------------------------------------------


def _r(acc: float, se: float = 0.01, n: int = 1000) -> dict:
    return {"acc": acc, "acc_stderr": se, "acc_norm": acc, "acc_norm_stderr": se, "n": n}


def test_retention_is_the_ratio_of_above_chance_sums():
    from moefy.zeroshot import CHANCE, retention

    ref = {"sciq": _r(0.50), "piqa": _r(0.66), "arc_easy": _r(0.45)}
    model = {"sciq": _r(0.30), "piqa": _r(0.55), "arc_easy": _r(0.35)}
    got = retention(ref, model)
    num = sum(model[t]["acc_norm"] - CHANCE[t] for t in ref)
    den = sum(ref[t]["acc_norm"] - CHANCE[t] for t in ref)
    assert got["retention"] == pytest.approx(num / den)
    assert got["tasks"] == list(ref) and got["excluded"] == {} and got["stderr"] > 0
    assert retention(ref, ref)["retention"] == pytest.approx(1.0)


def test_retention_counts_only_tasks_the_reference_can_do():
    from moefy.zeroshot import retention

    ref = {"sciq": _r(0.50), "winogrande": _r(0.505, 0.014), "boolq": _r(0.43), "lambada_openai": _r(0.3), "piqa": _r(0.6)}
    model = {"sciq": _r(0.40), "winogrande": _r(0.49), "boolq": _r(0.6), "lambada_openai": _r(0.2)}
    got = retention(ref, model)
    # piqa was not scored for the model; winogrande is within 2 stderr of chance; boolq below
    # chance; lambada has no chance level: only sciq counts, and every other scored task says why
    assert got["tasks"] == ["sciq"]
    assert set(got["excluded"]) == {"winogrande", "boolq", "lambada_openai"}
    assert got["retention"] == pytest.approx((0.40 - 0.25) / (0.50 - 0.25))
    assert retention({"boolq": _r(0.43)}, {"boolq": _r(0.6)})["retention"] is None
    assert retention(ref, model, metric="acc")["metric"] == "acc"


def test_model_labels_are_short_and_distinct():
    from moefy.cli import model_labels

    assert model_labels(["smollm2-135m", "out/a/layerwise", "out/a/recovered"]) == ["smollm2-135m", "layerwise", "recovered"]
    assert model_labels(["x/one/moe", "y/two/moe"]) == ["one/moe", "two/moe"]


@needs_lm_eval
@needs_data
@needs_model
def test_moefy_eval_checks_every_model_before_work(tmp_path):
    out = tmp_path / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-m", "moefy.cli", "eval", str(STORIES), str(tmp_path / "no-such-model"), "--tasks", "arc_easy",
         "--limit", "2", "--data-root", str(DATA), "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3 and "model not found" in proc.stderr and "Traceback" not in proc.stderr
    assert "Running loglikelihood" not in proc.stderr and not out.exists()  # nothing ran
    proc = subprocess.run(
        [sys.executable, "-m", "moefy.cli", "eval", str(STORIES), "--tasks", "arc_easy,no_such_task_here",
         "--limit", "2", "--data-root", str(DATA)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "no_such_task_here" in proc.stderr


@needs_lm_eval
@needs_data
@needs_model
def test_moefy_eval_several_models_one_schema_with_retention(tmp_path):
    out = tmp_path / "eval.json"
    text = tmp_path / "t.txt"
    text.write_text((DATA / "tinystories" / "sample_5_stories.txt").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "moefy.cli", "eval", str(STORIES), str(STORIES), "--tasks", "arc_easy,piqa", "--limit", "20",
         "--ppl", str(text), "--ppl", str(DATA / "tinystories" / "sample_5_stories.txt"), "--seq-len", "128",
         "--data-root", str(DATA), "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["complete"] and res["reference"] == str(STORIES) and len(res["models"]) == 2
    for m in res["models"]:
        assert len(m["perplexity"]) == 2 and m["ppl"] == m["perplexity"][str(text)]["ppl"]
        assert all(p["x_ref"] == pytest.approx(1.0) for p in m["perplexity"].values())
        ret = m["retention"]
        # every task given is either counted or said why not
        assert sorted(ret["tasks"] + list(ret["excluded"])) == ["arc_easy", "piqa"]
        if ret["tasks"]:
            assert ret["retention"] == pytest.approx(1.0)
    assert "above-chance acc_norm kept" in proc.stdout + proc.stderr and "not counted:" in proc.stderr


def test_paired_retention_stderr_uses_the_items_both_models_scored():
    from moefy.zeroshot import retention

    g = torch.Generator().manual_seed(0)
    ref_items = (torch.rand(400, generator=g) < 0.55).float()
    flip = torch.rand(400, generator=g) < 0.15
    model_items = torch.where(flip, 1 - ref_items, ref_items)  # agrees with the reference on 85% of items

    def res(items):
        acc = float(items.mean())
        se = float(items.std() / 400 ** 0.5)
        return {"piqa": {"acc_norm": acc, "acc_norm_stderr": se, "n": 400, "per_item": {"acc_norm": items.tolist()}}}

    paired = retention(res(ref_items), res(model_items))
    unpaired = retention({"piqa": {k: v for k, v in res(ref_items)["piqa"].items() if k != "per_item"}}, res(model_items))
    assert paired["paired"] and not unpaired["paired"]
    assert paired["retention"] == pytest.approx(unpaired["retention"])
    assert 0 < paired["stderr"] < unpaired["stderr"]  # correlated items: the paired error is smaller
    assert retention(res(ref_items), res(ref_items))["stderr"] == pytest.approx(0.0, abs=1e-9)
