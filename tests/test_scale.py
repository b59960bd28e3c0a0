"""Converting models that do not fit (issue 16): --dtype, layer-by-layer onloading from the
safetensors files, activations spilled to disk, --device, sharded output, memory budgets."""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moefy  # noqa: F401
from conftest import ROOT, STORIES, TINYSTORIES, needs_shared
from moefy.adapters import get_adapter
from moefy.config import ConvertConfig, resolve_device
from moefy.convert import layerwise_stage
from moefy.errors import ConfigError, DiskFullError, MemoryBudgetError
from moefy.export import save_checkpoint, to_moefy_model
from moefy.memory import parse_size
from moefy.onload import OnloadHost, SafetensorsCheckpoint, build_skeleton
from moefy.runner import run_convert, work_dir_for
from moefy.testing_hooks import clean_env, pause_env, wait_until_paused
from tiny_models import FAMILIES, tiny_model
from tiny_moefy import calib_ids

QUIET = lambda *_: None  # noqa: E731


def weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, one file or shards."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                assert k not in tensors, k
                tensors[k] = fh.get_tensor(k)
    return tensors


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------- layer-wise stage, every family
def _converted_layers(model: torch.nn.Module, cfg: ConvertConfig, **kw) -> dict[int, dict[str, torch.Tensor]]:
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def done(i, _rep, layer):
        seen[i] = {k: v.detach().clone() for k, v in layer.state_dict().items()}

    layerwise_stage(model, calib_ids(), cfg, batch=4, on_layer_done=done, **kw)
    return seen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onloaded_stage_equals_in_memory_stage_bit_for_bit(family, tmp_path):
    """Every supported family, in bf16: the layer-wise stage over a meta skeleton whose layers are read
    from the safetensors file one at a time, with activations in memory or spilled to disk, converts
    every layer to exactly the weights of the stage over the whole model in memory."""
    tiny_model(family).save_pretrained(tmp_path / "dense")
    cfg = ConvertConfig(n_experts=4, top_k=2, calib_tokens=256, seq_len=32, steps=2, weights="ridge", eval_every=1)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    ref = _converted_layers(whole, cfg)
    for spill in (None, tmp_path / "acts.bin"):
        skeleton = build_skeleton(whole.config.__class__.from_pretrained(tmp_path / "dense"), torch.bfloat16)
        layers = get_adapter(skeleton.config).layers(skeleton)
        host = OnloadHost(skeleton, layers, SafetensorsCheckpoint(tmp_path / "dense"), torch.device("cpu"))
        got = _converted_layers(skeleton, cfg, host=host, device="cpu", spill_path=spill)
        assert got.keys() == ref.keys() == {0, 1}
        for i in ref:
            assert ref[i].keys() == got[i].keys()
            for k in ref[i]:
                assert ref[i][k].dtype == torch.bfloat16 or not ref[i][k].is_floating_point()
                assert torch.equal(ref[i][k], got[i][k]), (family, spill, i, k)
        assert all(p.device.type == "meta" for p in layers.parameters())  # every layer freed after its turn
        assert spill is None or not spill.exists()


def test_bf16_exported_logits_equal_in_process_model(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()  # buffers stay fp32
    cfg = ConvertConfig(n_experts=4, top_k=2, calib_tokens=256, seq_len=32, steps=2, eval_every=1)
    layerwise_stage(dense, calib_ids(), cfg, batch=4)
    moe = to_moefy_model(dense)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    ids = calib_ids(n=2, seed=5)
    with torch.no_grad():
        ref = moe(input_ids=ids).logits
    save_checkpoint(moe, None, tmp_path / "ckpt", {"method": "dot"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        again = loaded(input_ids=ids).logits
    assert torch.equal(again, ref)


# ------------------------------------------------------------- whole conversions (stories260K)
def stories_layer_bytes(tokens: int, dtype: torch.dtype) -> int:
    """What the runner estimates one stories260K layer needs (layer by layer) over ``tokens``."""
    from transformers import AutoConfig

    from moefy.memory import fit_bytes, layer_shape

    skeleton = build_skeleton(AutoConfig.from_pretrained(STORIES), dtype)
    layers = skeleton.model.layers
    return fit_bytes(layer_shape(skeleton, layers, skeleton.config.intermediate_size, dtype.itemsize, whole=False), tokens)


def _cfg(**kw) -> ConvertConfig:
    return ConvertConfig(**{"n_experts": 4, "top_k": 2, "calib_tokens": 1024, "seq_len": 64, "steps": 4, "eval_every": 2, **kw})


@needs_shared()
def test_onloaded_spilled_and_in_memory_conversions_are_identical(tmp_path):
    """``moefy convert`` in bf16: layer by layer (activations in memory, and spilled to disk by a
    --max-memory just above one layer) and with the whole model loaded give the same checkpoint, in
    bf16, with the same config; the onloaded one reloads with logits equal to the in-memory one."""
    calib = [str(TINYSTORIES)]
    whole = run_convert(str(STORIES), tmp_path / "whole", _cfg(dtype="bf16"), calib, log=QUIET, onload=False)
    assert whole.record["loading"]["layer_by_layer"] is False
    onl = run_convert(str(STORIES), tmp_path / "onload", _cfg(dtype="bf16"), calib, log=QUIET, device="cpu")
    assert onl.record["loading"] == {**onl.record["loading"], "layer_by_layer": True, "activations": "memory", "device": "cpu"}
    budget = onl.record["loading"]["estimated_layer_bytes"] + 1000  # one layer fits; the activations do not
    logs: list[str] = []
    spilled = run_convert(str(STORIES), tmp_path / "spill", _cfg(dtype="bf16"), calib, log=logs.append, max_memory=budget)
    assert spilled.record["loading"]["activations"] == "disk"
    assert any("spilled to disk" in line for line in logs)
    for other in ("onload", "spill"):
        assert_same_weights(tmp_path / "whole", tmp_path / other)
        assert json.loads((tmp_path / other / "config.json").read_text()) == json.loads((tmp_path / "whole" / "config.json").read_text())
        assert json.loads((tmp_path / other / "moefy.json").read_text())["layers"] == whole.record["layers"]
    assert {v.dtype for v in weights(tmp_path / "onload").values()} == {torch.bfloat16}
    ids = torch.tensor([[1, 400, 401, 402, 30, 31]])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "onload").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").eval()
    assert a.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@needs_shared()
def test_sharded_output_reloads(tmp_path):
    """Shards of at most 200 KB: a model.safetensors.index.json as transformers writes it, from the
    layer-by-layer writer and from save_pretrained alike, and both reload with AutoModelForCausalLM."""
    calib = [str(TINYSTORIES)]
    run_convert(str(STORIES), tmp_path / "single", _cfg(), calib, log=QUIET)
    for name, onload in (("onload", True), ("whole", False)):
        out = tmp_path / name
        run_convert(str(STORIES), out, _cfg(), calib, log=QUIET, onload=onload, max_shard_size="200KB")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        assert len(shards) > 2 and not (out / "model.safetensors").exists()
        assert shards == sorted(set(index["weight_map"].values()))
        assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
        assert set(index["metadata"]) == {"total_parameters", "total_size"}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights(out).values())
        assert_same_weights(tmp_path / "single", out)
        ids = torch.tensor([[1, 400, 401, 402]])
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "single").eval()
        got = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            # the weights are bit-identical (above); tensors read from other files can take other
            # BLAS paths (alignment, tied vs separate lm_head), so an ulp apart at 1 thread
            torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    # without moefy installed: the checkpoint's own code
    code = ("import sys, torch; sys.modules['moefy'] = None; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'onload')!r}, trust_remote_code=True); "
            "print(type(m).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0 and "MoefyForCausalLM" in res.stdout, res.stderr[-2000:]


@needs_shared()
def test_some_layers_onloaded_equals_whole(tmp_path):
    """--layers 1,3 layer by layer: the dense layers (below, between and above) are copied from the
    checkpoint into the shards in the conversion dtype, exactly as the whole-model path saves them."""
    calib = [str(TINYSTORIES)]
    cfg = _cfg(layers=[1, 3], dtype="bf16", steps=2)
    run_convert(str(STORIES), tmp_path / "a", cfg, calib, log=QUIET, onload=True, max_shard_size="150KB")
    run_convert(str(STORIES), tmp_path / "b", cfg, calib, log=QUIET, onload=False)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    ca, cb = (json.loads((tmp_path / n / "config.json").read_text()) for n in "ab")
    assert ca == cb and [e is not None for e in ca["moe_layers"]] == [False, True, False, True, False]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moefy.cli", "convert", str(STORIES), "--out", str(out), "--calib", str(TINYSTORIES),
            "--calib-tokens", "2048", "--seq-len", "64", "--steps", "6", "--seed", "2", "--dtype", "bf16", *extra]


@needs_shared()
def test_killed_onloaded_spilled_conversion_resumes_identical(tmp_path):
    """SIGKILL once layer 2 is saved (layer by layer, activations on disk), then the same command:
    it resumes from the 3 finished layers and ends with the weights of an uninterrupted conversion
    with the whole model in memory."""
    env = clean_env(dict(os.environ, OMP_NUM_THREADS="1"))
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, "--no-onload"), check=True, env=env, capture_output=True)
    out, work = tmp_path / "out", tmp_path / ".out.moefy-work"
    spill = ["--max-memory", str(stories_layer_bytes(2048, torch.bfloat16) + 1000)]  # one layer fits, with the activations not
    paused = tmp_path / "paused"
    proc = subprocess.Popen(_cmd(out, *spill), env=pause_env(2, paused, env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until_paused(proc, paused, timeout=300)
        assert (work / "activations.bin").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert sorted(p.name for p in work.glob("layer_*.json")) == [f"layer_{i:04d}.json" for i in range(3)]
    res = subprocess.run(_cmd(out, *spill), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    log = " ".join(res.stderr.split())
    assert "resuming: 3 layer(s) already converted" in log and "spilled to disk" in log, log[-2000:]
    assert_same_weights(ref, out)
    assert not work.exists()


# ------------------------------------------------------------- bad input: one line, no output
def _cli(args: list[str], capsys) -> tuple[int, str]:
    from moefy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code), capsys.readouterr().err


def _one_error_line(err: str) -> str:
    """The one error message (rich may wrap it over lines)."""
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return " ".join(err[err.index("error:"):].split())


@needs_shared()
def test_max_memory_too_small_for_one_layer(tmp_path, capsys):
    out = tmp_path / "o"
    code, err = _cli(["convert", str(STORIES), "--out", str(out), "--calib", str(TINYSTORIES), "--calib-tokens", "1024",
                      "--seq-len", "64", "--max-memory", "1MiB"], capsys)
    assert code == MemoryBudgetError.exit_code
    line = _one_error_line(err)
    assert "too small for one layer" in line and "needs about" in line
    assert not out.exists() and not work_dir_for(out).exists()


@needs_shared()
def test_disk_full_while_spilling(tmp_path, capsys, monkeypatch):
    import moefy.activations as acts

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(acts, "_write", full)
    out = tmp_path / "o"
    code, err = _cli(["convert", str(STORIES), "--out", str(out), "--calib", str(TINYSTORIES), "--calib-tokens", "1024",
                      "--seq-len", "64", "--steps", "2", "--max-memory", str(stories_layer_bytes(1024, torch.float32) + 1000)], capsys)
    assert code == DiskFullError.exit_code
    assert "disk full while spilling" in _one_error_line(err)
    assert not out.exists() and not (work_dir_for(out) / "activations.bin").exists()


def test_onload_refused_when_it_cannot_be_done(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="data-free calibration"):
        run_convert(str(tmp_path / "dense"), tmp_path / "o", _cfg(), [], log=QUIET, onload=True)
    with pytest.raises(ConfigError, match="trains the whole model in fp32"):
        run_convert(str(tmp_path / "dense"), tmp_path / "o", _cfg(stage="both", dtype="bf16"), [], log=QUIET)
    assert not (tmp_path / "o").exists()


@needs_shared()
def test_whole_model_stages_say_what_they_need(tmp_path, capsys, monkeypatch):
    """On a machine too small for the whole model, eval, the end-to-end stage and moefy train refuse
    in one line saying how much they need; the layer-by-layer conversion still runs."""
    import moefy.memory
    from moefy.errors import OutOfMemoryError

    monkeypatch.setattr(moefy.memory, "total_memory", lambda: 200_000)  # 0.2 MB: less than stories260K's 1 MB
    code, err = _cli(["eval", str(STORIES), "--ppl", str(TINYSTORIES), "--max-windows", "1"], capsys)
    assert code == OutOfMemoryError.exit_code and "needs the whole model in memory" in _one_error_line(err)
    code, err = _cli(["convert", str(STORIES), "--out", str(tmp_path / "o"), "--calib", str(TINYSTORIES), "--stage", "both",
                      "--calib-tokens", "1024", "--seq-len", "64"], capsys)
    assert code == OutOfMemoryError.exit_code and "whole model loaded" in _one_error_line(err)
    assert not (tmp_path / "o").exists()
    run_convert(str(STORIES), tmp_path / "lw", _cfg(steps=1), [str(TINYSTORIES)], log=QUIET)  # layer by layer: fine
    code, err = _cli(["train", str(tmp_path / "lw"), "--out", str(tmp_path / "t"), "--data", str(TINYSTORIES)], capsys)
    assert code == OutOfMemoryError.exit_code and "moefy train" in _one_error_line(err)


# ------------------------------------------------------------- devices, sizes, the code itself
def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("tpu")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("20GiB") == 20 * 2**30 and parse_size("20G") == 20 * 2**30
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("1.5e3") == 1500 and parse_size(7) == 7
    for bad in ("lots", "5 parsecs", "-1GB", "0"):
        with pytest.raises(ConfigError):
            parse_size(bad, "--max-memory")


CONVERSION_PATH = ["layerwise.py", "splits.py", "convert.py", "runner.py", "dotmoe.py", "onload.py", "activations.py"]
FACTORIES = {"zeros", "ones", "arange", "empty", "full", "eye", "tensor", "rand", "randn", "linspace"}


def test_no_tensor_is_created_on_a_hard_coded_device():
    """Every torch factory call in the conversion path says where its tensor goes (``device=``):
    fitting on a GPU never meets a tensor that landed on the CPU by default."""
    bad = []
    for name in CONVERSION_PATH:
        path = ROOT / "src" / "moefy" / name
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                bad.append(f"{name}:{node.lineno} torch.{node.func.attr}")
    assert not bad, bad
