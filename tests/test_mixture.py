"""Weighted data mixtures (moefy.mixture) for calibration and recovery training: parsing, exact
shares, the same batches after a resume and at any process count, records, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE5, STORIES, TINYSTORIES, needs_shared
from moefy.errors import CalibrationDataError, ConfigError
from moefy.mixture import Schedule, is_mixture, parse_spec, parse_specs, schedule, shares, weights

QUIET = lambda *_: None  # noqa: E731


# ----------------------------------------------------------------------------- parsing
def test_source_specs_parse_weights_and_the_teacher(tmp_path):
    assert parse_spec("a.txt@0.5").spec == "a.txt" and parse_spec("a.txt@0.5").weight == 0.5
    assert parse_spec("teacher@2").is_teacher and parse_spec("teacher").weight is None
    assert parse_spec({"path": "b.jsonl", "weight": 3}).weight == 3.0
    assert parse_spec({"teacher": True, "weight": 0.2}).is_teacher
    odd = tmp_path / "x@y.txt"
    odd.write_text("text")
    assert parse_spec(str(odd)).spec == str(odd)  # a path that exists is a path, '@' and all
    assert not is_mixture(parse_specs(["a.txt", "b.txt"]))
    assert is_mixture(parse_specs(["a.txt", "b.txt@1"])) and is_mixture(parse_specs(["a.txt", "teacher"]))
    assert str(parse_spec("a.txt@0.25")) == "a.txt@0.25"


@pytest.mark.parametrize("bad", ["a.txt@abc", "a.txt@0", "a.txt@-1", "a.txt@nan", "a.txt@inf", "@0.5"])
def test_bad_weights_are_one_line(bad):
    with pytest.raises(ConfigError) as exc:
        parse_spec(bad)
    assert "\n" not in str(exc.value)


def test_bad_recipe_mapping_is_one_line():
    with pytest.raises(ConfigError):
        parse_spec({"path": "a", "teacher": True})
    with pytest.raises(ConfigError):
        parse_spec({"file": "a"})


# ----------------------------------------------------------------------------- shares
@pytest.mark.parametrize("raw", [[0.5, 0.3, 0.2], [1, 1], [7, 1, 1, 1], [0.01, 0.99]])
def test_schedule_honours_the_weights_at_every_prefix(raw):
    ws = [w / sum(raw) for w in raw]
    order = schedule(ws, 2000)
    counts = [0] * len(ws)
    for n, s in enumerate(order, 1):
        counts[s] += 1
        assert all(abs(c - n * w) <= 1 for c, w in zip(counts, ws))
    sch = Schedule(ws)
    assert [sch.at(n)[0] for n in range(2000)] == order  # the incremental form agrees
    assert sum(shares(ws, 37)) == 37 and min(shares(ws, 37, at_least_one=True)) >= 1
    assert weights(parse_specs(["a@3", "b"])) == [0.75, 0.25]


# ----------------------------------------------------------------------------- training stream
@pytest.fixture(scope="module")
def tok():
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def _mixed(tok, a: Path, b: Path, seed: int = 0):
    from moefy.training.data import MixedData, PackedData

    parts = [PackedData(tok, [str(a)], 32, seed=seed, val_sequences=2, shuffle_window=8),
             PackedData(tok, [str(b)], 32, seed=seed, val_sequences=1, shuffle_window=8)]
    return MixedData(parts, ["a", "b"], [0.75, 0.25])


@needs_shared(TINYSTORIES)
def test_mixed_batches_are_a_function_of_the_step(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    text = TINYSTORIES.read_text()[:60000]
    a.write_text(text[:40000])
    b.write_text(text[40000:])
    one = _mixed(tok, a, b)
    seq = [one.batch(s, 0, 1, 1, 0, 4) for s in range(12)]
    # a fresh stream started at step 7 (a resume) gives the same batches
    resumed = _mixed(tok, a, b)
    assert all(torch.equal(resumed.batch(s, 0, 1, 1, 0, 4), seq[s]) for s in range(7, 12))
    # two processes of batch 2 see the same global batches as one process of batch 4
    two = [_mixed(tok, a, b), _mixed(tok, a, b)]
    for s in range(6):
        assert torch.equal(torch.cat([two[r].batch(s, 0, 1, 2, r, 2) for r in range(2)]), seq[s])
    # the shares: 3 of every 4 sequences from a, and the held-out sets are per source
    rows = torch.cat(seq)
    b_rows = {tuple(r.tolist()) for r in _mixed(tok, a, b).parts[1].rows(0, 12)}
    from_b = sum(tuple(r.tolist()) in b_rows for r in rows)
    assert from_b == 12  # 48 sequences, a quarter from b: b's first 12
    assert [n for n, _ in one.val_groups()] == ["a", "b"] and one.val_rows().shape[0] == 3
    assert one.share_report(48) == {"a": 36, "b": 12}
    held = {tuple(r.tolist()) for _, g in one.val_groups() for r in g}
    assert not held & {tuple(r.tolist()) for r in rows}  # never trained on


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def stories_moe(tmp_path_factory) -> Path:
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not present")
    from moefy.config import ConvertConfig
    from moefy.runner import run_convert

    out = tmp_path_factory.mktemp("mix") / "lw"
    cfg = ConvertConfig(n_experts=4, top_k=1, calib_tokens=2048, seq_len=64, steps=3, eval_every=1)
    run_convert(str(STORIES), out, cfg, [f"{TINYSTORIES}@0.75", f"{SAMPLE5}@0.25"], log=QUIET)
    return out


@needs_shared(SAMPLE5)
def test_calibration_mixture_is_recorded_and_skipped_by_training(stories_moe, tmp_path):
    rec = json.loads((stories_moe / "moefy.json").read_text())
    cal = rec["calibration"]
    assert cal["source"].startswith("mixture: ")
    assert [s["sequences"] for s in cal["sources"]] == [24, 8] and cal["sequences"] == 32
    assert cal["sources"][0]["files"] == [str(TINYSTORIES.resolve())]
    from moefy.training.run import calibration_skip

    skip, _ = calibration_skip(rec, [TINYSTORIES])
    assert skip == 24 * 64 + 64  # that source's fitted tokens and one sequence of margin
    assert calibration_skip(rec, [SAMPLE5])[0] == 8 * 64 + 64


@needs_shared(SAMPLE5)
def test_train_on_a_mixture_with_the_teacher(stories_moe, tmp_path):
    from moefy.training.config import TrainConfig
    from moefy.training.run import run_train

    cfg = TrainConfig.from_dict(dict(tokens=64 * 4 * 4, seq_len=64, batch_size=4, eval_every=2, val_sequences=3,
                                     warmup_steps=1, checkpoint_every=2))
    res = run_train(stories_moe, tmp_path / "out", cfg, [f"{TINYSTORIES}@0.5", "teacher@0.5"], teacher=str(STORIES), log=QUIET)
    entry = res.record["training"][-1]
    mix = {m["name"]: m for m in entry["mixture"]}
    assert mix["teacher"]["train_sequences"] == 8 and mix["validation_head"]["train_sequences"] == 8
    assert sum(m["held_out_sequences"] for m in mix.values()) == 3
    ev = entry["history"][-1]
    assert {"val_ppl/validation_head", "val_ppl/teacher", "val_loss"} <= set(ev)
    assert entry["data"].startswith("mixture: ") and "teacher@0.5" in entry["data"]
    assert entry["config"]["select_by"] == "loss"


@needs_shared(SAMPLE5)
def test_mixture_bad_input_is_one_line_and_writes_nothing(stories_moe, tmp_path, capsys):
    from moefy.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for data, code in ([f"{empty}@0.5", f"{SAMPLE5}@0.5"], 6), ([f"{SAMPLE5}@zero"], 11), (["teacher@1", "teacher@2"], 6):
        args = ["train", str(stories_moe), "--out", str(tmp_path / "o"), "--teacher", str(STORIES), "--tokens", "512",
                "--seq-len", "64"]
        for d in data:
            args += ["--data", d]
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        assert exc.value.code != 0 and "Traceback" not in err and err.strip().count("\n") <= 1, err
        assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["convert", str(STORIES), "--out", str(tmp_path / "c"), "--calib", f"{SAMPLE5}@-2"])
    assert "not a positive number" in capsys.readouterr().err and not (tmp_path / "c").exists()
