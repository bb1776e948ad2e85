"""Seeded batches: windows of a token stream, an order that depends only on (seed, epoch).

    train = make_loader(corpus.train, 128, 32, shuffle=True, seed=0)   # (B, T) input/target pairs
    train.sampler.set_epoch(3)                                         # replay epoch 3 after a resume
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from lego import distributed
from lego.config import _fail


class _Windows(torch.utils.data.Dataset):
    """Sequence i is tokens[i*(T+1) : (i+1)*(T+1)]; a trailing remainder is dropped. With `labels`
    (one per token), each batch also gives the labels of its targets."""

    def __init__(self, tokens: np.ndarray, seq_len: int, labels: Optional[np.ndarray] = None):
        if labels is not None and len(labels) != len(tokens):
            raise ValueError(f"labels: {len(labels)} for {len(tokens)} tokens")
        self.tokens, self.labels, self.width = tokens, labels, seq_len + 1
        self.n = len(tokens) // self.width

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: List[int]) -> Tuple[torch.Tensor, ...]:
        if isinstance(self.tokens, np.ndarray):
            grid = self.tokens[: self.n * self.width].reshape(self.n, self.width)  # a view, no read
            block = grid[rows]  # (B, T+1), reads only these rows
        else:  # several shards as one stream (lego.shards.ShardedTokens)
            block = self.tokens.windows(rows, self.width)
        block = torch.from_numpy(block.astype(np.int64))
        if self.labels is None:
            return block[:, :-1].contiguous(), block[:, 1:].contiguous()  # (B, T), (B, T)
        lab = self.labels[: self.n * self.width].reshape(self.n, self.width)[rows, 1:]  # (B, T): the targets'
        return block[:, :-1].contiguous(), block[:, 1:].contiguous(), torch.from_numpy(np.array(lab, np.int8))


class SeededBatches(torch.utils.data.Sampler):
    """Lists of row indices, one list per batch: the one seeded order of every loader (token windows and
    hard examples alike). Shuffled, epoch e is a permutation
    drawn from a torch.Generator seeded by (seed, e): each pass over the loader gives a new
    order, the same one in every run; `set_epoch(e)` replays epoch e after a resume. With
    `world_size` > 1, rank r takes batches r, r + world_size, ... of that same epoch, so the
    ranks share out exactly the batches of a single process (DistributedSampler, by batch)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.stop = n - n % batch_size if drop_last else n
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, math.ceil(self.stop / self.batch_size), self.world_size))

    def __iter__(self) -> Iterator[List[int]]:
        order = list(range(self.n))
        if self.shuffle:
            # Mixing (seed, epoch) through a hash keeps seed 1 / epoch 0 apart from seed 0 / epoch 1.
            mixed = hashlib.sha256(f"{self.seed}:{self.epoch}".encode()).digest()[:8]
            g = torch.Generator().manual_seed(int.from_bytes(mixed, "little"))
            order = torch.randperm(self.n, generator=g).tolist()
        self.epoch += 1
        batches = [order[i:i + self.batch_size] for i in range(0, self.stop, self.batch_size)]
        return iter(batches[self.rank::self.world_size])


def _as_is(batch):
    return batch


def make_loader(tokens: np.ndarray, seq_len: int, batch_size: int, *, shuffle: bool, seed: int,
                drop_last: bool = False, rank: int = 0, world_size: int = 1,
                device=None, labels: Optional[np.ndarray] = None) -> torch.utils.data.DataLoader:
    """Batches of (inputs, targets), LongTensors of shape (B, seq_len), targets = inputs
    shifted by one token; with `labels` (one int8 per token, `Corpus.labels`), batches of
    (inputs, targets, the targets' labels (B, seq_len) int8). The stream is cut into
    non-overlapping windows of seq_len + 1 tokens. Same seed, same batches; each new pass
    (epoch) reshuffles deterministically; `loader.sampler.set_epoch(e)` selects epoch e's
    order. `rank`/`world_size`: this rank's share of every epoch's batches (see
    `SeededBatches`); ranks may differ by one batch. With a CUDA `device` the batches come
    in pinned memory, for asynchronous copies to it."""
    if seq_len < 2:
        _fail("seq_len", f"{seq_len} is too small", "an integer >= 2")
    if batch_size < 1:
        _fail("batch_size", f"{batch_size} is too small", "an integer >= 1")
    windows = _Windows(tokens, seq_len, labels)
    if len(windows) == 0:
        _fail("seq_len", f"{seq_len} needs {seq_len + 1} tokens per sequence, but the split has "
              f"{len(tokens)}", f"an integer in [2, {max(len(tokens) - 1, 2)}]")
    sampler = SeededBatches(len(windows), batch_size, shuffle, seed, drop_last, rank, world_size)
    return torch.utils.data.DataLoader(windows, batch_size=None, sampler=sampler, collate_fn=_as_is,
                                       pin_memory=pin_memory_for(device))


def pin_memory_for(device) -> bool:
    """Whether a loader feeding `device` should pin its batches: only for a CUDA device, where
    pinned host memory makes the `non_blocking` copies asynchronous."""
    return device is not None and torch.device(device).type == "cuda"


def set_loader_epoch(loader, epoch: int) -> None:
    """Make epoch `epoch`'s order a function of (seed, epoch) alone, so resumed runs match."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


class EpochSteps:
    """At most `steps` batches of `loader` per epoch; the epoch's seeded order picks which.

    Under torch.distributed `steps` still counts the epoch's batches over all ranks, and every
    rank takes the same number (`distributed.common_steps`).
    """

    def __init__(self, loader, steps: Optional[int]):
        self.loader, self.steps = loader, distributed.common_steps(len(loader), steps)

    def set_epoch(self, epoch: int) -> None:
        set_loader_epoch(self.loader, epoch)

    def __iter__(self):
        return iter(self.loader) if self.steps is None else itertools.islice(self.loader, self.steps)

    def __len__(self) -> int:
        return len(self.loader) if self.steps is None else min(self.steps, len(self.loader))
