"""Calibration hidden states carried from one decoder layer to the next, batch by batch.

In memory they are a list of tensors.  Spilled, they live in one preallocated file of fixed-size
records (one per batch) in the conversion's work directory, read and written with ``pread`` /
``pwrite`` into and out of a single batch-sized buffer: only the batch in flight is in memory, and
(unlike a memory map) resident file pages never count as the process's memory.  The bytes on disk
are the tensors' own, so a spilled conversion is bit-identical to one held in memory.

Running out of disk space (when the file is allocated, or on a write) is one line of
:class:`moefy.errors.DiskFullError`; the file is removed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from .errors import DiskFullError
from .memory import format_size

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _write(fd: int, data: memoryview, offset: int) -> int:
    """One ``pwrite`` (a seam for tests that simulate a full disk)."""
    return os.pwrite(fd, data, offset)


def _read(fd: int, buf: memoryview, offset: int) -> int:
    return os.preadv(fd, [buf], offset)


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


class ActivationStore:
    """``n_rows`` sequences of hidden states, stored per batch of rows.

    ``put(b, x)`` stores batch ``b`` (``[rows, seq, d]``) and ``get(b)`` returns it (on the CPU).
    With ``spill_path`` the batches go to that file, allocated in full on the first ``put``."""

    def __init__(self, batch_rows: list[int], spill_path: Path | None = None) -> None:
        self.batch_rows = list(batch_rows)
        self.spill_path = spill_path
        self._mem: list[torch.Tensor | None] = [None] * len(self.batch_rows)
        self._fd: int | None = None
        self._row_shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        self._offsets: list[int] = []

    def __len__(self) -> int:
        return len(self.batch_rows)

    @property
    def spilled(self) -> bool:
        return self.spill_path is not None

    def _open(self, x: torch.Tensor) -> None:
        assert self.spill_path is not None
        self._row_shape, self._dtype = tuple(x.shape[1:]), x.dtype
        row_bytes = x[0].numel() * x.element_size()
        self._offsets = [0]
        for rows in self.batch_rows:
            self._offsets.append(self._offsets[-1] + rows * row_bytes)
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.spill_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):  # claim the space now: a full disk fails here, before any fitting
                os.posix_fallocate(self._fd, 0, self._offsets[-1])
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        total = self._offsets[-1] if self._offsets else 0
        self.close()
        if exc.errno in NO_SPACE:
            raise DiskFullError(
                f"disk full while spilling {format_size(total)} of calibration activations to {self.spill_path}; "
                "free space there, lower --calib-tokens, or raise --max-memory"
            ) from None
        raise exc

    def put(self, b: int, x: torch.Tensor) -> None:
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.shape[0] != self.batch_rows[b]:
            raise ValueError(f"batch {b} has {x.shape[0]} rows, expected {self.batch_rows[b]}")
        if self.spill_path is None:
            self._mem[b] = x
            return
        if self._fd is None:
            self._open(x)
        if tuple(x.shape[1:]) != self._row_shape or x.dtype != self._dtype:
            raise ValueError(f"batch {b}: shape {tuple(x.shape)} {x.dtype} differs from the first batch")
        data, offset, end = _bytes_of(x), self._offsets[b], self._offsets[b + 1]
        try:
            done = 0
            while offset + done < end:
                n = _write(self._fd, data[done:], offset + done)  # type: ignore[arg-type]
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError as exc:
            self._fail(exc)

    def get(self, b: int) -> torch.Tensor:
        if self.spill_path is None:
            x = self._mem[b]
            if x is None:
                raise KeyError(f"batch {b} was never stored")
            return x
        if self._fd is None or self._row_shape is None or self._dtype is None:
            raise KeyError(f"batch {b} was never stored")
        out = torch.empty((self.batch_rows[b], *self._row_shape), dtype=self._dtype, device="cpu")  # host memory, read into
        view, offset, end = _bytes_of(out), self._offsets[b], self._offsets[b + 1]
        done = 0
        while offset + done < end:
            n = _read(self._fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short read from {self.spill_path}")
            done += n
        return out

    def close(self) -> None:
        """Release the memory or remove the spill file."""
        self._mem = [None] * len(self.batch_rows)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.spill_path is not None:
            try:
                self.spill_path.unlink()
            except FileNotFoundError:
                pass
