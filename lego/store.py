"""Hard-example stores: rows kept in RAM slabs, float16 rows on disk, and the loader over them.

The memory store keeps exit-layer states in `hard_examples.store_dtype` (`STATE_DTYPES`): per token at
dim d, 4d bytes in float32 (3,072 at d=768), 2d in bfloat16 or float16 (1,536 at d=768); the disk store
writes float16. Rows mined on a CUDA device reach the host through pinned memory without blocking (`HostCopies`).
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import numpy as np
import torch

from lego.batches import SeededBatches, pin_memory_for
from lego.config import STORE_DTYPES


STATE_DTYPES = {name: getattr(torch, name) for name in STORE_DTYPES}  # hard_examples.store_dtype -> torch


class HostCopies:
    """Device rows to the host without waiting: `put(part)` starts a CUDA tensor's copy into pinned memory
    (non_blocking) and hands the previous copy, finished, to `sink`, so a copy overlaps the next batch's
    compute; `flush()` hands over the last one. A CPU tensor goes to `sink` at once (nothing changes on a CPU)."""

    def __init__(self, sink: Callable[[torch.Tensor], None]):
        self.sink, self.pending = sink, None

    def put(self, part: torch.Tensor) -> None:
        if not part.is_cuda:
            self.flush()
            self.sink(part)
            return
        staged = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
        staged.copy_(part, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.flush()
        self.pending = (staged, done)

    def flush(self) -> None:
        if self.pending is not None:
            (staged, done), self.pending = self.pending, None
            done.synchronize()
            self.sink(staged)


class RowBuffer:
    """Rows appended batch after batch, kept in a few large CPU slabs; `tensor()` joins them.

    Keeping every batch's small piece in a list (`pieces.append(t[keep])`) interleaves
    long-lived small blocks with the loop's large temporaries on glibc's heap, whose gaps
    then go unused: mining 24 M training tokens grew by ~2 MB per batch (9.5 GB RSS) while
    keeping 0.5 GB. Slabs of `SLAB_BYTES` are mmap-allocated, off that heap; pieces are
    copied in (from any device) and freed at once.
    """

    SLAB_BYTES = 64 << 20

    def __init__(self):
        self.slabs, self.fill, self.rows = [], 0, 0  # fill: rows used in the last slab; rows: appended so far
        self.copies = HostCopies(self._write)

    def append(self, part: torch.Tensor) -> None:
        self.rows += part.shape[0]
        self.copies.put(part)

    def _write(self, part: torch.Tensor) -> None:
        while part.shape[0]:
            if not self.slabs or self.fill == self.slabs[-1].shape[0]:
                row_bytes = max(part[0].numel() * part.element_size(), 1)
                cap = max(1, self.SLAB_BYTES // row_bytes)
                self.slabs.append(torch.empty((cap, *part.shape[1:]), dtype=part.dtype))
                self.fill = 0
            n = min(part.shape[0], self.slabs[-1].shape[0] - self.fill)
            self.slabs[-1][self.fill:self.fill + n].copy_(part[:n])
            part, self.fill = part[n:], self.fill + n

    def tensor(self, empty: torch.Tensor) -> torch.Tensor:
        """Every row in order as one tensor (`empty` if there is none); releases the slabs."""
        self.copies.flush()
        if not self.slabs:
            return empty
        first = self.slabs[0]
        out = torch.empty((self.rows, *first.shape[1:]), dtype=first.dtype)
        i = 0
        while self.slabs:  # peak: the result plus one slab
            slab = self.slabs.pop(0)
            n = self.fill if not self.slabs else slab.shape[0]
            out[i:i + n] = slab[:n]
            i += n
            del slab
        self.fill = self.rows = 0
        return out


class HalfRowWriter:
    """Appends float16 rows to a file with plain sequential writes.

    Not a writable memmap: every page written through a shared mapping stays resident, and
    counted in the process's RSS, until the mapping goes; 20 M tokens of 128-wide states
    would hold 5 GB. `close()` returns the rows as a `HalfRows` reader.
    """

    def __init__(self, path: str, row_shape):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.row_shape, self.rows = path, tuple(row_shape), 0
        self.file = open(path, "wb")
        self.copies = HostCopies(lambda half: self.file.write(half.contiguous().numpy()))  # its buffer, no copy

    def append(self, part: torch.Tensor) -> None:
        self.copies.put(part.detach().to(torch.float16))  # halved on the device, before the copy
        self.rows += part.shape[0]

    def close(self) -> "HalfRows":
        self.copies.flush()
        self.file.close()
        return HalfRows(self.path, self.rows, self.row_shape)


class HalfRows:
    """Read-only (N, *row_shape) float16 rows in a file; `rows[i]` reads one row with pread.

    Nothing stays mapped, so reading every row of a large store over many epochs keeps memory
    flat (the kernel's page cache holds what it likes, outside the process). `np.asarray(rows)`
    reads them all.
    """

    def __init__(self, path: str, rows: int, row_shape):
        self.path, self.rows, self.row_shape = path, rows, tuple(row_shape)
        self.row_bytes = int(np.prod(self.row_shape)) * 2
        self.dtype = np.dtype(np.float16)
        self._fd, self._pid = None, None

    @property
    def shape(self):
        return (self.rows, *self.row_shape)

    def __len__(self) -> int:
        return self.rows

    def _read(self, offset: int, size: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ValueError(f"hard-example store {self.path} is truncated: wanted {size} bytes at {offset}")
        return data

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not -self.rows <= i < self.rows:
            raise IndexError(f"row {i} out of range for {self.rows} rows")
        i %= self.rows
        return np.frombuffer(self._read(i * self.row_bytes, self.row_bytes), np.float16).reshape(self.row_shape)

    def __array__(self, dtype=None, copy=None):
        a = np.frombuffer(bytearray(self._read(0, self.rows * self.row_bytes)), np.float16).reshape(self.shape)
        return a if dtype is None else a.astype(dtype)

    def __getstate__(self):  # picklable for DataLoader workers: no descriptor travels
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fd=None, _pid=None)

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


class HardExampleDataset(torch.utils.data.Dataset):
    """Rows of (exit-layer states float32, targets), or (inputs, targets) when states are recomputed."""

    def __init__(self, hard_examples: Dict[str, object]):
        self.hidden = hard_examples["hidden_states"]
        self.inputs = hard_examples["inputs"]
        self.targets = hard_examples["targets"]
        if hard_examples.get("all_targets") is not None:  # mined with keep_easy: (N, 2, T) = (hard-only, all)
            self.targets = torch.stack((self.targets, hard_examples["all_targets"]), 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        if self.hidden is None:
            return self.inputs[i], self.targets[i]
        h = self.hidden[i]
        h = torch.from_numpy(np.asarray(h, dtype=np.float32)) if isinstance(h, np.ndarray) else h
        return h, self.targets[i]


def create_hard_example_loader(hard_examples: Dict[str, object], batch_size: int = 64, *, shuffle: bool = True,
                               seed: int = 0, device=None) -> torch.utils.data.DataLoader:
    """Batches of (states or inputs, targets) over whole hard sequences; order set by (seed, epoch).

    With a CUDA `device` the batches come in pinned memory (asynchronous host-to-device copies).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    ds = HardExampleDataset(hard_examples)
    if len(ds) == 0:
        raise ValueError("hard_examples: no hard sequences to batch (is the threshold too low?)")
    return torch.utils.data.DataLoader(ds, pin_memory=pin_memory_for(device),
                                       batch_sampler=SeededBatches(len(ds), batch_size, shuffle, seed, drop_last=False))
