"""Cached teacher distributions (moefy.training.teacher_cache): exact at k = vocabulary, reused,
resumed bit-identically, refused when made by another teacher."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, needs_shared
from moefy.errors import ConfigError, TeacherMismatchError
from moefy.training.losses import SparseTargets, distill_loss, distill_loss_cached
from moefy.training.teacher_cache import TeacherCache, topk_targets

from test_training import _env, _train_cmd, stories_moe  # noqa: F401  (the module's fixture)


def _case(n=37, d=8, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    th, tw = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[-1] = -100
    return h, w, th, tw, labels


@pytest.mark.parametrize("ce", [0.0, 0.5])
def test_full_vocabulary_cache_equals_the_live_teacher(ce):
    h, w, th, tw, labels = _case()
    live, st = distill_loss(h, w, None, th, tw, None, labels, 1.0, ce, chunk=16)
    gh, gw = torch.autograd.grad(live, (h, w))
    t_logp = torch.log_softmax(th @ tw.T, -1)
    cached, st2 = distill_loss_cached(h, w, None, SparseTargets(*topk_targets(t_logp, 50)), labels, 1.0, ce, chunk=16)
    ch, cw = torch.autograd.grad(cached, (h, w))
    assert cached.item() == pytest.approx(live.item(), rel=1e-6) and st2["kl"] == pytest.approx(st["kl"], rel=1e-6)
    assert torch.allclose(ch, gh, atol=1e-6) and torch.allclose(cw, gw, atol=1e-6)


def test_top_k_kl_and_gradient_match_autograd_of_the_top_k_formula():
    h, w, th, tw, labels = _case(seed=1)
    t_logp = torch.log_softmax(th @ tw.T, -1)
    idx, lp, tail = topk_targets(t_logp, 7)
    loss, _ = distill_loss_cached(h, w, None, SparseTargets(idx, lp, tail), labels, 1.0, 0.0, chunk=10)
    gh, = torch.autograd.grad(loss, (h,))
    h2 = h.detach().clone().requires_grad_(True)
    logq = torch.log_softmax(h2 @ w.detach().T, -1)
    qk = logq.gather(-1, idx.long())
    log_qt = torch.log1p(-qk.exp().sum(-1).clamp(max=1 - 1e-7))
    ref = ((lp.exp() * (lp - qk)).sum(-1) + tail.exp() * (tail - log_qt)).mean()
    rh, = torch.autograd.grad(ref, (h2,))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(gh, rh, atol=1e-5)
    assert 0 < loss.item()


def test_cache_stores_reuses_refuses_and_cuts_a_killed_tail(tmp_path):
    seq, vocab, k = 6, 30, 4
    calls = []

    def teacher(ids):
        calls.append(ids.shape[0])
        for row in ids:
            g = torch.Generator().manual_seed(int(row.sum()))
            yield torch.log_softmax(torch.randn(seq, vocab, generator=g), -1)

    c = TeacherCache(tmp_path / "c", "T1", k, vocab, seq)
    ids = torch.randint(0, vocab, (3, seq), generator=torch.Generator().manual_seed(0))
    a = c.targets(ids, teacher)
    assert calls == [3] and c.misses == 3
    b = TeacherCache(tmp_path / "c", "T1", k, vocab, seq).targets(ids[[2, 0]], teacher)  # reopened: all hits
    assert calls == [3]
    assert torch.equal(b.idx, torch.cat([a.idx[2 * seq:], a.idx[:seq]])) and torch.equal(b.logp[:seq], a.logp[2 * seq:])
    with pytest.raises(TeacherMismatchError):
        TeacherCache(tmp_path / "c", "T2", k, vocab, seq)
    with pytest.raises(ConfigError):
        TeacherCache(tmp_path / "c", "T1", k + 1, vocab, seq)
    with open(tmp_path / "c" / "logp.bin", "ab") as fh:  # a killed run's data with no key
        fh.write(b"\0" * 100)
    c2 = TeacherCache(tmp_path / "c", "T1", k, vocab, seq)
    assert len(c2.slots) == 3 and (tmp_path / "c" / "logp.bin").stat().st_size == 3 * seq * k * 4


@needs_shared()
def test_cached_training_equals_live_at_full_vocabulary_and_resumes_bit_identically(stories_moe, tmp_path):  # noqa: F811
    full = ["--cache-top-k", "512"]  # stories260K's whole vocabulary
    live, cached = tmp_path / "live", tmp_path / "cached"
    subprocess.run(_train_cmd(stories_moe, live, []), check=True, env=_env(), capture_output=True)
    p = subprocess.run(_train_cmd(stories_moe, cached, ["--teacher-cache", str(tmp_path / "c1"), *full]), env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    a, b = load_file(str(live / "model.safetensors")), load_file(str(cached / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    ha, hb = (json.loads((d / "moefy.json").read_text())["training"][-1] for d in (live, cached))
    assert [h["val_kl"] for h in hb["history"]] == pytest.approx([h["val_kl"] for h in ha["history"]], rel=1e-5)
    assert hb["teacher_cache"]["misses"] == 16 and hb["teacher_cache"]["hits"] == 0
    # killed after step 2, resumed with its own cache: bit-identical to the uninterrupted cached run
    out = tmp_path / "resumed"
    cmd = _train_cmd(stories_moe, out, ["--teacher-cache", str(tmp_path / "c2"), *full])
    p = subprocess.run(cmd, env=_env(MOEFY_TEST_KILL_AFTER_STEP="2"), capture_output=True)
    assert p.returncode == -signal.SIGKILL and not out.exists()
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert p.returncode == 0 and "resuming training at step 2" in p.stderr, p.stderr
    c = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    # a second run over the same text reads every sequence from the cache
    again = tmp_path / "again"
    p = subprocess.run(_train_cmd(stories_moe, again, ["--teacher-cache", str(tmp_path / "c1"), *full]), env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0 and "16 sequences read, 0 computed" in p.stderr, p.stderr
    # another teacher's cache: one line, no output
    meta = json.loads((tmp_path / "c1" / "meta.json").read_text())
    (tmp_path / "c1" / "meta.json").write_text(json.dumps({**meta, "teacher": "someone-else"}))
    bad = tmp_path / "bad"
    p = subprocess.run(_train_cmd(stories_moe, bad, ["--teacher-cache", str(tmp_path / "c1"), *full]), env=_env(),
                       capture_output=True, text=True)
    assert p.returncode != 0 and "another teacher" in p.stderr and "Traceback" not in p.stderr and not bad.exists()
