"""A conversion killed with SIGKILL mid-way resumes and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from conftest import STORIES, TINYSTORIES, needs_shared

pytestmark = needs_shared()


def _cmd(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "moefy.cli", "convert", str(STORIES), "--out", str(out), "--calib", str(TINYSTORIES),
        "--calib-tokens", "8192", "--seq-len", "128", "--steps", "30", "--seed", "3",
    ]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), check=True, env=env, capture_output=True)

    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.moefy-work"
    proc = subprocess.Popen(_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "layer_0001.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no half checkpoint
    done = sorted(p.name for p in work.glob("layer_*.json"))
    assert 1 <= len(done) < 5

    res = subprocess.run(_cmd(out), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stderr
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert not work.exists()
