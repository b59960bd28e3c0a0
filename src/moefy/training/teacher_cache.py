"""Teacher distributions computed once and reused: top-k log-probabilities per position on disk.

Recovery training runs the frozen dense teacher on every batch; its next-token distributions
depend only on the sequence, so ``moefy train --teacher-cache DIR`` keeps, per training
sequence, the teacher's ``k`` most likely tokens at every position (ids and fp32 log-probs) and
the log of the probability mass outside them.  A sequence is keyed by the SHA-1 of its token
ids, so a cache serves every epoch, every run over the same text (other layouts, learning rates,
budgets) and any data order; the loss over it is :class:`moefy.training.losses.SparseTargets`
(exact when ``k`` is the vocabulary).  The held-out evaluations always run the live teacher, so
keep-best and the curves measure the exact KL.

Layout of ``DIR``: ``meta.json`` (format, teacher fingerprint, k, vocabulary, sequence length),
``keys.txt`` (one key per stored sequence, appended after its data), ``idx.bin`` (int32),
``logp.bin`` (fp32) ``[sequences, seq_len, k]`` and ``tail.bin`` (fp32) ``[sequences, seq_len]``,
all appended; on open, data past the last key (a killed run) is cut off.  A cache made by another
teacher, or for another k, vocabulary or sequence length, is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, TeacherMismatchError
from .losses import SparseTargets

FORMAT = "moefy-teacher-cache-v1"


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """Identity of a teacher: its config and a float64 sum and sum of squares of every tensor."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if torch.is_floating_point(t):
                t64 = t.detach().double()
                h.update(f"{name}:{float(t64.sum()):.17g}:{float((t64 * t64).sum()):.17g}".encode())
    return h.hexdigest()[:20]


def topk_targets(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids int32 [n, k], log-probs fp32 [n, k], log tail mass fp32 [n])`` of log-probs ``[n, V]``."""
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), dim=-1)
    return top.indices.to(torch.int32), top.values.float(), tail.float()


class TeacherCache:
    def __init__(self, path: str | Path, teacher_id: str, k: int, vocab: int, seq_len: int) -> None:
        if k < 1:
            raise ConfigError(f"--cache-top-k must be at least 1, got {k}")
        self.path = Path(path)
        self.k, self.vocab, self.seq_len = min(k, vocab), vocab, seq_len
        meta = {"format": FORMAT, "teacher": teacher_id, "k": self.k, "vocab": vocab, "seq_len": seq_len}
        mfile = self.path / "meta.json"
        if mfile.is_file():
            try:
                old = json.loads(mfile.read_text())
            except json.JSONDecodeError:
                raise ConfigError(f"{mfile} is not a moefy teacher cache (unreadable meta.json)") from None
            if old.get("format") != FORMAT:
                raise ConfigError(f"{self.path} is not a moefy teacher cache")
            if old.get("teacher") != teacher_id:
                raise TeacherMismatchError(f"teacher cache {self.path} was made by another teacher; give another --teacher-cache")
            diff = [key for key in ("k", "vocab", "seq_len") if old.get(key) != meta[key]]
            if diff:
                raise ConfigError(f"teacher cache {self.path} holds {', '.join(f'{d} {old.get(d)}' for d in diff)}; this run "
                                  f"needs {', '.join(f'{d} {meta[d]}' for d in diff)}: give another --teacher-cache")
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise ConfigError(f"--teacher-cache {self.path} exists and is not a moefy teacher cache")
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = mfile.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, mfile)
        keys_file = self.path / "keys.txt"
        keys = keys_file.read_text().split() if keys_file.is_file() else []
        self.slots = {key: i for i, key in enumerate(keys)}
        n = len(keys)
        per = self.seq_len * self.k
        for name, size in (("idx.bin", per * 4), ("logp.bin", per * 4), ("tail.bin", self.seq_len * 4)):
            f = self.path / name
            if not f.exists():
                f.touch()
            if f.stat().st_size != n * size:  # a killed run's data past its last key
                os.truncate(f, n * size)
        self.hits = self.misses = 0

    @staticmethod
    def key(row: torch.Tensor) -> str:
        return hashlib.sha1(row.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()

    def _read(self, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        per = self.seq_len * self.k
        idx = np.fromfile(self.path / "idx.bin", dtype=np.int32, count=per, offset=slot * per * 4)
        lp = np.fromfile(self.path / "logp.bin", dtype=np.float32, count=per, offset=slot * per * 4)
        tail = np.fromfile(self.path / "tail.bin", dtype=np.float32, count=self.seq_len, offset=slot * self.seq_len * 4)
        return idx.reshape(self.seq_len, self.k), lp.reshape(self.seq_len, self.k), tail

    def _append(self, key: str, idx: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor) -> None:
        for name, t in (("idx.bin", idx), ("logp.bin", lp), ("tail.bin", tail)):
            with open(self.path / name, "ab") as fh:
                fh.write(t.detach().cpu().contiguous().numpy().tobytes())
        with open(self.path / "keys.txt", "a") as fh:  # the key last: data without a key is cut on open
            fh.write(key + "\n")
        self.slots[key] = len(self.slots)

    def targets(self, ids: torch.Tensor, teacher_logp: Any) -> SparseTargets:
        """The cached targets of ``ids`` ``[B, T]`` (flattened ``[B*T, k]``); sequences not yet
        cached are scored by ``teacher_logp(ids_missing)``, an iterable of each one's log-probs
        ``[T, V]`` (one sequence's vocabulary-sized tensor at a time), and stored."""
        if ids.shape[1] != self.seq_len:
            raise ConfigError(f"teacher cache {self.path} is for sequences of {self.seq_len} tokens, got {ids.shape[1]}")
        keys = [self.key(r) for r in ids]
        missing = sorted({i for i, key in enumerate(keys) if key not in self.slots}, key=lambda i: i)
        missing = [i for i in missing if keys[i] not in keys[:i]]  # a sequence twice in one batch: once
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            for i, logp in zip(missing, teacher_logp(ids[missing])):
                self._append(keys[i], *topk_targets(logp, self.k))
        parts = [self._read(self.slots[key]) for key in keys]
        idx = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        lp = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        tail = torch.from_numpy(np.concatenate([p[2] for p in parts]))
        return SparseTargets(idx.to(ids.device), lp.to(ids.device), tail.to(ids.device))
