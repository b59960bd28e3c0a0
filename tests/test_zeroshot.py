"""Tests for moefy.zeroshot: parsers on the shared data, scoring on hand-made models, one real model."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moefy import zeroshot as zs

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K" / "hf"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA} (expected ../shared next to the project)")
needs_model = pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES} (expected ../shared next to the project)")


# ------------------------------------------------------------------------------------------
# hand-made tokenizer and models
# ------------------------------------------------------------------------------------------


def make_tokenizer(texts, bos: bool = True):
    """A word-level HF fast tokenizer over the words of ``texts``; prepends <s> when ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    pre = pre_tokenizers.Whitespace()
    for t in texts:
        for w, _ in pre.pre_tokenize_str(t):
            vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


class BigramLM(nn.Module):
    """Next-token logits depend only on the current token: ``logits[t] = table[input_ids[t]]``."""

    def __init__(self, vocab_size: int, max_len: int = 256):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab_size, vocab_size))
        self.config = SimpleNamespace(max_position_embeddings=max_len)

    def prefer(self, tokenizer, pairs, strength: float = 8.0):
        vocab = tokenizer.get_vocab()
        with torch.no_grad():
            for a, b in pairs:
                self.table[vocab[a], vocab[b]] = strength
        return self

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


KNOWN_ITEMS = [
    # gold is the only choice containing a preferred bigram; golds at different positions, different
    # numbers of choices and continuation lengths (so batches need padding)
    zs.MCItem("Question: what colour is the sky?\nAnswer:", ["red grass", "blue sky", "green sea"], 1),
    zs.MCItem("Question: where does the cat sit?\nAnswer:", ["the cat sat on the mat", "dog on roof", "mat on the sat"], 0),
    zs.MCItem("The opposite of hot is", ["warm", "tepid", "cold", "boiling"], 2),  # decided by the context's last token
    zs.MCItem("Question: is ice cold?\nAnswer:", ["no", "yes"], 1),
    # partial evaluation (WinoGrande style): the contexts differ, the continuation is shared
    zs.MCItem("Sarah beat Maria so _ won.", ["won.", "won."], 1, contexts=["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]),
]
PREFERRED = [
    ("blue", "sky"),
    ("the", "cat"), ("cat", "sat"), ("sat", "on"), ("on", "the"), ("the", "mat"),
    ("is", "cold"),
    (":", "yes"),
    ("Maria", "won"),
]


def all_texts(items):
    return [c + cont for it in items for c, cont in it.requests()]


# ------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_known_answers_get_full_accuracy(batch_size):
    tok = make_tokenizer(all_texts(KNOWN_ITEMS))
    model = BigramLM(len(tok.get_vocab())).prefer(tok, PREFERRED)
    res = zs.score_items(model, tok, KNOWN_ITEMS, batch_size=batch_size, return_details=True)
    assert res["n"] == len(KNOWN_ITEMS)
    assert res["acc"] == 1.0
    assert res["acc_stderr"] == 0.0
    assert [d["pred"] for d in res["details"]] == [it.gold for it in KNOWN_ITEMS]


def test_loglikelihood_values_match_bigram_table():
    tok = make_tokenizer(all_texts(KNOWN_ITEMS))
    V = len(tok.get_vocab())
    model = BigramLM(V).prefer(tok, PREFERRED, strength=5.0)
    # the ":" row boosts only "yes" and the "blue" row only "sky"; all other rows are uniform
    (ll_red, _), (ll_blue, greedy_blue) = zs.loglikelihoods(model, tok, KNOWN_ITEMS[0].requests()[:2])
    logz_boost = math.log(V - 1 + math.exp(5.0))
    assert ll_red == pytest.approx(-logz_boost - math.log(V), abs=1e-5)  # p(red|:) p(grass|red)
    assert ll_blue == pytest.approx(-logz_boost + 5.0 - logz_boost, abs=1e-5)  # p(blue|:) p(sky|blue)
    assert not greedy_blue  # "yes" is the arg-max after ":"
    (ll_yes, greedy_yes), = zs.loglikelihoods(model, tok, [KNOWN_ITEMS[3].requests()[1]])
    assert greedy_yes and ll_yes == pytest.approx(5.0 - logz_boost, abs=1e-5)


def test_acc_norm_length_normalisation_changes_winner():
    # uniform model: every token costs log V, so the 1-token choice wins on acc, but per character
    # the 2-token, 21-character choice is far cheaper and wins on acc_norm
    item = zs.MCItem("Question: pick one\nAnswer:", ["x", "yyyyyyyyyy zzzzzzzzzz"], gold=1)
    tok = make_tokenizer(all_texts([item]))
    model = BigramLM(len(tok.get_vocab()))
    res = zs.score_items(model, tok, [item], return_details=True)
    lls = res["details"][0]["lls"]
    assert lls[0] > lls[1]
    assert lls[0] / 1 < lls[1] / 21
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0
    assert res["details"][0]["pred"] == 0 and res["details"][0]["pred_norm"] == 1


def test_stderr_and_limit():
    tok = make_tokenizer(all_texts(KNOWN_ITEMS))
    model = BigramLM(len(tok.get_vocab())).prefer(tok, PREFERRED)
    wrong = zs.MCItem(KNOWN_ITEMS[0].context, KNOWN_ITEMS[0].choices, gold=0)
    res = zs.score_items(model, tok, [KNOWN_ITEMS[0], wrong, KNOWN_ITEMS[1]], limit=2)
    assert res["n"] == 2 and res["acc"] == 0.5
    assert res["acc_stderr"] == pytest.approx(0.5)  # sample std (ddof=1) / sqrt(n)
    with pytest.raises(ValueError):
        zs.score_items(model, tok, [], batch_size=2)


def test_encode_pair_bos_and_trailing_space():
    tok = make_tokenizer(["Question : hi Answer yes no"])
    ctx, cont = zs.encode_pair(tok, "Question: hi\nAnswer: ", "yes")  # trailing space moves to the continuation
    vocab = tok.get_vocab()
    assert ctx[0] == vocab["<s>"] and ctx[1] == vocab["Question"]
    assert cont == [vocab["yes"]]
    tok_nobos = make_tokenizer(["Question : hi Answer yes no"], bos=False)
    ctx2, cont2 = zs.encode_pair(tok_nobos, "Question: hi\nAnswer:", " yes")
    assert ctx2 == ctx[1:] and cont2 == cont


def _tiny_llama(vocab_size: int, max_len: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len)
    return LlamaForCausalLM(cfg).eval()


def _reference_ll(model, tok, context, continuation, max_len=None):
    ctx, cont = zs.encode_pair(tok, context, continuation)
    full = ctx + cont
    if max_len is not None:
        full = full[-(max_len + 1):]
    ids = torch.tensor([full[:-1]])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    tgt = torch.tensor(cont)
    return lp[-len(cont):].gather(-1, tgt[:, None]).sum().item()


def test_batched_padding_matches_unbatched_reference_on_tiny_llama():
    tok = make_tokenizer(all_texts(KNOWN_ITEMS))
    model = _tiny_llama(len(tok.get_vocab()))
    reqs = [r for it in KNOWN_ITEMS for r in it.requests()]
    got_1 = [ll for ll, _ in zs.loglikelihoods(model, tok, reqs, batch_size=1)]
    got_b = [ll for ll, _ in zs.loglikelihoods(model, tok, reqs, batch_size=5)]
    ref = [_reference_ll(model, tok, c, x) for c, x in reqs]
    assert got_1 == pytest.approx(ref, abs=1e-5)
    assert got_b == pytest.approx(ref, abs=1e-5)
    # left truncation to max_length + 1 tokens, like lm-eval
    got_t = [ll for ll, _ in zs.loglikelihoods(model, tok, reqs, batch_size=4, max_length=6)]
    ref_t = [_reference_ll(model, tok, c, x, max_len=6) for c, x in reqs]
    assert got_t == pytest.approx(ref_t, abs=1e-5)


# ------------------------------------------------------------------------------------------
# task registry and errors
# ------------------------------------------------------------------------------------------


def test_unknown_task_and_missing_file_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'; supported: arc_easy") as e:
        zs.load_task("nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown task"):
        zs.evaluate_tasks(None, None, ["arc_easy", "nope"])  # checked before any model call
    with pytest.raises(ValueError, match="not found") as e:
        zs.evaluate_tasks(None, None, ["piqa"], data_root=tmp_path)
    assert "\n" not in str(e.value) and "piqa.test.json" in str(e.value)
    with pytest.raises(ValueError, match="not found"):
        zs.load_task("hellaswag", data_root=tmp_path)


def test_task_names():
    assert set(zs.TASKS) == {"arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "sciq", "openbookqa", "social_iqa"}


# ------------------------------------------------------------------------------------------
# parsers on the real files
# ------------------------------------------------------------------------------------------

EXPECTED = {  # task: (items, set of choice counts)
    "arc_challenge": (1172, {3, 4, 5}),
    "arc_easy": (2376, {3, 4, 5}),
    "boolq": (3270, {2}),
    "openbookqa": (500, {4}),
    "piqa": (1838, {2}),
    "social_iqa": (1954, {3}),
    "winogrande": (1267, {2}),
    "sciq": (1000, {4}),
    "hellaswag": (10042, {4}),
}


@needs_data
@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_parser_on_real_file(task):
    items = zs.load_task(task, data_root=DATA)
    n, counts = EXPECTED[task]
    assert len(items) == n
    assert {len(it.choices) for it in items} <= counts
    for it in items:
        assert 0 <= it.gold < len(it.choices)
        assert it.context.strip() and all(c.strip() for c in it.choices)
    assert zs.load_task(task, data_root=DATA, limit=3) == items[:3]  # deterministic, file order
    if task in ("arc_easy", "arc_challenge", "piqa", "sciq"):
        assert all(it.context.startswith("Question: ") and it.context.endswith("\nAnswer:") for it in items)
    if task == "social_iqa":
        assert all(it.context.startswith("Q: ") and it.context.endswith("\nA:") for it in items)
    if task == "boolq":
        assert all(it.choices == ["no", "yes"] and it.context.endswith("?\nAnswer:") and "??" not in it.context for it in items)
    if task == "winogrande":
        for it in items:
            assert it.contexts is not None and len(set(it.choices)) == 1
            assert all("_" not in c for c in it.contexts)
            for ctx, ch in zip(it.contexts, it.choices):
                assert it.context.replace("_", ctx[it.context.index("_"):], 1).startswith(ctx)
    if task == "hellaswag":
        for it in items:
            # lm-eval's preprocessing drops matched [...] only; stray "[" stay, as they do there
            for text in [it.context, *it.choices]:
                assert re.search(r"\[.*?\]", text) is None and "[title]" not in text


@needs_data
def test_parser_first_items_exact():
    arc = zs.load_task("arc_challenge", data_root=DATA, limit=1)[0]
    assert arc.context == ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                           "Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert arc.choices[2] == "Planetary days will become shorter." and arc.gold == 2
    assert arc.requests()[0][1] == " Planetary density will decrease."
    piqa = zs.load_task("piqa", data_root=DATA, limit=2)
    assert piqa[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:" and piqa[0].gold == 0
    assert piqa[1].choices == ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "]  # raw PIQA text kept
    hs = zs.load_task("hellaswag", data_root=DATA, limit=1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised like lm-eval
    assert hs.choices[3] == "starts pulling up roofing on a roof." and hs.gold == 3
    wg = zs.load_task("winogrande", data_root=DATA, limit=1)[0]
    assert wg.contexts == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.requests()[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")
    assert wg.gold == 1
    bq = zs.load_task("boolq", data_root=DATA, limit=1)[0]
    assert bq.context == "Question: does ethanol take more energy make that produces?\nAnswer:" and bq.gold == 0
    ob = zs.load_task("openbookqa", data_root=DATA, limit=2)[1]
    assert ob.context == "There is most likely going to be fog around:" and ob.choices[0] == "a marsh" and ob.gold == 0
    sq = zs.load_task("sciq", data_root=DATA, limit=1)[0]
    assert sq.choices == ["Oxygen", "residues", "antioxidants", "oxidants"] and sq.gold == 3


# ------------------------------------------------------------------------------------------
# end to end on the real tiny model
# ------------------------------------------------------------------------------------------


@needs_data
@needs_model
def test_stories260k_end_to_end():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES)
    tok = AutoTokenizer.from_pretrained(STORIES)
    res = zs.evaluate_tasks(model, tok, ["arc_easy", "winogrande"], data_root=DATA, limit=5, batch_size=8)
    assert set(res) == {"arc_easy", "winogrande"}
    for r in res.values():
        assert r["n"] == 5
        for k in ("acc", "acc_norm"):
            assert 0.0 <= r[k] <= 1.0
            assert r[k + "_stderr"] >= 0.0 and math.isfinite(r[k + "_stderr"])
    items = zs.load_task("hellaswag", data_root=DATA, limit=5)
    det = zs.score_items(model, tok, items, batch_size=4, return_details=True)["details"]
    assert len(det) == 5 and all(len(d["lls"]) == 4 for d in det)
    assert all(math.isfinite(x) and x < 0 for d in det for x in d["lls"])
