"""Recovery training (`moefy train`): it learns, it resumes bit-identically, DDP equals one
process, data streams and shards agree, exports match the trained model, bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SAMPLE5, STORIES, TINYSTORIES, needs_shared
from moefy.cli import main
from moefy.training.config import TrainConfig
from moefy.training.data import PackedData, iter_pieces, write_token_shards
from moefy.training.losses import distill_loss, reference_distill_loss

MOEFY = [sys.executable, "-m", "moefy.cli"]
QUIET = lambda *_: None  # noqa: E731


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def stories_moe(tmp_path_factory) -> Path:
    """A layer-wise DOT-MoE conversion of stories260K (E=4, k=1), softmax-renorm gating."""
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not present (../shared beside the project holds the test model)")
    from moefy.config import ConvertConfig
    from moefy.runner import run_convert

    out = tmp_path_factory.mktemp("train") / "lw"
    cfg = ConvertConfig(n_experts=4, top_k=1, calib_tokens=2048, seq_len=64, steps=3, eval_every=1, gating="softmax-renorm")
    run_convert(str(STORIES), out, cfg, [str(TINYSTORIES)], log=QUIET)
    return out


def small_cfg(**kw) -> TrainConfig:
    base = dict(tokens=64 * 4 * 8, seq_len=64, batch_size=4, eval_every=4, val_sequences=4, checkpoint_every=2,
                warmup_steps=2, lrs={"experts": 1e-3, "routers": 1e-3, "attention": 1e-3, "norms": 1e-3, "lm_head": 1e-3})
    base.update(kw)
    return TrainConfig.from_dict(base)


# ----------------------------------------------------------------------------- loss
def test_chunked_loss_equals_full_logits_autograd():
    torch.manual_seed(0)
    h, w, b = torch.randn(29, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True), torch.randn(40, requires_grad=True)
    th, tw = torch.randn(29, 8), torch.randn(40, 8)
    labels = torch.randint(0, 40, (29,))
    labels[[3, 28]] = -100
    for cap in (None, 5.0):
        fused, stats = distill_loss(h, w, b, th, tw, None, labels, 1.5, 0.5, cap, None, chunk=7)
        ref = reference_distill_loss(h, w, b, th, tw, None, labels, 1.5, 0.5, cap, None)
        assert torch.allclose(fused, ref, atol=1e-5)
        for g1, g2 in zip(torch.autograd.grad(fused, [h, w, b]), torch.autograd.grad(ref, [h, w, b])):
            assert torch.allclose(g1, g2, atol=1e-6)
        assert stats["kl"] >= 0 and stats["ce"] > 0


# ----------------------------------------------------------------------------- data
class _Tok:
    """A character-level tokenizer (ids 3..258), EOS 2, BOS 1."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + (ord(c) % 256) for c in text]}

    def __len__(self) -> int:
        return 259

    def get_vocab(self) -> dict:
        return {chr(i): i + 3 for i in range(256)}


def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    import random

    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))  # noqa: E731
    (d / "a.txt").write_text("".join(" ".join(word() for _ in range(8)) + "\n" for _ in range(400)))
    with open(d / "b.jsonl", "w") as fh:
        for _ in range(60):
            fh.write(json.dumps({"text": " ".join(word() for _ in range(20))}) + "\n")
    return d


def test_streaming_reads_in_pieces_and_shards_give_the_same_batches(tmp_path):
    d = _corpus(tmp_path)
    size = (d / "a.txt").stat().st_size
    pieces = list(iter_pieces([d / "a.txt"], chunk_bytes=1024))
    assert len(pieces) > size // 2048 and all(len(p.text) <= 1024 + 64 for p in pieces)  # never the whole file
    assert "".join(p.text for p in pieces) == (d / "a.txt").read_text() and pieces[-1].end and not pieces[0].end
    tok = _Tok()
    live = PackedData(tok, [str(d)], seq_len=32, seed=3, val_sequences=5, shuffle_window=16, chunk_bytes=1024)
    shards = write_token_shards(tok, [str(d)], tmp_path / "shards", shard_tokens=1000, chunk_bytes=1024)
    assert len(shards["shards"]) > 1
    mapped = PackedData(tok, [str(tmp_path / "shards")], seq_len=32, seed=3, val_sequences=5, shuffle_window=16)
    assert torch.equal(live.val_rows(), mapped.val_rows())
    n = mapped.n_train_sequences
    assert n is not None and n > 40
    for step in (0, 1, 7, (2 * n) // 8 + 3):  # across an epoch boundary too
        for micro in range(2):
            for rank in range(2):
                a = live.batch(step, micro, 2, 2, rank, 2)
                assert torch.equal(a, mapped.batch(step, micro, 2, 2, rank, 2))
                assert (a[:, 0] == 1).all() and a.shape == (2, 32)
    # held-out sequences never appear in training
    val = {tuple(r.tolist()) for r in mapped.val_rows()}
    assert not val & {tuple(r.tolist()) for r in mapped.rows(0, n)}
    # the training order is a permutation of the sequences (one epoch)
    assert len({tuple(r.tolist()) for r in mapped.rows(0, n)}) == len({tuple(r.tolist()) for r in mapped.rows(n, n)})


def test_datasets_formats_glob_and_directory(tmp_path):
    import datasets

    d = _corpus(tmp_path)
    rows = [{"text": f"parquet row {i} " * 4} for i in range(30)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tok = _Tok()
    a = PackedData(tok, [str(tmp_path / "p.parquet")], seq_len=16)
    b = PackedData(tok, [str(tmp_path / "saved")], seq_len=16)
    assert torch.equal(a.rows(0, 5), b.rows(0, 5))
    g = PackedData(tok, [str(d / "*.jsonl")], seq_len=16)
    assert g.sources == [str(d / "b.jsonl")]


@pytest.mark.parametrize("bad, message", [
    ("missing.txt", "not found"), ("empty.txt", "fewer tokens than one sequence"), ("*.nothing", "no files match"),
])
def test_bad_data_is_one_line(tmp_path, bad, message):
    from moefy.errors import CalibrationDataError

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CalibrationDataError, match=message):
        PackedData(_Tok(), [str(tmp_path / bad)], seq_len=16)


# ----------------------------------------------------------------------------- training
@needs_shared()
def test_training_lowers_held_out_kl_and_export_matches(stories_moe, tmp_path):
    import moefy  # noqa: F401
    from transformers import AutoModelForCausalLM

    from moefy.training.run import run_train

    out = tmp_path / "trained"
    res = run_train(stories_moe, out, small_cfg(tokens=64 * 4 * 12, keep_best=False), [str(TINYSTORIES)],
                    teacher=str(STORIES), log=QUIET)
    hist = res.record["training"][-1]["history"]
    assert hist[0]["step"] == 0 and hist[-1]["val_kl"] < hist[0]["val_kl"]
    assert (out / "metrics.jsonl").is_file() and (out / "recovery.png").is_file()
    rec = json.loads((out / "moefy.json").read_text())
    assert rec["training"][-1]["tokens"] == 64 * 4 * 12 and "Recovery training" in (out / "README.md").read_text()
    # the exported checkpoint computes what was scored in process
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    # the in-process student is the model the trainer held: rebuild it from the checkpoint and score
    from moefy.training.student import build_student

    student = build_student(AutoModelForCausalLM.from_pretrained(out).eval(), learn_assignment=False)
    with torch.no_grad():
        ref = student.model.eval()(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    # and the stock export it allowed before still works
    from moefy.serving_export import export_checkpoint
    from transformers import MixtralForCausalLM

    mix = MixtralForCausalLM.from_pretrained(export_checkpoint(out, "mixtral", tmp_path / "mixtral")).eval()
    with torch.no_grad():
        assert (mix(input_ids=ids).logits - got).abs().max() <= 1e-4 * max(1.0, float(got.abs().max()))


@needs_shared()
def test_learned_assignment_moves_neurons_and_export_is_exact(stories_moe, tmp_path):
    """With the assignment learning (a high affinity rate), neurons change expert; the export
    permutes them so the checkpoint computes what the trained layer computed, and the record's
    dense neuron indices stay a permutation of the FFN."""
    import moefy  # noqa: F401
    from transformers import AutoModelForCausalLM

    from moefy.training.run import run_train

    cfg = small_cfg(learn_assignment=True, lrs={"assignment": 2.0, "routers": 1e-3}, anneal_fraction=1.0, tau_end=0.5,
                    keep_best=False)
    res = run_train(stories_moe, tmp_path / "t", cfg, [str(TINYSTORIES)], teacher=str(STORIES), log=QUIET)
    moved = res.record["training"][-1]["neurons_moved"]
    assert sum(moved.values()) > 0
    for layer in res.record["layers"]:
        assert sorted(layer["neurons"]) == list(range(172))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t").eval()
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        for layer in model.model.model.layers:
            layer.mlp.forward = layer.mlp.forward_reference
        assert torch.allclose(fast, model(input_ids=ids).logits, atol=1e-4)


def _train_cmd(ckpt: Path, out: Path, extra: list[str]) -> list[str]:
    return [*MOEFY, "train", str(ckpt), "--out", str(out), "--teacher", str(STORIES), "--data", str(TINYSTORIES),
            "--tokens", str(64 * 4 * 4), "--seq-len", "64", "--batch-size", "4", "--eval-every", "2",
            "--val-sequences", "4", "--checkpoint-every", "2", "--warmup-steps", "2", *extra]


def _env(**kw: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(kw)
    return env


@needs_shared()
def test_kill_9_then_resume_is_bit_identical(stories_moe, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(stories_moe, ref, []), check=True, env=_env(), capture_output=True)
    out = tmp_path / "out"
    p = subprocess.run(_train_cmd(stories_moe, out, []), env=_env(MOEFY_TEST_KILL_AFTER_STEP="2"), capture_output=True)
    assert p.returncode == -signal.SIGKILL and not out.exists()
    p = subprocess.run(_train_cmd(stories_moe, out, []), env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "resuming training at step 2" in p.stderr
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = json.loads((ref / "moefy.json").read_text()), json.loads((out / "moefy.json").read_text())
    assert ra["training"][-1]["history"] == rb["training"][-1]["history"]


@needs_shared()
def test_two_process_ddp_equals_one_process(stories_moe, tmp_path):
    """gloo DDP with 2 x 2 sequences per step equals one process with 4 (the balance loss is
    computed per process, as in every DDP MoE trainer, so it is off here)."""
    common = ["--balance-weight", "0"]
    one = tmp_path / "one"
    p = subprocess.run(_train_cmd(stories_moe, one, common), env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    two = tmp_path / "two"
    cmd = _train_cmd(stories_moe, two, [*common, "--num-processes", "2"])
    cmd[cmd.index("--batch-size") + 1] = "2"
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    assert json.loads((two / "moefy.json").read_text())["training"][-1]["processes"] == 2


@needs_shared()
def test_bad_input_is_one_line_and_no_output(stories_moe, tmp_path, capsys):
    base = ["train", str(stories_moe), "--out", str(tmp_path / "o"), "--seq-len", "64", "--batch-size", "4"]
    (tmp_path / "empty.txt").write_text("")
    other = tmp_path / "other_teacher"
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(STORIES).save_pretrained(other)
    cases = [
        (["--data", str(tmp_path / "nope.txt"), "--teacher", str(STORIES)], "not found"),
        (["--data", str(tmp_path / "empty.txt"), "--teacher", str(STORIES)], "fewer tokens than one sequence"),
        (["--data", str(TINYSTORIES), "--teacher", str(other)], "does not match"),
        (["--data", str(TINYSTORIES), "--teacher", str(STORIES), "--tokens", "100"], "fewer than one batch"),
        (["--data", str(TINYSTORIES), "--teacher", str(STORIES), "--freeze", "experts", "--freeze", "routers",
          "--freeze", "attention", "--freeze", "norms", "--freeze", "lm_head", "--freeze", "other", "--freeze", "assignment"],
         "nothing to train"),
        (["--data", str(SAMPLE5), "--teacher", str(STORIES), "--lr-group", "bogus=1"], "unknown parameter group"),
    ]
    for extra, msg in cases:
        code, err = run_cli(base + extra, capsys)
        assert code != 0 and msg in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
        assert not (tmp_path / "o").exists()
    code, err = run_cli(["train", str(tmp_path), "--out", str(tmp_path / "o"), "--data", str(TINYSTORIES)], capsys)
    assert code != 0 and "not a moefy checkpoint" in err


@needs_shared()
def test_recipe_file_equals_flags(stories_moe, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"teacher: {STORIES}\ndata: [{TINYSTORIES}]\n"
        "train:\n  tokens: 768\n  seq_len: 64\n  batch_size: 4\n  val_sequences: 2\n  eval_every: 3\n"
        "  lrs: {experts: 0.001, attention: 0}\n"
    )
    code, err = run_cli(["train", str(stories_moe), "--out", str(tmp_path / "a"), "--recipe", str(recipe)], capsys)
    assert code == 0, err
    code, err = run_cli(["train", str(stories_moe), "--out", str(tmp_path / "b"), "--teacher", str(STORIES),
                         "--data", str(TINYSTORIES), "--tokens", "768", "--seq-len", "64", "--batch-size", "4",
                         "--val-sequences", "2", "--eval-every", "3", "--lr-group", "experts=0.001", "--freeze", "attention"],
                        capsys)
    assert code == 0, err
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sample_config_files_parse():
    import yaml

    for f in (ROOT / "recipes").glob("*.yaml"):
        data = yaml.safe_load(f.read_text())
        if "train" in data:
            TrainConfig.from_dict(data["train"]).validate()


@needs_shared()
def test_data_free_training_samples_from_the_teacher(stories_moe, tmp_path):
    from moefy.training.run import run_train

    logs: list[str] = []
    res = run_train(stories_moe, tmp_path / "df", small_cfg(tokens=64 * 4 * 2, eval_every=2, val_sequences=2), None,
                    teacher=str(STORIES), log=logs.append)
    entry = res.record["training"][-1]
    assert entry["data"].startswith("data-free") and any("sampled from the teacher" in m for m in logs)
    assert entry["tokens"] == 64 * 4 * 2


@needs_shared()
def test_val_data_is_the_held_out_text_and_training_uses_all_of_data(stories_moe, tmp_path, monkeypatch):
    """``--val-data``: held-out evaluation scores that file's first sequences; the training
    stream then holds nothing out of ``--data``."""
    from moefy.training.run import run_train

    seen: dict[str, torch.Tensor] = {}
    real = PackedData.val_rows

    def spy(self):  # records which stream the held-out rows come from
        rows = real(self)
        seen[",".join(self.sources)] = rows
        return rows

    monkeypatch.setattr(PackedData, "val_rows", spy)
    run_train(stories_moe, tmp_path / "v", small_cfg(tokens=64 * 4 * 2, eval_every=2, val_sequences=2),
              [str(TINYSTORIES)], teacher=str(STORIES), val_data=[str(SAMPLE5)], log=QUIET)
    assert list(seen) == [str(SAMPLE5)] and seen[str(SAMPLE5)].shape == (2, 64)


def test_held_out_text_skips_the_calibration_tokens(stories_moe, tmp_path):
    """Training on the checkpoint's own calibration file: the held-out sequences (and the
    training stream) start past the tokens the layer-wise stage fitted, and the record says so."""
    from transformers import AutoTokenizer

    from moefy.calibration import from_files
    from moefy.training.run import calibration_skip, run_train

    record = json.loads((stories_moe / "moefy.json").read_text())
    skip, note = calibration_skip(record, [TINYSTORIES])
    cal = record["calibration"]
    assert skip >= cal["sequences"] * cal["seq_len"] and "calibration text" in note
    assert calibration_skip(record, [SAMPLE5]) == (0, "")
    tok = AutoTokenizer.from_pretrained(stories_moe)
    calib = from_files(tok, [str(TINYSTORIES)], cal["tokens"], cal["seq_len"]).ids
    text = "," + ",".join(map(str, calib[:, 1:].reshape(-1).tolist())) + ","  # the fitted tokens, BOS dropped

    def overlaps(rows: torch.Tensor) -> bool:  # any held-out row's first 16 tokens among them
        return any("," + ",".join(map(str, r[1:17].tolist())) + "," in text for r in rows)

    plain = PackedData(tok, [str(TINYSTORIES)], 64, val_sequences=4)
    assert overlaps(plain.val_rows())  # without the skip the held-out set is calibration text
    skipped = PackedData(tok, [str(TINYSTORIES)], 64, val_sequences=4, skip_tokens=skip)
    assert not overlaps(skipped.val_rows())
    res = run_train(stories_moe, tmp_path / "t", small_cfg(tokens=64 * 4 * 2, eval_every=2, val_sequences=2),
                    [str(TINYSTORIES)], teacher=str(STORIES), log=QUIET)
    entry = res.record["training"][-1]
    assert f"after the first {skip} tokens" in entry["data"]


@needs_shared()
def test_convert_stage_both_skips_the_calibration_tokens(tmp_path):
    """``moefy convert --stage both`` applies the same rule as ``moefy train``: its end-to-end
    stream skips the calibration tokens, also when --train-data names the calibration file."""
    from moefy.config import ConvertConfig
    from moefy.runner import run_convert
    from moefy.training.run import calibration_skip

    cfg = ConvertConfig(n_experts=4, top_k=2, calib_tokens=1024, seq_len=64, steps=2, stage="both",
                        e2e_steps=2, e2e_batch=2, e2e_eval_every=1, e2e_val_sequences=2, seed=1)
    for name, train in (("calib", None), ("train", [str(TINYSTORIES)]), ("other", [str(SAMPLE5)])):
        lines: list[str] = []
        run_convert(str(STORIES), tmp_path / name, cfg, [str(TINYSTORIES)], log=lambda m: lines.append(str(m)),
                    train_files=train)
        record = json.loads((tmp_path / name / "moefy.json").read_text())
        skip, _ = calibration_skip(record, train or [TINYSTORIES])
        said = [m for m in lines if m.startswith("end-to-end: training on")]
        assert len(said) == 1
        if name == "other":
            assert skip == 0 and "after the first" not in said[0]
        else:
            assert skip > 0 and f"after the first {skip} tokens (the calibration text)" in said[0]
