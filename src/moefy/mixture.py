"""Weighted mixtures of text sources, for calibration (``moefy convert --calib``) and recovery
training (``moefy train --data``).

A source is what ``--data`` already takes (a file, glob, directory, ``.jsonl``/``.parquet``/
``.arrow``, a saved dataset or ``moefy tokenize`` shards) or ``teacher``: text sampled from the
dense model itself.  A weight follows ``@``: ``wiki.valid.tokens@0.5``, ``stories.txt@0.3``,
``teacher@0.2`` (weights are relative; a source without one weighs 1).  Recipes take the same
strings or mappings ``{path: FILE, weight: W}`` / ``{teacher: true, weight: W}``.

Sources given without any weight and without ``teacher`` are one stream read in order, as
before mixtures existed; any weight (or ``teacher`` beside other sources) makes a mixture, where
each source is its own stream and position ``n`` of the mixed order comes from the source whose
count falls furthest behind its share (:func:`schedule`): exact shares at every prefix,
a pure function of the weights, so the same at any resume point and for any number of
processes; each source keeps its own shuffle (by seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CalibrationDataError, ConfigError

TEACHER = "teacher"


@dataclass(frozen=True)
class SourceSpec:
    """One source: a path-like spec (or :data:`TEACHER`) and its weight (``None``: not given)."""

    spec: str
    weight: float | None = None

    @property
    def is_teacher(self) -> bool:
        return self.spec == TEACHER

    @property
    def name(self) -> str:
        """A short name for logs and per-source metrics."""
        return TEACHER if self.is_teacher else (Path(self.spec).stem or self.spec)

    def __str__(self) -> str:
        return self.spec if self.weight is None else f"{self.spec}@{self.weight:g}"


def _weight(text: str, whole: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise ConfigError(f"weight {text!r} in {whole!r} is not a positive number") from None
    if not math.isfinite(w) or w <= 0:
        raise ConfigError(f"weight {text!r} in {whole!r} is not a positive number")
    return w


def parse_spec(item: str | dict[str, Any] | Path) -> SourceSpec:
    """``PATH``, ``PATH@W``, ``teacher``, ``teacher@W`` or a recipe mapping (see the module doc).
    A path that exists as written (``@`` and all) is a path."""
    if isinstance(item, dict):
        unknown = set(item) - {"path", "teacher", "weight"}
        if unknown or ("path" in item) == bool(item.get("teacher")):
            raise ConfigError(f"data source {item!r}: give either path: FILE or teacher: true, and optionally weight: W")
        w = item.get("weight")
        weight = None if w is None else _weight(str(w), str(item))
        return SourceSpec(TEACHER if item.get("teacher") else str(item["path"]), weight)
    s = str(item)
    if not s:
        raise ConfigError("empty data source")
    if "@" in s and not Path(s).expanduser().exists():
        spec, w = s.rsplit("@", 1)
        if not spec:
            raise ConfigError(f"data source {s!r} names no file")
        return SourceSpec(spec, _weight(w, s))
    return SourceSpec(s)


def parse_specs(items: Sequence[str | dict[str, Any] | Path] | None) -> list[SourceSpec]:
    return [parse_spec(i) for i in items or []]


def is_mixture(specs: Sequence[SourceSpec]) -> bool:
    """Whether ``specs`` mix (some weight given, or the teacher's samples beside other sources)."""
    return any(s.weight is not None for s in specs) or (any(s.is_teacher for s in specs) and len(specs) > 1)


def weights(specs: Sequence[SourceSpec]) -> list[float]:
    """Normalised weights (a source without a weight weighs 1)."""
    raw = [1.0 if s.weight is None else s.weight for s in specs]
    total = sum(raw)
    return [w / total for w in raw]


def shares(ws: Sequence[float], n: int, at_least_one: bool = False) -> list[int]:
    """``n`` items split by weight, largest remainder (ties: the earlier source); with
    ``at_least_one`` every source gets one when ``n`` allows."""
    if at_least_one and n >= len(ws):
        rest = shares(ws, n - len(ws))
        return [r + 1 for r in rest]
    exact = [w * n for w in ws]
    out = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(ws)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


def schedule(ws: Sequence[float], n: int) -> list[int]:
    """The source of each of the first ``n`` positions of a mixed order: the one whose count is
    furthest behind ``(position + 1) * weight`` (ties: the earlier source).  Every prefix holds
    each source's share to within one item."""
    counts = [0] * len(ws)
    out = []
    for pos in range(n):
        best = max(range(len(ws)), key=lambda i: ((pos + 1) * ws[i] - counts[i], -i))
        counts[best] += 1
        out.append(best)
    return out


class Schedule:
    """:func:`schedule` extended on demand, with each position's index within its source."""

    def __init__(self, ws: Sequence[float]) -> None:
        self.ws = list(ws)
        self.source: list[int] = []
        self.index: list[int] = []
        self._counts = [0] * len(self.ws)

    def upto(self, n: int) -> None:
        for pos in range(len(self.source), n):
            best = max(range(len(self.ws)), key=lambda i: ((pos + 1) * self.ws[i] - self._counts[i], -i))
            self.source.append(best)
            self.index.append(self._counts[best])
            self._counts[best] += 1

    def at(self, pos: int) -> tuple[int, int]:
        """(source, index within that source) of position ``pos``."""
        self.upto(pos + 1)
        return self.source[pos], self.index[pos]


def check_teacher_only_once(specs: Sequence[SourceSpec]) -> None:
    if sum(s.is_teacher for s in specs) > 1:
        raise CalibrationDataError("the teacher's samples are named more than once; give one teacher@W")


def check_sources(specs: Sequence[SourceSpec]) -> list[list[str]]:
    """Every non-teacher source's files (absolute paths), checked to exist before any model loads."""
    from .training.data import resolve_sources

    check_teacher_only_once(specs)
    return [[] if s.is_teacher else [str(p.expanduser().resolve()) for p in resolve_sources([s.spec])] for s in specs]


def calibration_mixture(
    tokenizer: Any, specs: Sequence[SourceSpec], n_tokens: int, seq_len: int, batch: int = 1, model: Any = None,
    seed: int = 0,
) -> Any:
    """A :class:`~moefy.calibration.CalibrationSet` drawn from ``specs`` by weight: each source
    gives its share of the ``n_tokens // seq_len`` windows (at least one), from its start (the
    teacher's: sampled, seeded ``seed``); the windows are interleaved by :func:`schedule`, so any
    prefix (``--allocate``'s measurement, held-out splits) holds every source by its share."""
    import torch

    from .calibration import CalibrationSet, sample_from_model
    from .training.data import stream_windows

    ws = weights(specs)
    n_seq = max(n_tokens // seq_len, len(specs))
    if n_seq >= batch:
        n_seq -= n_seq % batch
    counts = shares(ws, n_seq, at_least_one=True)
    files = check_sources(specs)
    rows, parts = [], []
    for sp, w, c, fs in zip(specs, ws, counts, files):
        if sp.is_teacher:
            if model is None:
                raise CalibrationDataError("the teacher's samples need the dense model loaded whole")
            ids = sample_from_model(model, tokenizer, c * seq_len, seq_len, seed=seed, batch=min(8, c)).ids[:c]
        else:
            ids = stream_windows(tokenizer, sp.spec, c, seq_len)
        rows.append(ids)
        parts.append({"source": str(sp), "name": sp.name, "weight": w, "sequences": c, "files": fs})
    order = schedule(ws, n_seq)
    taken = [0] * len(specs)
    out = []
    for s in order:
        out.append(rows[s][taken[s]])
        taken[s] += 1
    desc = "mixture: " + ", ".join(f"{p['source']} ({p['sequences']} x {seq_len})" for p in parts)
    return CalibrationSet(torch.stack(out), desc, parts)
