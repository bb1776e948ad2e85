"""ASHEM: Adaptive Supervision via Hard Example Mining.

Phase 1 trains a shallow model on every token. Its confidence at the exit layer splits tokens
into easy (>= threshold, exit there) and hard (< threshold, continue). The threshold is the
exact `target_ratio` quantile of confidences on a calibration split. Phase 2 trains only the
upper Block of a grown model on the hard tokens, keeping their left context (SPEC section 4):

    threshold = compute_confidence_threshold(model, val_loader, target_ratio=0.5, device="cpu")
    hard = collect_hard_examples(model, train_loader, threshold, "cpu")
    big = model.grow(4, routing_threshold=threshold)
    batches = create_hard_example_loader(hard, batch_size=64)
    loss = train_upper_layers(big, batches, optimizer, vocab_size, "cpu", num_lower_layers=2)
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lego import distributed

log = logging.getLogger(__name__)

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")
STORES = ("memory", "disk", "recompute")
IGNORE_INDEX = -100


def confidence_from_logits(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Per-token confidence (..., V) -> (...); higher means more confident for every measure.

    max_prob: max softmax probability (the specification's); margin: top-1 minus top-2
    probability; entropy: negated entropy of the softmax, in nats. Computed from one
    log-softmax, exactly as `token_stats` computes it (calibration, mining and routing agree
    to the bit).
    """
    return token_stats(logits, None, measure)["conf"]


def token_stats(logits: torch.Tensor, targets: Optional[torch.Tensor], measure: Optional[str] = "max_prob",
                ignore_index: int = IGNORE_INDEX) -> Dict[str, torch.Tensor]:
    """What routing and scoring need per token, from one log-softmax of (..., V) logits.

    Returns (...)-shaped tensors: 'conf' (float32, `measure`; absent when measure is None) and,
    with `targets`, 'nll' (the target's negative log-likelihood; 0 where the target is
    ignore_index) and 'pred' (the top-1 token). On CPU the rows go in chunks of 4 MB: a whole
    (B, T, V) temporary costs more than the arithmetic (page faults, cache misses), and every
    value is computed row by row, so chunks change no bit. Replaces separate softmax, cross
    entropy, argmax and boolean-index passes over the logits (each a full read of them).
    """
    if measure is not None and measure not in CONFIDENCE_MEASURES:
        raise ValueError(f"confidence={measure!r} is not allowed; choose one of {', '.join(CONFIDENCE_MEASURES)}")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    flat_t = None if targets is None else targets.reshape(-1)
    rows = max(1, _CHUNK_ELEMENTS // V) if logits.device.type == "cpu" else max(1, flat.shape[0])
    starts = range(0, flat.shape[0], rows) if flat.shape[0] else [0]
    parts = [_row_stats(flat[i:i + rows], None if flat_t is None else flat_t[i:i + rows], measure, ignore_index)
             for i in starts]
    return {k: torch.cat([p[k] for p in parts]).view(logits.shape[:-1]) for k in parts[0]}


_CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32 logits per chunk


def _row_stats(logits: torch.Tensor, targets: Optional[torch.Tensor], measure: Optional[str],
               ignore_index: int) -> Dict[str, torch.Tensor]:
    logp = F.log_softmax(logits, dim=-1)
    out = {}
    if measure == "margin":
        top2 = logp.topk(2, dim=-1)
        out["conf"] = top2.values[:, 0].exp() - top2.values[:, 1].exp()
        top_idx = top2.indices[:, 0]
    else:
        top_val, top_idx = logp.max(dim=-1)
        if measure == "max_prob":
            out["conf"] = top_val.exp()
        elif measure == "entropy":
            out["conf"] = (logp.exp() * logp).sum(-1)
    if targets is not None:
        keep = targets != ignore_index
        nll = -logp.gather(1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1)
        out["nll"] = torch.where(keep, nll, torch.zeros_like(nll))
        out["pred"] = top_idx
    return out


def compute_confidence(model, hidden_state: torch.Tensor, measure: Optional[str] = None) -> torch.Tensor:
    """Confidence of the early exit's prediction: the exit head (`output_head`) on `hidden_state`."""
    with model.autocast():
        logits = model.output_head(hidden_state).float()
    return confidence_from_logits(logits, measure or model.confidence)


def exact_quantile(values: torch.Tensor, q: float) -> float:
    """`torch.quantile(values, q)` (linear interpolation) for any number of values.

    torch.quantile refuses more than 2**24 elements. One `numpy.partition` places both order
    statistics around q*(n-1) in O(n) time with a single copy (10^8 values: ~2 s, ~1 GB).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q} must be in [0, 1]")
    a = values.detach().reshape(-1).cpu().numpy()
    n = a.size
    if n == 0:
        raise ValueError("no values to take a quantile of")
    # torch.quantile's arithmetic (rank = q * (n - 1) and its fraction in the input's precision) where
    # torch.quantile exists; beyond 2**24 values float32 cannot even hold the rank, so use float64.
    small_float = values.dtype in (torch.float32, torch.float64) and n <= 2**24
    dtype = values.dtype if small_float else torch.float64
    rank = torch.tensor(q, dtype=dtype) * (n - 1)
    lo = int(rank.floor())
    hi = min(lo + 1, n - 1)
    part = np.partition(a, [lo, hi] if hi != lo else [lo])
    v_lo, v_hi = (torch.tensor(float(part[i]), dtype=dtype) for i in (lo, hi))
    return float(torch.lerp(v_lo, v_hi, rank - lo))


def _exit_layer(model, exit_layer: Optional[int]) -> int:
    if exit_layer is not None:
        return exit_layer
    return model.exit_layer if model.exit_layer is not None else model.num_layers


def _batches(batches: Iterable, name: str):
    """Yield (inputs, targets); fail with a clear message on an empty loader."""
    empty = True
    for batch in batches:
        empty = False
        yield batch[0], batch[1]
    if empty:
        raise ValueError(f"{name}: the loader yielded no batches")


@torch.no_grad()
def exit_states(model, inputs: torch.Tensor, exit_layer: int, measure: str):
    """(hidden state after `exit_layer` (B, T, C), confidence there (B, T)), under the model's precision."""
    with model.autocast():
        h = model.run_layers(model.embed(inputs), 0, exit_layer)
        logits = model.output_head(h).float()
    return h, confidence_from_logits(logits, measure)


@torch.no_grad()
def gather_confidences(model, batches: Iterable, device, *, exit_layer: Optional[int] = None,
                       measure: Optional[str] = None, ignore_index: int = IGNORE_INDEX,
                       name: str = "val_batches") -> torch.Tensor:
    """Confidences at the exit layer of every counted token, flattened (float32, on CPU).

    Under torch.distributed each rank passes its shard of the batches and gets every rank's
    confidences (in rank order), so a quantile of them is the global one.
    """
    model.eval()
    layer, measure = _exit_layer(model, exit_layer), measure or model.confidence
    out = RowBuffer()
    for inputs, targets in _batches(batches, name):
        _, conf = exit_states(model, inputs.to(device, non_blocking=True), layer, measure)
        out.append(conf[targets.to(device, non_blocking=True) != ignore_index])
    return distributed.all_gather_varlen(out.tensor(torch.empty(0)))


def compute_confidence_threshold(model, val_batches: Iterable, target_ratio: float, device="cpu", *,
                                 exit_layer: Optional[int] = None, measure: Optional[str] = None) -> float:
    """Threshold below which a share `target_ratio` of tokens falls: the exact quantile of confidences.

    Tokens with confidence >= threshold are easy (exit early); the rest are hard. The exit
    layer defaults to the model's `exit_layer`, or its last layer for a phase-1 model.
    """
    check_ratio("target_ratio", target_ratio)
    conf = gather_confidences(model, val_batches, device, exit_layer=exit_layer, measure=measure)
    return exact_quantile(conf, target_ratio)


def check_ratio(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{key}={value!r} must be strictly between 0 and 1")


@torch.no_grad()
def collect_hard_examples(model, batches: Iterable, threshold: float, device="cpu", *,
                          exit_layer: Optional[int] = None, measure: Optional[str] = None,
                          store: str = "memory", store_dir: Optional[str] = None,
                          ignore_index: int = IGNORE_INDEX) -> Dict[str, object]:
    """The sequences that hold at least one hard token, with their context.

    Returns {'inputs' (N, T) long, 'hidden_states' (N, T, C) exit-layer states or None,
    'targets' (N, T) with every easy position set to `ignore_index`, 'confidences' (N, T),
    'num_tokens', 'num_hard'}. `store`: "memory" keeps float32 states in RAM, "disk" writes
    float16 states to a file in `store_dir` and reads rows back on demand (`HalfRows`),
    "recompute" keeps no states (the loader recomputes them through the frozen lower Block).
    """
    if store not in STORES:
        raise ValueError(f"store={store!r} is not allowed; choose one of {', '.join(STORES)}")
    if store == "disk" and not store_dir:
        raise ValueError("store='disk' needs store_dir")
    model.eval()
    layer, measure = _exit_layer(model, exit_layer), measure or model.confidence
    inputs_b, targets_b, conf_b, hidden_b = RowBuffer(), RowBuffer(), RowBuffer(), RowBuffer()
    disk, n_tok, n_hard = None, 0, 0
    for inputs, targets in tqdm(_batches(batches, "batches"), desc="hard examples", leave=False, disable=None):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        h, conf = exit_states(model, inputs, layer, measure)
        valid = targets != ignore_index
        hard = (conf < threshold) & valid
        n_tok += int(valid.sum())
        n_hard += int(hard.sum())
        keep = hard.any(dim=1)
        if not keep.any():
            continue
        inputs_b.append(inputs[keep])
        targets_b.append(torch.where(hard, targets, torch.full_like(targets, ignore_index))[keep])
        conf_b.append(conf[keep])
        if store == "memory":
            hidden_b.append(h[keep].float())
        elif store == "disk":
            if disk is None:
                disk = HalfRowWriter(os.path.join(store_dir, "hidden_states.f16"), h.shape[1:])
            disk.append(h[keep])
    if not inputs_b.rows:
        log.warning("collect_hard_examples: no token fell below threshold %.6g", threshold)
    hidden = None
    if store == "memory" and hidden_b.rows:
        hidden = hidden_b.tensor(None)
    elif store == "disk" and disk is not None:
        hidden = disk.close()
    return {
        "inputs": inputs_b.tensor(torch.empty(0, 0, dtype=torch.long)),
        "hidden_states": hidden,
        "targets": targets_b.tensor(torch.empty(0, 0, dtype=torch.long)),
        "confidences": conf_b.tensor(torch.empty(0, 0)),
        "num_tokens": n_tok,
        "num_hard": n_hard,
    }


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
        self.slabs, self.fill, self.rows = [], 0, 0  # fill: rows used in the last slab

    def append(self, part: torch.Tensor) -> None:
        while part.shape[0]:
            if not self.slabs or self.fill == self.slabs[-1].shape[0]:
                row_bytes = max(part[0].numel() * part.element_size(), 1)
                cap = max(1, self.SLAB_BYTES // row_bytes)
                self.slabs.append(torch.empty((cap, *part.shape[1:]), dtype=part.dtype))
                self.fill = 0
            n = min(part.shape[0], self.slabs[-1].shape[0] - self.fill)
            self.slabs[-1][self.fill:self.fill + n].copy_(part[:n])
            part, self.fill, self.rows = part[n:], self.fill + n, self.rows + n

    def tensor(self, empty: torch.Tensor) -> torch.Tensor:
        """Every row in order as one tensor (`empty` if there is none); releases the slabs."""
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

    def append(self, part: torch.Tensor) -> None:
        self.file.write(part.detach().to("cpu", torch.float16).contiguous().numpy())  # its buffer, no copy
        self.rows += part.shape[0]

    def close(self) -> "HalfRows":
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
    from lego.data import pin_memory_for
    from lego.training import EpochShuffleSampler

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    ds = HardExampleDataset(hard_examples)
    if len(ds) == 0:
        raise ValueError("hard_examples: no hard sequences to batch (is the threshold too low?)")
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, pin_memory=pin_memory_for(device),
                                       sampler=EpochShuffleSampler(len(ds), seed, shuffle=shuffle))


def upper_states(model, batch_x: torch.Tensor, num_lower_layers: int) -> torch.Tensor:
    """States after the lower Block: stored ones as they are, or recomputed from token ids
    (under the model's precision, as mining computed the stored ones)."""
    if batch_x.dtype in (torch.int64, torch.int32):
        with torch.no_grad(), model.autocast():
            was = [m.training for m in model.layers[:num_lower_layers]]
            model.embedding.eval()
            for m in model.layers[:num_lower_layers]:
                m.eval()
            h = model.run_layers(model.embed(batch_x), 0, num_lower_layers)
            for m, w in zip(model.layers[:num_lower_layers], was):
                m.train(w)
        return h
    return batch_x.float()


def upper_logits(model, h: torch.Tensor, targets: torch.Tensor, num_lower_layers: int,
                 ignore_index: int = IGNORE_INDEX, policy: Optional[str] = None):
    """Deep-exit logits at the hard positions only (N_hard, V) float32, under the model's
    precision, and their targets (N_hard,)."""
    hard = targets != ignore_index
    with model.autocast():
        h = model.run_layers(h, num_lower_layers, model.num_layers, hard=hard, policy=policy)
        logits = model.logits_at(h[hard], model.num_layers).float()
    return logits, targets[hard]


def train_upper_layers(model_extended, hard_batches: Iterable, optimizer, vocab_size: int, device="cpu",
                       num_lower_layers: int = 2, *, grad_clip: Optional[float] = 1.0,
                       policy: Optional[str] = None, ignore_index: int = IGNORE_INDEX) -> float:
    """One pass over `hard_batches` training the layers above `num_lower_layers`; mean loss per hard token.

    The loss is cross-entropy at the last layer over hard positions only (easy positions
    carry `ignore_index`). Warns when the early exit's head is trainable, since training it
    would move the exit's confidences away from the calibrated threshold. Under
    torch.distributed every rank must pass the same number of batches; gradients are averaged
    over ranks (DDP) and the returned loss is over every rank's hard tokens.
    """
    model = model_extended
    if model.output_head.proj.weight.requires_grad and model.deep_head is None and model.exit_layer is not None:
        log.warning("output_head is trainable and shared with the early exit: exit confidences will drift "
                    "from the calibrated threshold (use model.grow(..., deep_head=True) or freeze it)")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, count = torch.zeros((), device=device), 0
    loss_fn = distributed.data_parallel(
        model, lambda m, x, t: _upper_loss(m, x, t, num_lower_layers, ignore_index, policy), device)
    for x, targets in _batches(hard_batches, "hard_batches"):
        x, targets = x.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        # n is a host int: the boolean index that picks the hard positions has synced already
        loss, n = loss_fn(x, targets)
        if n == 0 and not distributed.is_distributed():  # (every rank must step together under DDP)
            continue
        optimizer.zero_grad(set_to_none=True)
        (loss / max(n, 1)).backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        loss_sum += loss.detach()
        count += n
    loss_sum, count = distributed.all_reduce_sum([float(loss_sum), count])
    return loss_sum / max(count, 1)


def _upper_loss(model, x: torch.Tensor, targets: torch.Tensor, num_lower_layers: int, ignore_index: int,
                policy: Optional[str]):
    """Summed cross-entropy at the last layer over the hard positions of one batch, and their count."""
    h = upper_states(model, x, num_lower_layers)
    logits, y = upper_logits(model, h, targets, num_lower_layers, ignore_index, policy)
    return F.cross_entropy(logits, y, reduction="sum"), y.numel()


@torch.no_grad()
def evaluate_on_hard_examples(model, hard_batches: Iterable, vocab_size: int = None, device="cpu",
                              num_lower_layers: int = 2, *, policy: Optional[str] = None,
                              ignore_index: int = IGNORE_INDEX) -> Dict[str, float]:
    """Perplexity and accuracy at the model's last layer on the hard positions alone.

    With `num_lower_layers == model.num_layers` this scores a phase-1 model on the same tokens.
    Under torch.distributed each rank passes its own hard examples and gets the totals of all.
    """
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for x, targets in _batches(hard_batches, "hard_batches"):
        x, targets = x.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        h = upper_states(model, x, num_lower_layers)
        logits, y = upper_logits(model, h, targets, num_lower_layers, ignore_index, policy)
        nll += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += y.numel()
    if distributed.is_distributed():
        nll, correct, count = distributed.all_reduce_sum([nll, correct, count])
        correct, count = int(correct), int(count)
    if count == 0:
        raise ValueError("hard_batches: no hard positions to evaluate")
    return {"loss": nll / count, "ppl": math.exp(nll / count), "acc": correct / count, "n_tokens": count}
