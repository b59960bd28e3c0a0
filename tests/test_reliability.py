"""Failure paths: non-finite losses, Ctrl-C, out of memory; property tests of the OT core."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import STORIES, TINYSTORIES, needs_shared
from moefy.ot import capacities, round_exact, round_greedy, sinkhorn_log
from moefy.testing_hooks import pause_env, wait_until_paused


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
    paused = tmp_path / "paused"
    cmd = [sys.executable, "-m", "moefy.cli", "convert", str(STORIES), "--out", str(out), "--calib", str(TINYSTORIES),
           "--calib-tokens", "2048", "--seq-len", "64", "--steps", "5"]
    # the test-only hook blocks the conversion after layer 0 is saved, so SIGINT cannot come too late;
    # SIGINT is reset to the default (a shell's background job inherits it ignored, and Python then never raises)
    with open(tmp_path / "stderr", "w+") as err_fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_fh, text=True,
                                env=pause_env(0, paused, dict(os.environ, COLUMNS="200")),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_until_paused(proc, paused, timeout=300)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err_fh.seek(0)
        err = err_fh.read()
    assert proc.returncode == 130, err[-1000:]
    assert "rerun the same command to resume" in err
    assert "Traceback" not in err
    assert not out.exists() and (work / "layer_0000.json").exists()
    assert not (work / "layer_0001.json").exists()


def test_pause_hook_is_a_no_op_unless_its_layer_is_named(tmp_path, monkeypatch):
    from moefy import testing_hooks as th

    paused = tmp_path / "paused"
    monkeypatch.delenv(th.PAUSE_AFTER_LAYER, raising=False)
    th.pause_after_layer(0)  # unset: returns at once
    for k, v in th.pause_env(3, paused, {}).items():
        monkeypatch.setenv(k, v)
    th.pause_after_layer(2)  # another layer: returns at once
    assert not paused.exists()
    monkeypatch.setenv(th.PAUSE_TIMEOUT, "0.01")  # its layer: pauses (says so), gives up after the timeout
    with pytest.raises(RuntimeError, match="no signal came"):
        th.pause_after_layer(3)
    assert paused.read_text() == str(os.getpid())
    assert th.PAUSE_AFTER_LAYER not in th.clean_env(th.pause_env(3, paused))


def test_fingerprint_follows_calibration_contents(tmp_path):
    from moefy.config import ConvertConfig
    from moefy.runner import fingerprint

    cfg = ConvertConfig()
    small = tmp_path / "c.txt"
    small.write_text("Once upon a time there was a cat.\n")
    fp = fingerprint("m", cfg, [str(small)])
    os.utime(small, ns=(1, 1))  # touched or copied, same bytes: still resumable
    assert fingerprint("m", cfg, [str(small)]) == fp
    small.write_text("Once upon a time there was a dog.\n")  # same size
    os.utime(small, ns=(1, 1))  # same mtime
    assert fingerprint("m", cfg, [str(small)]) != fp

    big = tmp_path / "big.txt"  # over 64 MiB: head and tail hashed, plus size and mtime
    with open(big, "wb") as fh:
        fh.truncate(65 << 20)
    os.utime(big, ns=(1, 1))
    fp = fingerprint("m", cfg, [str(big)])
    with open(big, "r+b") as fh:
        fh.seek(30 << 20)
        fh.write(b"x")  # an edit in the unhashed middle: caught by the mtime
    assert fingerprint("m", cfg, [str(big)]) != fp
    os.utime(big, ns=(1, 1))
    assert fingerprint("m", cfg, [str(big)]) == fp
    with open(big, "r+b") as fh:
        fh.write(b"y")  # an edit in the head, mtime restored: caught by the hash
    os.utime(big, ns=(1, 1))
    assert fingerprint("m", cfg, [str(big)]) != fp


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
