"""Failure paths: non-finite losses, Ctrl-C, out of memory; property tests of the OT core."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import STORIES, TINYSTORIES, needs_shared
from moefy.ot import capacities, round_exact, round_greedy, sinkhorn_log


@needs_shared()
def test_nan_loss_stops_keeps_finished_layers_and_names_layer(tmp_path, monkeypatch):
    import moefy.layerwise as lw
    from moefy.config import ConvertConfig
    from moefy.errors import NonFiniteLossError
    from moefy.runner import run_convert, work_dir_for

    calls = {"n": 0}
    real = lw._relative_loss

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 10 else loss  # 5 steps a layer: layer 2 goes bad

    monkeypatch.setattr(lw, "_relative_loss", poisoned)
    cfg = ConvertConfig(n_experts=4, top_k=2, calib_tokens=1024, seq_len=64, steps=5, eval_every=5)
    out = tmp_path / "o"
    with pytest.raises(NonFiniteLossError, match="layer 2 at step 0"):
        run_convert(str(STORIES), out, cfg, [str(TINYSTORIES)], log=lambda *_: None)
    assert not out.exists()
    assert sorted(p.name for p in work_dir_for(out).glob("layer_*.json")) == ["layer_0000.json", "layer_0001.json"]


@needs_shared()
def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    out = tmp_path / "o"
    work = tmp_path / ".o.moefy-work"
    cmd = [sys.executable, "-m", "moefy.cli", "convert", str(STORIES), "--out", str(out), "--calib", str(TINYSTORIES),
           "--calib-tokens", "8192", "--seq-len", "128", "--steps", "40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, COLUMNS="200"))
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "layer_0000.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1000:]
    assert "rerun the same command to resume" in err
    assert "Traceback" not in err
    assert not out.exists() and (work / "layer_0000.json").exists()


def test_out_of_memory_is_one_line_with_a_suggestion(monkeypatch, capsys):
    import moefy.runner
    from moefy.cli import main
    from moefy.errors import OutOfMemoryError

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(moefy.runner, "run_convert", boom)
    with pytest.raises(SystemExit) as exc:
        main(["convert", "whatever", "--out", "/tmp/never-written-moefy"])
    assert exc.value.code == OutOfMemoryError.exit_code
    err = capsys.readouterr().err
    assert "--calib-tokens" in err and "Traceback" not in err


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 300),
    e=st.integers(2, 16),
    tau=st.floats(0.02, 10.0),
    scale=st.floats(0.0, 20.0),
    seed=st.integers(0, 2**16),
)
def test_sinkhorn_and_rounding_properties(n, e, tau, scale, seed):
    if e > n:
        e = n
    g = torch.Generator().manual_seed(seed)
    caps = capacities(n, e)
    a = torch.randn(n, e, generator=g) * scale
    log_m = sinkhorn_log(a, caps, tau=tau, n_iter=300)
    m = log_m.exp()
    assert torch.isfinite(log_m).all()
    assert torch.allclose(m.sum(1), torch.ones(n), atol=1e-4)
    for rounder in (round_greedy, round_exact):
        assign = rounder(m, caps)
        assert torch.bincount(assign, minlength=e).tolist() == caps


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 200), e=st.integers(2, 8), seed=st.integers(0, 1000))
def test_sinkhorn_column_marginals_converge(n, e, seed):
    e = min(e, n)
    caps = capacities(n, e)
    a = torch.randn(n, e, generator=torch.Generator().manual_seed(seed))
    m = sinkhorn_log(a, caps, tau=1.0, n_iter=2000, tol=1e-6).exp()
    assert torch.allclose(m.sum(0), torch.tensor(caps, dtype=torch.float32), rtol=1e-3, atol=1e-3)
