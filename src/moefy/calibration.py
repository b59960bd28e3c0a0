"""Calibration text: user files (plain text or JSON lines) or, with none, text sampled from the
dense model itself (data-free distillation).  Output: a ``[n_seq, seq_len]`` token tensor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationDataError

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class CalibrationSet:
    ids: torch.Tensor  # [n_seq, seq_len]
    source: str
    parts: list[dict[str, Any]] | None = None  # a mixture's sources (moefy.mixture.calibration_mixture)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())


def _json_text(obj: object, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in ("text", "content", "document", "story"):
            if isinstance(obj.get(key), str):
                return obj[key]
    raise CalibrationDataError(f"{where}: JSON record has no 'text' string field")


def read_texts(path: str | Path) -> list[str]:
    """Documents of one calibration file (``.txt``-like, ``.jsonl`` or ``.json``)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationDataError(f"calibration file not found: {p}")
    suffix = p.suffix.lower()
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"cannot read calibration file {p} as UTF-8 text: {exc}") from None
    if suffix in TEXT_SUFFIXES:
        return [raw]
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    out.append(_json_text(json.loads(line), f"{p}:{n}"))
                except json.JSONDecodeError:
                    raise CalibrationDataError(f"{p}:{n} is not valid JSON") from None
        return out
    if suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise CalibrationDataError(f"{p} is not valid JSON") from None
        if not isinstance(data, list):
            data = [data]
        return [_json_text(d, str(p)) for d in data]
    known = ", ".join(TEXT_SUFFIXES + JSON_SUFFIXES)
    raise CalibrationDataError(f"unknown calibration file format {suffix or '(no suffix)'!r} for {p}; use one of {known}")


def check_paths(paths: list[str]) -> None:
    """Fail fast (before a model is loaded) on missing files or unknown formats."""
    known = TEXT_SUFFIXES + JSON_SUFFIXES
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise CalibrationDataError(f"calibration file not found: {p}")
        if p.suffix.lower() not in known:
            raise CalibrationDataError(
                f"unknown calibration file format {p.suffix or '(no suffix)'!r} for {p}; use one of {', '.join(known)}"
            )


def _bos(tokenizer: object) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


def tokenize_stream(tokenizer: object, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, separated by EOS (no BOS; windows add it)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for t in texts:
        if not t.strip():
            continue
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, tokenizer: object, n_tokens: int, seq_len: int, batch: int = 1) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens (BOS first when the model uses one), the
    first ``n_tokens // seq_len`` of them, rounded down to a multiple of ``batch``."""
    bos = _bos(tokenizer)
    body = seq_len - (1 if bos is not None else 0)
    n_avail = stream.numel() // body
    n_seq = min(max(n_tokens // seq_len, 1), n_avail)
    if n_seq >= batch:
        n_seq -= n_seq % batch
    if n_seq < 1:
        raise CalibrationDataError(
            f"calibration data has {stream.numel()} tokens, fewer than one sequence of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    rows = stream[: n_seq * body].view(n_seq, body)
    if bos is not None:
        rows = torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def from_files(tokenizer: object, paths: list[str], n_tokens: int, seq_len: int, batch: int = 1) -> CalibrationSet:
    texts: list[str] = []
    for p in paths:
        texts.extend(read_texts(p))
    if not any(t.strip() for t in texts):
        raise CalibrationDataError(f"calibration data is empty: {', '.join(paths)}")
    ids = windows(tokenize_stream(tokenizer, texts), tokenizer, n_tokens, seq_len, batch)
    return CalibrationSet(ids, "files: " + ", ".join(str(Path(p)) for p in paths))


def calib_files(source: str) -> list[str]:
    """The calibration files (absolute paths) a :class:`CalibrationSet` ``source`` names; ``[]``
    for data-free calibration.  ``moefy train`` uses it to keep its held-out and training text
    off the tokens the layer-wise stage fitted (:func:`moefy.training.run.calibration_skip`)."""
    if not source.startswith("files: "):
        return []
    return [str(Path(p).expanduser().resolve()) for p in source[len("files: "):].split(", ") if p]


@torch.no_grad()
def sample_from_model(
    model: torch.nn.Module, tokenizer: object, n_tokens: int, seq_len: int, seed: int = 0, batch: int = 8
) -> CalibrationSet:
    """Data-free calibration: sequences sampled (temperature 1, top-p 0.95) from the dense model."""
    bos = _bos(tokenizer)
    start = bos if bos is not None else getattr(tokenizer, "eos_token_id", 0)
    n_seq = max(n_tokens // seq_len, 1)
    n_seq = max(batch, n_seq - n_seq % batch) if n_seq >= batch else n_seq
    torch.manual_seed(seed)
    rows = []
    for s in range(0, n_seq, batch):
        b = min(batch, n_seq - s)
        prompt = torch.full((b, 1), int(start), dtype=torch.long)
        out = model.generate(  # type: ignore[operator]
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=1.0,
            top_p=0.95,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=getattr(tokenizer, "eos_token_id", None) or 0,
        )
        rows.append(out[:, :seq_len])
    return CalibrationSet(torch.cat(rows), f"data-free: {n_seq} sequences sampled from the dense model")
