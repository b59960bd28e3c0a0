"""The de-quantised-GGUF cache: a second load reads safetensors, with the same weights."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from moefy import models
from moefy.models import Source, load

from conftest import STORIES, needs_shared


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A ``.gguf`` path whose 'de-quantisation' is stories260K's safetensors (counted)."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF-test")
    calls = {"model": 0}
    orig_model = transformers.AutoModelForCausalLM.from_pretrained
    orig_tok = transformers.AutoTokenizer.from_pretrained

    def model_fp(name, *args, gguf_file=None, **kw):
        if gguf_file is None:
            return orig_model(name, *args, **kw)
        calls["model"] += 1
        return orig_model(str(STORIES), *args, **kw)

    def tok_fp(name, *args, gguf_file=None, **kw):
        return orig_tok(str(STORIES) if gguf_file is not None else name, *args, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_fp)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_fp)
    monkeypatch.setenv("MOEFY_GGUF_CACHE", str(tmp_path / "cache"))
    return Source(str(path), "gguf", path), calls


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@needs_shared()
def test_second_load_reads_the_cache_with_identical_weights(fake_gguf, tmp_path):
    src, calls = fake_gguf
    first = load(src)
    second = load(src)
    assert calls["model"] == 1  # de-quantised once
    assert _same(first.model, second.model)
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    assert first.tokenizer("Once upon a time").input_ids == second.tokenizer("Once upon a time").input_ids
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp dir left


@needs_shared()
def test_cache_is_keyed_by_file_and_dtype(fake_gguf):
    src, calls = fake_gguf
    load(src)
    load(src, torch.bfloat16)  # another dtype: its own entry
    assert calls["model"] == 2
    st = src.path.stat()
    os.utime(src.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    load(src)
    assert calls["model"] == 3


@needs_shared()
def test_cache_off_and_damaged_entry(fake_gguf, monkeypatch):
    src, calls = fake_gguf
    load(src)
    entry = models._gguf_cache_dir(src.path, torch.float32)
    assert entry is not None
    (entry / "model.safetensors").write_bytes(b"not safetensors")
    again = load(src)  # a damaged entry is de-quantised again and rewritten
    assert calls["model"] == 2 and again.model is not None
    load(src)
    assert calls["model"] == 2
    monkeypatch.setenv("MOEFY_GGUF_CACHE", "0")
    assert models.gguf_cache_root() is None
    load(src)
    assert calls["model"] == 3
