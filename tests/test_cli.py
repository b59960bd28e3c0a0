"""End to end through the CLI on the real stories260K model, and every bad input's exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE5, STORIES, TINYSTORIES, needs_shared
from moefy.cli import main
from moefy.errors import (
    CalibrationDataError,
    CorruptModelError,
    ModelNotFoundError,
    OutputExistsError,
    TooFewExpertsError,
    TooManyExpertsError,
    TopKTooLargeError,
    TopKTooSmallError,
    UnsupportedModelError,
)

pytestmark = needs_shared()
BASE = ["convert", str(STORIES), "--calib", str(TINYSTORIES), "--calib-tokens", "2048", "--seq-len", "128", "--steps", "5"]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.err


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "moe"
    main_args = BASE + ["--out", str(out)]
    try:
        main(main_args)
    except SystemExit as e:
        assert not e.code
    return out


def test_convert_writes_complete_checkpoint(converted):
    names = {p.name for p in converted.iterdir()}
    for f in ("config.json", "model.safetensors", "moefy.json", "README.md", "modeling_moefy.py",
              "configuration_moefy.py", "tokenizer.json"):
        assert f in names
    rec = json.loads((converted / "moefy.json").read_text())
    assert rec["method"] == "dot" and rec["n_experts"] == 8 and rec["top_k"] == 2
    assert rec["calibration"]["tokens"] == rec["calibration"]["sequences"] * 128
    for layer in rec["layers"]:
        assert sum(layer["expert_sizes"]) == 172  # d_ffn 172 split 22/22/22/22/21/21/21/21
        assert max(layer["expert_sizes"]) - min(layer["expert_sizes"]) <= 1
        assert sorted(layer["neurons"]) == list(range(172))
    assert not list(converted.parent.glob(".*moefy-work"))  # work dir cleaned up


def test_checkpoint_loads_after_import_and_matches_in_process(converted):
    import moefy  # noqa: F401
    from transformers import AutoModelForCausalLM

    from moefy.hf.modeling_moefy import MoefyMLP

    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert all(isinstance(layer.mlp, MoefyMLP) for layer in model.model.model.layers)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        for layer in model.model.model.layers:  # the training-time definition of the same model
            layer.mlp.forward = layer.mlp.forward_reference
        ref = model(input_ids=ids).logits
    # fp32 rounding only (different matmul shapes, order and thread count): logits are ~10
    assert torch.allclose(fast, ref, atol=1e-4)
    out = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 13)


def test_trust_remote_code_without_moefy(converted, tmp_path):
    import moefy  # noqa: F401
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(converted)(input_ids=ids).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "ref.pt")  # our own file, test-only
    code = f"""
import sys, torch
sys.modules['moefy'] = None  # moefy is not importable in this process
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / 'ref.pt')!r})
m = AutoModelForCausalLM.from_pretrained({str(converted)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    got = m(input_ids=ref['ids']).logits
assert type(m).__module__.startswith('transformers_modules'), type(m).__module__
assert torch.allclose(got, ref['expected'], atol=1e-5), float((got - ref['expected']).abs().max())
print('ok')
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_eval_writes_ppl_json(converted, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, _ = run_cli(["eval", str(converted), "--ppl", str(SAMPLE5), "--seq-len", "128", "--json", str(out)], capsys)
    assert code == 0
    res = json.loads(out.read_text())["models"][0]
    assert res["ppl"] > 1 and res["tokens"] > 0
    rec = json.loads((converted / "moefy.json").read_text())
    # top-k routing runs exactly k experts per token in every converted layer
    assert res["active_experts_per_layer"] == [float(rec["top_k"])] * len(rec["layers"])
    assert res["mean_active_experts"] == pytest.approx(rec["top_k"])


def test_k_equals_e_checkpoint_matches_dense(tmp_path, capsys):
    out = tmp_path / "full"
    code, err = run_cli(BASE + ["--out", str(out), "--top-k", "8", "--weights", "none"], capsys)
    assert code == 0, err
    import moefy  # noqa: F401
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(STORIES)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "extra,error",
    [
        (["--experts", "1"], TooFewExpertsError),
        (["--top-k", "0"], TopKTooSmallError),
        (["--experts", "4", "--top-k", "5"], TopKTooLargeError),
        (["--experts", "200", "--top-k", "2"], TooManyExpertsError),
    ],
)
def test_bad_expert_settings(extra, error, tmp_path, capsys):
    code, err = run_cli(BASE + ["--out", str(tmp_path / "x")] + extra, capsys)
    assert code == error.exit_code
    assert err.strip().startswith("error:") and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "x").exists()


def _convert_args(model: str, out: Path) -> list[str]:
    return ["convert", model, "--out", str(out), "--calib", str(TINYSTORIES), "--calib-tokens", "1024", "--seq-len", "128"]


def test_missing_model(tmp_path, capsys):
    code, err = run_cli(_convert_args(str(tmp_path / "nope"), tmp_path / "o"), capsys)
    assert code == ModelNotFoundError.exit_code and "not found" in err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    shutil.copy(STORIES / "tokenizer.json", tmp_path / "gpt2")
    code, err = run_cli(_convert_args(str(tmp_path / "gpt2"), tmp_path / "o"), capsys)
    assert code == UnsupportedModelError.exit_code and "llama" in err


def test_truncated_safetensors(tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(STORIES, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run_cli(_convert_args(str(bad), tmp_path / "o"), capsys)
    assert code == CorruptModelError.exit_code and "truncated" in err


def test_pickle_only_checkpoint_refused(tmp_path, capsys):
    bad = tmp_path / "pkl"
    bad.mkdir()
    shutil.copy(STORIES / "config.json", bad)
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    code, err = run_cli(_convert_args(str(bad), tmp_path / "o"), capsys)
    assert code == CorruptModelError.exit_code and "safetensors" in err


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("data.csv", "a,b\n1,2\n"), ("short.txt", "Once upon a time.")])
def test_bad_calibration_data(name, content, tmp_path, capsys):
    f = tmp_path / name
    f.write_text(content)
    code, err = run_cli(["convert", str(STORIES), "--out", str(tmp_path / "o"), "--calib", str(f), "--calib-tokens", "1024", "--seq-len", "128"], capsys)
    assert code == CalibrationDataError.exit_code, err
    assert not (tmp_path / "o").exists()


def test_existing_output_not_overwritten(converted, capsys):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    code, err = run_cli(BASE + ["--out", str(converted)], capsys)
    assert code == OutputExistsError.exit_code and "--overwrite" in err
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
