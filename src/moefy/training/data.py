"""Training data: streamed from disk, packed into sequences, shuffled deterministically.

Sources (never read whole into memory):

* text files (``.txt``, ``.raw``, ``.tokens``, ``.md``), read in chunks cut at line ends;
* ``.jsonl`` files, one document per line (``text`` field);
* what the ``datasets`` library loads locally: ``.parquet``, ``.arrow`` files and folders written
  by ``save_to_disk``, iterated in streaming mode;
* globs and directories of any of those (sorted, recursive);
* token shards written by ``moefy tokenize`` (a folder with ``tokens.json``): memory-mapped.

The token stream is every document's tokens followed by EOS; it is cut into sequences of
``seq_len`` tokens: BOS (when the tokenizer has one) plus ``seq_len - 1`` stream tokens, the
same layout as the calibration windows. The first ``skip_tokens`` stream tokens are dropped
(``moefy convert`` uses it to train past its calibration text) and the next ``val_sequences``
sequences are held out; training uses the rest.

Order: the training sequences are shuffled within blocks of ``shuffle_window`` sequences by a
permutation keyed by ``(seed, epoch, block)``, and epochs repeat the stream. Sequence ``n`` of
that order is a pure function of the data, the seed and ``n``; the batch of optimizer step
``s`` is sequences ``[s * G, (s + 1) * G)`` (``G`` the global batch), sliced per micro-batch
and rank. So resuming needs only the step, pre-tokenized shards give the same batches as
tokenizing on the fly, and any number of processes sees the same global batches.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration import _json_text
from ..errors import CalibrationDataError

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens", ".md")
JSONL_SUFFIXES = (".jsonl",)
DATASETS_SUFFIXES = (".parquet", ".arrow")
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + DATASETS_SUFFIXES
SHARD_INDEX = "tokens.json"
READ_CHUNK_BYTES = 1 << 20


# ----------------------------------------------------------------------------- sources
def _is_shard_dir(p: Path) -> bool:
    return p.is_dir() and (p / SHARD_INDEX).is_file()


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and (p / "dataset_info.json").is_file() and (p / "state.json").is_file()


def resolve_sources(specs: list[str]) -> list[Path]:
    """Files (and shard / saved-dataset folders) named by paths, globs and directories."""
    if not specs:
        raise CalibrationDataError("no training data given")
    out: list[Path] = []
    for spec in specs:
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True)) if any(c in spec for c in "*?[") else [spec]
        if not matches:
            raise CalibrationDataError(f"no files match {spec!r}")
        for m in matches:
            p = Path(m).expanduser()
            if _is_shard_dir(p) or _is_saved_dataset(p):
                out.append(p)
            elif p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in ALL_SUFFIXES)
                if not found:
                    raise CalibrationDataError(f"directory {p} holds no data files ({', '.join(ALL_SUFFIXES)})")
                out.extend(found)
            elif p.is_file():
                if p.suffix.lower() not in ALL_SUFFIXES:
                    raise CalibrationDataError(
                        f"unknown data file format {p.suffix or '(no suffix)'!r} for {p}; use one of {', '.join(ALL_SUFFIXES)}"
                    )
                out.append(p)
            else:
                raise CalibrationDataError(f"data file not found: {p}")
    return out


def _text_chunks(path: Path, chunk_bytes: int) -> Iterator[str]:
    """A text file in pieces of about ``chunk_bytes``, each cut after a line end (a text file is
    one document: no EOS between its pieces)."""
    carry = ""
    with open(path, encoding="utf-8", newline="") as fh:
        while True:
            try:
                block = fh.read(chunk_bytes)
            except UnicodeDecodeError as exc:
                raise CalibrationDataError(f"cannot read {path} as UTF-8 text: {exc}") from None
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n")
            if cut < 0:
                carry = text
                if len(carry) > 16 * chunk_bytes:  # one enormous line: cut anyway
                    yield carry
                    carry = ""
                continue
            yield text[: cut + 1]
            carry = text[cut + 1 :]
    if carry:
        yield carry


def _datasets_rows(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise CalibrationDataError(f"reading {path} needs the 'datasets' package: pip install datasets") from None
    datasets.disable_progress_bars()
    if path.is_dir():
        ds: Any = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        ds = ds.to_iterable_dataset()
    else:
        kind = "parquet" if path.suffix.lower() == ".parquet" else "arrow"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
    for n, row in enumerate(ds):
        yield _json_text(row, f"{path} row {n}")


@dataclass
class Piece:
    """A piece of text; ``end`` marks the end of a document (EOS follows it)."""

    text: str
    end: bool


def iter_pieces(files: list[Path], chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[Piece]:
    for f in files:
        suffix = f.suffix.lower()
        if f.is_dir():
            for t in _datasets_rows(f):
                yield Piece(t, True)
        elif suffix in TEXT_SUFFIXES:
            chunks = _text_chunks(f, chunk_bytes)
            prev = next(chunks, None)
            for nxt in chunks:
                yield Piece(prev, False)  # type: ignore[arg-type]
                prev = nxt
            if prev is not None:
                yield Piece(prev, True)
        elif suffix in JSONL_SUFFIXES:
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield Piece(_json_text(json.loads(line), f"{f}:{n}"), True)
                        except json.JSONDecodeError:
                            raise CalibrationDataError(f"{f}:{n} is not valid JSON") from None
        else:
            for t in _datasets_rows(f):
                yield Piece(t, True)


def token_stream(tokenizer: Any, files: list[Path], chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[list[int]]:
    """Token ids of the files, piece by piece, EOS after each document."""
    eos = getattr(tokenizer, "eos_token_id", None)
    for piece in iter_pieces(files, chunk_bytes):
        ids = tokenizer(piece.text, add_special_tokens=False)["input_ids"] if piece.text.strip() else []
        if piece.end and eos is not None and (ids or piece.text.strip()):
            ids = list(ids) + [int(eos)]
        if ids:
            yield list(ids)


# ----------------------------------------------------------------------------- token shards
def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    blob = json.dumps({"vocab": vocab, "eos": getattr(tokenizer, "eos_token_id", None),
                       "bos": getattr(tokenizer, "bos_token_id", None)})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_token_shards(
    tokenizer: Any, specs: list[str], out: Path, shard_tokens: int = 1 << 26,
    chunk_bytes: int = READ_CHUNK_BYTES, progress: Any = None,
) -> dict[str, Any]:
    """Tokenize ``specs`` once into ``out/``: raw little-endian ``uint32`` (or ``uint16``) shards
    and a ``tokens.json`` index. Written beside ``out`` and renamed into place when complete."""
    from ..export import atomic_write_dir

    files = resolve_sources(specs)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    index: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        shards: list[dict[str, Any]] = []
        buf: list[int] = []
        total = 0

        def flush() -> None:
            nonlocal buf
            if not buf:
                return
            name = f"shard_{len(shards):05d}.bin"
            np.asarray(buf, dtype=dtype).tofile(tmp / name)
            shards.append({"file": name, "tokens": len(buf)})
            buf = []

        for ids in token_stream(tokenizer, files, chunk_bytes):
            buf.extend(ids)
            total += len(ids)
            while len(buf) >= shard_tokens:
                rest = buf[shard_tokens:]
                buf = buf[:shard_tokens]
                flush()
                buf = rest
            if progress is not None:
                progress(total)
        flush()
        if total == 0:
            raise CalibrationDataError(f"training data is empty: {', '.join(specs)}")
        index.update({
            "format": "moefy-token-shards-v1", "dtype": np.dtype(dtype).name, "tokens": total, "shards": shards,
            "sources": [str(f) for f in files], "tokenizer": tokenizer_fingerprint(tokenizer),
            "eos_token_id": getattr(tokenizer, "eos_token_id", None), "bos_token_id": getattr(tokenizer, "bos_token_id", None),
        })
        (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2))

    atomic_write_dir(out, write, overwrite=True)
    return index


class TokenShards:
    """Memory-mapped token shards (``moefy tokenize`` output) as one random-access stream."""

    def __init__(self, path: Path, tokenizer: Any | None = None) -> None:
        self.path = path
        index = json.loads((path / SHARD_INDEX).read_text())
        if index.get("format") != "moefy-token-shards-v1":
            raise CalibrationDataError(f"{path}: not a moefy token-shard folder")
        if tokenizer is not None and index.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            raise CalibrationDataError(f"{path} was tokenized with another tokenizer than this model's; run moefy tokenize again")
        self.maps = [np.memmap(path / s["file"], dtype=index["dtype"], mode="r") for s in index["shards"]]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.n_tokens = int(self.starts[-1])

    def slice(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        while lo < hi:
            k = int(np.searchsorted(self.starts, lo, side="right") - 1)
            end = min(hi, int(self.starts[k + 1]))
            parts.append(np.asarray(self.maps[k][lo - self.starts[k] : end - self.starts[k]], dtype=np.int64))
            lo = end
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- packing and order
def block_permutation(seed: int, epoch: int, block: int, size: int) -> torch.Tensor:
    """Order of the sequences inside one shuffle block (a pure function of its arguments)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{block}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.randperm(size, generator=torch.Generator().manual_seed(key))


class PackedData:
    """Training and held-out sequences of a data source (see the module docstring)."""

    def __init__(
        self, tokenizer: Any, specs: list[str], seq_len: int, seed: int = 0, val_sequences: int = 0,
        skip_tokens: int = 0, shuffle_window: int = 1024, chunk_bytes: int = READ_CHUNK_BYTES,
    ) -> None:
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.val_sequences = val_sequences
        self.skip_tokens = skip_tokens
        self.window = max(1, shuffle_window)
        self.chunk_bytes = chunk_bytes
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = int(bos) if bos is not None else None
        self.body = seq_len - (1 if self.bos is not None else 0)
        self.files = resolve_sources(specs)
        shard_dirs = [f for f in self.files if _is_shard_dir(f)]
        if shard_dirs and len(shard_dirs) != len(self.files):
            raise CalibrationDataError("give either token-shard folders (moefy tokenize) or raw data files, not both")
        self.shards = [TokenShards(f, tokenizer) for f in shard_dirs]
        self.sources = [str(f) for f in self.files]
        self._n_train: int | None = None
        self._iter: Iterator[tuple[int, torch.Tensor]] | None = None
        self._next_pos = 0
        if self.shards:
            total = sum(s.n_tokens for s in self.shards)
            n_seq = max(0, (total - skip_tokens) // self.body)
            self._n_train = n_seq - val_sequences
        self._check()

    # -- the raw (unshuffled) sequence stream -------------------------------------------
    def _row(self, body: np.ndarray | list[int]) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(body, dtype=np.int64))
        if self.bos is not None:
            t = torch.cat([torch.tensor([self.bos], dtype=torch.long), t])
        return t

    def _raw_rows(self) -> Iterator[torch.Tensor]:
        """Every packed sequence in stream order (held-out ones first), one epoch."""
        if self.shards:
            offsets = [0]
            for s in self.shards:
                offsets.append(offsets[-1] + s.n_tokens)
            n_seq = (offsets[-1] - self.skip_tokens) // self.body
            for j in range(n_seq):
                lo = self.skip_tokens + j * self.body
                yield self._row(self._shard_slice(lo, lo + self.body, offsets))
            return
        buf: list[int] = []
        skip = self.skip_tokens
        for ids in token_stream(self.tokenizer, self.files, self.chunk_bytes):
            if skip:
                drop = min(skip, len(ids))
                ids = ids[drop:]
                skip -= drop
            buf.extend(ids)
            while len(buf) >= self.body:
                yield self._row(buf[: self.body])
                del buf[: self.body]

    def _shard_slice(self, lo: int, hi: int, offsets: list[int]) -> np.ndarray:
        parts = []
        for s, start in zip(self.shards, offsets):
            a, b = max(lo, start), min(hi, start + s.n_tokens)
            if a < b:
                parts.append(s.slice(a - start, b - start))
        return np.concatenate(parts)

    def _check(self) -> None:
        n = 0
        for _ in self._raw_rows():
            n += 1
            if n > self.val_sequences:
                break
        if n == 0:
            raise CalibrationDataError(
                f"training data {', '.join(self.sources)} has fewer tokens than one sequence of {self.seq_len}"
                + (f" after skipping {self.skip_tokens}" if self.skip_tokens else "")
            )
        if n <= self.val_sequences:
            raise CalibrationDataError(
                f"training data {', '.join(self.sources)} has no sequence left for training after "
                f"{self.val_sequences} held-out sequences; give more text or hold out fewer"
            )

    def val_rows(self) -> torch.Tensor | None:
        if self.val_sequences == 0:
            return None
        rows = []
        for r in self._raw_rows():
            rows.append(r)
            if len(rows) == self.val_sequences:
                break
        return torch.stack(rows)

    def val_groups(self) -> list[tuple[str, torch.Tensor]]:
        """The held-out sequences as one named set (a mixture has one per source)."""
        rows = self.val_rows()
        return [] if rows is None else [("held_out", rows)]

    # -- the shuffled training order -----------------------------------------------------
    def _shuffled(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(position, sequence) over all epochs, positions counting from 0."""
        pos = 0
        epoch = 0
        while True:
            raw = self._raw_rows()
            for _ in range(self.val_sequences):
                next(raw)
            block: list[torch.Tensor] = []
            b = 0
            n_this_epoch = 0
            for row in raw:
                block.append(row)
                if len(block) == self.window:
                    for j in block_permutation(self.seed, epoch, b, len(block)).tolist():
                        yield pos, block[j]
                        pos += 1
                    n_this_epoch += len(block)
                    block, b = [], b + 1
            if block:
                for j in block_permutation(self.seed, epoch, b, len(block)).tolist():
                    yield pos, block[j]
                    pos += 1
                n_this_epoch += len(block)
            if self._n_train is None:
                self._n_train = n_this_epoch
            epoch += 1

    def _shard_row(self, n: int) -> torch.Tensor:
        assert self._n_train is not None
        epoch, within = divmod(n, self._n_train)
        b, j = divmod(within, self.window)
        size = min(self.window, self._n_train - b * self.window)
        src = b * self.window + int(block_permutation(self.seed, epoch, b, size)[j])
        lo = self.skip_tokens + (self.val_sequences + src) * self.body
        offsets = [0]
        for s in self.shards:
            offsets.append(offsets[-1] + s.n_tokens)
        return self._row(self._shard_slice(lo, lo + self.body, offsets))

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Training sequences ``start .. start + count - 1`` of the shuffled order."""
        if self.shards:
            return torch.stack([self._shard_row(n) for n in range(start, start + count)])
        if self._iter is None or start < self._next_pos:
            self._iter, self._next_pos = self._shuffled(), 0
        out = []
        for pos, row in self._iter:
            if pos >= start:
                out.append(row)
            if len(out) == count:
                break
        self._next_pos = start + count
        return torch.stack(out)

    def batch(self, step: int, micro: int, accum: int, world: int, rank: int, batch_size: int) -> torch.Tensor:
        """This rank's sequences for micro-batch ``micro`` of optimizer step ``step``."""
        global_batch = batch_size * accum * world
        start = step * global_batch + micro * world * batch_size + rank * batch_size
        return self.rows(start, batch_size)

    @property
    def n_train_sequences(self) -> int | None:
        """Training sequences in one epoch (known for shards, or once an epoch was read)."""
        return self._n_train


def sample_data_free(
    teacher: Any, tokenizer: Any, n_tokens: int, seq_len: int, cache: Path, seed: int, batch: int = 8,
    log: Any = print,
) -> Path:
    """Data-free training text: sequences sampled from the teacher, cached as token shards in
    ``cache`` (reused when it already holds enough; the caller reports the source as such)."""
    from ..calibration import sample_from_model

    index = cache / SHARD_INDEX
    body = seq_len - (1 if getattr(tokenizer, "bos_token_id", None) is not None else 0)
    if index.is_file():
        meta = json.loads(index.read_text())
        if meta.get("data_free") == {"seed": seed, "seq_len": seq_len} and meta["tokens"] >= (n_tokens // seq_len) * body:
            return cache
    log(f"data-free: sampling {n_tokens} tokens from the teacher (cached in {cache})")
    calib = sample_from_model(teacher, tokenizer, n_tokens, seq_len, seed=seed, batch=batch)
    ids = calib.ids[:, 1:] if getattr(tokenizer, "bos_token_id", None) is not None else calib.ids
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    np.asarray(ids.reshape(-1).tolist(), dtype=dtype).tofile(tmp / "shard_00000.bin")
    (tmp / SHARD_INDEX).write_text(json.dumps({
        "format": "moefy-token-shards-v1", "dtype": np.dtype(dtype).name, "tokens": int(ids.numel()),
        "shards": [{"file": "shard_00000.bin", "tokens": int(ids.numel())}], "sources": ["data-free"],
        "tokenizer": tokenizer_fingerprint(tokenizer), "data_free": {"seed": seed, "seq_len": seq_len},
    }))
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return cache


# ----------------------------------------------------------------------------- mixtures
class MixedData:
    """A weighted mixture of :class:`PackedData` streams (:mod:`moefy.mixture`): training position
    ``n`` is sequence ``index`` of source ``source`` by the mixture's :class:`~moefy.mixture.Schedule`
    (a pure function of the weights), so batches are, as for one stream, a pure function of the
    step; each source holds out its own first sequences (its share of the held-out set)."""

    def __init__(self, parts: list[PackedData], names: list[str], ws: list[float]) -> None:
        from ..mixture import Schedule

        if len({p.seq_len for p in parts}) != 1:
            raise CalibrationDataError("mixture sources must share one sequence length")
        self.parts, self.names, self.ws = parts, names, list(ws)
        self.seq_len = parts[0].seq_len
        self.schedule = Schedule(self.ws)
        self.sources = [s for p in parts for s in p.sources]
        self.val_sequences = sum(p.val_sequences for p in parts)

    def rows(self, start: int, count: int) -> torch.Tensor:
        self.schedule.upto(start + count)
        out = [self.parts[self.schedule.source[n]].rows(self.schedule.index[n], 1)[0] for n in range(start, start + count)]
        return torch.stack(out)

    def batch(self, step: int, micro: int, accum: int, world: int, rank: int, batch_size: int) -> torch.Tensor:
        global_batch = batch_size * accum * world
        return self.rows(step * global_batch + micro * world * batch_size + rank * batch_size, batch_size)

    def val_groups(self) -> list[tuple[str, torch.Tensor]]:
        groups = [(name, p.val_rows()) for name, p in zip(self.names, self.parts)]
        return [(n, r) for n, r in groups if r is not None]

    def val_rows(self) -> torch.Tensor | None:
        groups = self.val_groups()
        return torch.cat([r for _, r in groups]) if groups else None

    def share_report(self, n_sequences: int) -> dict[str, int]:
        """How many of the first ``n_sequences`` training sequences each source gives."""
        self.schedule.upto(n_sequences)
        counts = {name: 0 for name in self.names}
        for s in self.schedule.source[:n_sequences]:
            counts[self.names[s]] += 1
        return counts

    @property
    def n_train_sequences(self) -> int | None:
        return None


class HeldOut:
    """Named held-out sets (several ``--val-data`` files: one set each)."""

    def __init__(self, groups: list[tuple[str, torch.Tensor]]) -> None:
        self.groups = groups

    def val_groups(self) -> list[tuple[str, torch.Tensor]]:
        return self.groups

    def val_rows(self) -> torch.Tensor | None:
        return torch.cat([r for _, r in self.groups]) if self.groups else None


def stream_windows(tokenizer: Any, spec: str, n_sequences: int, seq_len: int) -> torch.Tensor:
    """The first ``n_sequences`` packed sequences of one source in stream order (the calibration
    layout: BOS plus ``seq_len - 1`` stream tokens); too few is one line."""
    data = PackedData(tokenizer, [spec], seq_len)
    rows = []
    for r in data._raw_rows():
        rows.append(r)
        if len(rows) == n_sequences:
            break
    if len(rows) < n_sequences:
        raise CalibrationDataError(f"{spec} holds {len(rows)} sequences of {seq_len} tokens; its share needs {n_sequences}")
    return torch.stack(rows)
