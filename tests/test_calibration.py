import json

import pytest
import torch

from conftest import needs_shared
from moefy.calibration import from_files, read_texts, sample_from_model, windows
from moefy.errors import CalibrationDataError


class _Tok:
    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 50) for c in text]}


def test_read_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"content": "two"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "x"}, "y"]))
    assert read_texts(tmp_path / "a.txt") == ["hello world"]
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]
    assert read_texts(tmp_path / "c.json") == ["x", "y"]


@pytest.mark.parametrize("name,content", [("x.parquet", "abc"), ("bad.jsonl", "{not json"), ("nofield.jsonl", '{"a": 1}')])
def test_bad_files(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(CalibrationDataError):
        read_texts(tmp_path / name)


def test_windows_start_with_bos_and_respect_budget(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 100)
    cal = from_files(_Tok(), [str(tmp_path / "a.txt")], 256, 64, batch=2)
    assert cal.ids.shape == (4, 64)
    assert (cal.ids[:, 0] == 1).all()
    with pytest.raises(CalibrationDataError):
        windows(torch.arange(10), _Tok(), 256, 64)


@needs_shared()
def test_data_free_sampling(stories_dir):
    from moefy.models import load

    loaded = load(str(stories_dir))
    cal = sample_from_model(loaded.model, loaded.tokenizer, 256, 32, seed=0, batch=4)
    again = sample_from_model(loaded.model, loaded.tokenizer, 256, 32, seed=0, batch=4)
    assert cal.ids.shape == (8, 32)
    assert torch.equal(cal.ids, again.ids)
    assert "data-free" in cal.source
