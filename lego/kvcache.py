"""Key/value cache for incremental decoding of a `Model`.

The cache is preallocated once per generation: one (L, B, nh, S, hd) tensor each for keys and
values, where slot s of row b holds the token at position s of that row. Rows may have
different lengths (prompts of different lengths, different speculative acceptances): each row
writes at its own positions, and a validity mask per layer group says which slots a query may
attend to. Two groups share a mask: layers 1..exit_layer (group 0) and the layers above it
(group 1), where the `skip` policy leaves exited positions out. Invariant: a slot that is not
valid holds zeros, so a rolled-back draft leaves the cache exactly as if never written.

`CachedModel` runs the model over a cache chunk by chunk (`lego.generate` drives it):

    state = CachedModel(model.eval(), batch=2, slots=64, routing=Routing((threshold,), "propagate"))
    logits, exited = state.prefill(idx, lengths=[5, 3])        # (2, 5, V), (2, 5): right-padded prompts
    logits, exited = state.step(tok, Positions.ragged([5, 3], 1, idx.device))  # one token per row
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from lego.config import Routing
from lego.confidence import exit_confidence
from lego.model import Layer, Model, apply_rope

Mask = Union[None, str, torch.Tensor]  # None: every key below `span`; "causal": aligned from 0; else (R,1,T,span)


@dataclass
class Positions:
    """Where a chunk of T new tokens goes: rows of the cache and each row's positions (= slots).

    rows: (R,) cache rows the chunk belongs to, or None for every row in order.
    start: the common first position when all R rows start there (slice writes), else None.
    pos: (R, T) long positions; needed when `start` is None.
    length: T. span: 1 + the largest position, so keys at or after `span` are never read.
    """

    rows: Optional[torch.Tensor]
    start: Optional[int]
    pos: Optional[torch.Tensor]
    length: int
    span: int

    @staticmethod
    def aligned(start: int, length: int, rows: Optional[torch.Tensor] = None) -> "Positions":
        return Positions(rows, start, None, length, start + length)

    @staticmethod
    def ragged(first: list, length: int, device, rows: Optional[torch.Tensor] = None) -> "Positions":
        """Row r holds positions first[r] .. first[r] + length - 1; aligned when all first[] agree."""
        if len(set(first)) == 1:
            return Positions.aligned(first[0], length, rows)
        pos = torch.tensor(first, device=device).unsqueeze(1) + torch.arange(length, device=device)
        return Positions(rows, None, pos, length, max(first) + length)

    def positions(self, n_rows: int, device) -> torch.Tensor:
        """(R, T) positions, materialised."""
        if self.pos is not None:
            return self.pos
        return (torch.arange(self.start, self.start + self.length, device=device)).expand(n_rows, self.length)


class KVCache:
    """Preallocated keys/values of every layer for `batch` rows and `slots` positions."""

    def __init__(self, model: Model, batch: int, slots: int):
        if slots > model.max_seq_len:
            raise ValueError(f"cache slots {slots} exceed max_seq_len={model.max_seq_len}")
        p = next(model.parameters())
        dtype = torch.bfloat16 if model.precision == "bf16" else p.dtype  # what autocast's projections give
        nh, hd = model.num_heads, model.dim // model.num_heads
        self.k = torch.zeros(model.num_layers, batch, nh, slots, hd, device=p.device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, taken once
        self.valid = torch.zeros(2, batch, slots, dtype=torch.bool, device=p.device)  # per layer group
        self.split = model.exit_layer or model.num_layers  # layer indices >= split are group 1
        self.batch, self.slots = batch, slots

    def mark(self, group: int, at: Positions, flags: Optional[torch.Tensor] = None) -> None:
        """Mark the chunk's slots attendable in `group` (where `flags` (R, T) is True, if given)."""
        valid = self.valid[group]
        if at.rows is None and at.start is not None:
            view = valid[:, at.start:at.start + at.length]
            view.copy_(flags) if flags is not None else view.fill_(True)
            return
        rows = self._rows(at)
        pos = at.positions(rows.numel(), valid.device)
        valid[rows.unsqueeze(1), pos] = True if flags is None else flags

    def mask(self, group: int, at: Positions, dense: bool) -> Mask:
        """The attention mask of the chunk's queries over slots [0, span) of `group`.

        `dense`: every slot below each row's position is valid (no skipped keys), so when the
        chunk's rows are aligned (one common start) a one-token step needs no mask and a chunk
        from 0 is causal.
        A query may always see its own slot, so a query whose own key is not valid (an exited
        position under `skip`, a padding position) gets a finite, unused output, never NaN.
        """
        if dense and at.start is not None:
            if at.length == 1:
                return None
            if at.start == 0:
                return "causal"
        rows = self._rows(at)
        pos = at.positions(rows.numel(), self.valid.device)  # (R, T)
        keys = torch.arange(at.span, device=self.valid.device)
        valid = self.valid[group, :, :at.span].index_select(0, rows)  # (R, span)
        causal = keys <= pos.unsqueeze(2)  # (R, T, span)
        return ((valid.unsqueeze(1) & causal) | (keys == pos.unsqueeze(2))).unsqueeze(1)

    def rollback(self, lengths: torch.Tensor, lo: int, hi: int) -> None:
        """Forget slots >= lengths[b] of every row b within [lo, hi): zeros, not attendable."""
        if hi <= lo:
            return
        keep = torch.arange(lo, hi, device=lengths.device) < lengths.unsqueeze(1)  # (B, hi - lo)
        self.k[:, :, :, lo:hi].mul_(keep.view(1, self.batch, 1, hi - lo, 1))
        self.v[:, :, :, lo:hi].mul_(keep.view(1, self.batch, 1, hi - lo, 1))
        self.valid[:, :, lo:hi] &= keep

    def clear_invalid(self, hi: int) -> None:
        """Zero every slot below `hi` that is not valid (after a prefill wrote padding or skipped keys)."""
        for g, layers in ((0, slice(0, self.split)), (1, slice(self.split, None))):
            keep = self.valid[g, :, :hi].view(1, self.batch, 1, hi, 1)
            self.k[layers, :, :, :hi].mul_(keep)
            self.v[layers, :, :, :hi].mul_(keep)

    def _rows(self, at: Positions) -> torch.Tensor:
        return torch.arange(self.batch, device=self.valid.device) if at.rows is None else at.rows


def rope_at(rope, at: Positions):
    """The rope tables (cos, sin) at the chunk's positions, shaped to broadcast over heads."""
    if rope is None:
        return None
    if at.start is not None:
        return rope[0][at.start:at.start + at.length], rope[1][at.start:at.start + at.length]  # (T, hd/2)
    pos = at.pos
    return rope[0][pos].unsqueeze(1), rope[1][pos].unsqueeze(1)  # (R, 1, T, hd/2)


def embed_at(model: Model, idx: torch.Tensor, at: Positions) -> torch.Tensor:
    """Token ids (R, T) at positions `at` -> layer-0 state (R, T, C), as `model.embed` gives them."""
    emb = model.embedding
    x = emb.tok(idx)
    if emb.pos is not None:
        if at.start is not None:
            x = x + emb.pos.weight[at.start:at.start + at.length]
        else:
            x = x + emb.pos(at.pos)
    return emb.drop(x)


def _write(cache: torch.Tensor, at: Positions, val: torch.Tensor) -> None:
    """cache: (B, nh, S, hd) of one layer; val: (R, nh, T, hd) for the chunk."""
    if at.start is not None:
        if at.rows is None:
            cache[:, :, at.start:at.start + at.length] = val
        else:
            cache[at.rows, :, at.start:at.start + at.length] = val
        return
    rows = torch.arange(cache.shape[0], device=cache.device) if at.rows is None else at.rows
    cache[rows.unsqueeze(1), :, at.pos] = val.transpose(1, 2)  # index (R, T) -> (R, T, nh, hd)


class LayerWeights:
    """A `Layer`'s parameters as plain attributes, taken once per generation.

    A one-token decoding step is dominated by per-op Python overhead, and every module call and
    module attribute lookup adds to it (nn.Module.__getattr__ ran ~100 times per token).
    `norm`/`mlp` call the same functionals as `make_norm`'s modules and `MLP.forward`, on the
    same parameter tensors, so the arithmetic is that of `Layer.forward`.
    """

    __slots__ = ("num_heads", "n1", "n2", "qkv_w", "qkv_b", "out_w", "out_b", "fc_w", "fc_b", "gate_w", "gate_b",
                 "proj_w", "proj_b")

    def __init__(self, layer: Layer):
        self.num_heads = layer.num_heads
        self.n1, self.n2 = _norm_args(layer.norm1), _norm_args(layer.norm2)
        self.qkv_w, self.qkv_b = layer.qkv.weight, layer.qkv.bias
        self.out_w, self.out_b = layer.attn_out.weight, layer.attn_out.bias
        mlp = layer.mlp
        self.fc_w, self.fc_b, self.proj_w, self.proj_b = mlp.fc.weight, mlp.fc.bias, mlp.proj.weight, mlp.proj.bias
        self.gate_w, self.gate_b = (mlp.gate.weight, mlp.gate.bias) if mlp.gate is not None else (None, None)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_w is not None:
            return F.linear(F.silu(F.linear(x, self.gate_w, self.gate_b)) * F.linear(x, self.fc_w, self.fc_b),
                            self.proj_w, self.proj_b)
        return F.linear(F.gelu(F.linear(x, self.fc_w, self.fc_b)), self.proj_w, self.proj_b)


def _norm_args(norm: torch.nn.Module):
    if isinstance(norm, torch.nn.LayerNorm):
        return (F.layer_norm, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return (F.rms_norm, norm.normalized_shape, norm.weight, norm.eps)


def _norm(args, x: torch.Tensor) -> torch.Tensor:
    return args[0](x, *args[1:])


def layer_cached(layer: LayerWeights, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, at: Positions,
                 mask: Mask, rope=None, kv_only: bool = False) -> torch.Tensor:
    """One layer on a chunk of new tokens whose earlier keys/values are cached.

    x: (R, T, C) input states at positions `at`; rope: (cos, sin) already taken at `at`
    (`rope_at`). Writes the chunk's keys/values into the layer's caches, then (unless
    `kv_only`) runs attention over slots [0, span) under `mask` and the MLP, returning the
    (R, T, C) output; with `kv_only` it returns x unchanged (an exited token under
    `propagate`: keys/values from its copied state, nothing else). Same arithmetic as
    `Layer.forward` (eval mode: no dropout).
    """
    R, T, C = x.shape
    nh = layer.num_heads
    hd = C // nh
    h = _norm(layer.n1, x)
    if kv_only:
        k, v = F.linear(h, layer.qkv_w[C:], layer.qkv_b[C:]).view(R, T, 2, nh, hd).unbind(2)
    else:
        q, k, v = F.linear(h, layer.qkv_w, layer.qkv_b).view(R, T, 3, nh, hd).unbind(2)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (R, nh, T, hd)
    if rope is not None:
        k = apply_rope(k, *rope)
    _write(k_cache, at, k)
    _write(v_cache, at, v)
    if kv_only:
        return x
    q = q.transpose(1, 2)
    if rope is not None:
        q = apply_rope(q, *rope)
    keys, values = k_cache[:, :, :at.span], v_cache[:, :, :at.span]
    if at.rows is not None:
        keys, values = keys.index_select(0, at.rows), values.index_select(0, at.rows)
    if isinstance(mask, str):
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    x = x + F.linear(y.transpose(1, 2).reshape(R, T, C), layer.out_w, layer.out_b)
    return x + layer.mlp(_norm(layer.n2, x))


def run_cached(model: Model, layers: List[LayerWeights], cache: KVCache, x: torch.Tensor,
               start: int, end: int, at: Positions, mask: Mask, kv_only: bool = False,
               frozen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Layers start+1 .. end (1-based) on a chunk, all in one layer group, under one mask.

    frozen: (R, T) bool positions that keep their input state through every layer (exited
    tokens under `propagate`: each layer's keys/values come from the same copied state).
    """
    rope = rope_at(model.rope, at)
    for i in range(start, end):
        y = layer_cached(layers[i], x, cache.k_layers[i], cache.v_layers[i], at, mask, rope, kv_only)
        x = y if frozen is None else torch.where(frozen.unsqueeze(-1), x, y)
    return x


# -- a model with a cache ---------------------------------------------------------------------------
class CachedModel:
    """The model's forward over a `KVCache`, chunk by chunk: prefill, one-token steps, the lower
    and upper Blocks separately (for self-speculative drafting and verification).

    With `routing` (`lego.config.Routing`: threshold, confidence measure or learned router, upper_context) it
    routes exactly as the teacher-forced routed forward does; routing=None is the dense model.
    """

    def __init__(self, model: Model, batch: int, slots: int, routing: Optional[Routing] = None):
        if routing is not None and routing.threshold is None:
            raise ValueError("routed decoding needs a routing with the first exit's threshold")
        self.model, self.routing, self.routed = model, routing, routing is not None
        self.cache = KVCache(model, batch, slots)
        self.E = model.exit_layer or model.num_layers
        self.L = model.num_layers
        self.policy = routing.policy if self.routed else "full"
        self.device = self.cache.k.device
        if model.training:
            raise ValueError("generation runs the model in eval mode (no dropout); call model.eval() first")
        self.layers = [LayerWeights(layer) for layer in model.layers]
        # entering a disabled torch.autocast still costs a parameter walk and a context per step
        self.autocast = model.autocast if model.precision == "bf16" else contextlib.nullcontext
        self.ragged_chunks = 0  # chunks run at per-row positions (explicit masks, index writes): the slow path

    def dense_mask(self, group: int) -> bool:
        return not (group == 1 and self.policy == "skip")

    def lower(self, idx: torch.Tensor, at: Positions) -> torch.Tensor:
        """Tokens (R, T) at `at` through layers 1..E -> exit-layer states (R, T, C)."""
        self.ragged_chunks += at.start is None
        self.cache.mark(0, at)
        mask = self.cache.mask(0, at, True)
        return run_cached(self.model, self.layers, self.cache, embed_at(self.model, idx, at), 0, self.E, at, mask)

    def upper(self, h: torch.Tensor, at: Positions, flags: Optional[torch.Tensor] = None,
              kv_only: bool = False, frozen: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exit-layer states (R, T, C) at `at` through layers E+1..L; `flags` marks which
        positions leave attendable keys (skip: the hard ones), `frozen` which keep their state."""
        self.ragged_chunks += at.start is None
        self.cache.mark(1, at, flags)
        mask = None if kv_only else self.cache.mask(1, at, self.dense_mask(1))
        return run_cached(self.model, self.layers, self.cache, h, self.E, self.L, at, mask, kv_only=kv_only,
                          frozen=frozen)

    def exit_logits(self, h):
        return self.model.logits_at(h, self.E).float()

    def deep_logits(self, h):
        return self.model.logits_at(h, self.L).float()

    def prefill(self, idx: torch.Tensor, lengths: List[int]):
        """Right-padded prompts (B, T) -> (logits at every position (B, T, V), exited (B, T)).

        Under routing, positions follow the routed rule of the teacher-forced forward."""
        B, T = idx.shape
        at = Positions.aligned(0, T)
        real = torch.arange(T, device=self.device) < torch.tensor(lengths, device=self.device).unsqueeze(1)
        with self.autocast():
            h = self.lower(idx, at)
            self.cache.valid[0, :, :T] &= real
            if not self.routed:
                self.cache.mark(1, at, real)
                mask = self.cache.mask(1, at, True)
                logits = self.deep_logits(run_cached(self.model, self.layers, self.cache, h, self.E, self.L, at, mask))
                self.cache.clear_invalid(T)
                return logits, torch.zeros(B, T, dtype=torch.bool, device=self.device)
            ex = self.exit_logits(h)
            hard = exit_confidence(self.routing, h, ex) < self.routing.threshold
            flags = real & hard if self.policy == "skip" else real
            h_up = self.upper(h, at, flags, frozen=None if self.policy == "full" else ~hard)
            deep = self.deep_logits(h_up)
        self.cache.clear_invalid(T)
        return torch.where(hard.unsqueeze(-1), deep, ex), ~hard

    def step(self, tok: torch.Tensor, at: Positions):
        """One new token per row (R,) at `at` -> (next-token logits (R, V), exited (R,) bool)."""
        with self.autocast():
            h = self.lower(tok.unsqueeze(1), at)  # (R, 1, C)
            if not self.routed:
                return self.deep_logits(self.upper(h, at))[:, 0], None
            ex = self.exit_logits(h)[:, 0]  # (R, V)
            hard = exit_confidence(self.routing, h[:, 0], ex) < self.routing.threshold
            R = tok.shape[0]
            n_hard = int(hard.sum())  # the one host sync of a routed step
            if n_hard == R:
                return self.deep_logits(self.upper(h, at))[:, 0], ~hard
            if n_hard == 0:
                if self.policy != "skip":  # full: the exact cache; propagate: keys/values of the exit state
                    self.upper(h, at, kv_only=self.policy == "propagate")
                return ex, ~hard
            # a mixed batch. full / propagate: one pass over every row (propagate: easy rows keep their exit
            # state, so their keys/values come from it), no per-subset copies of the cached keys/values.
            # skip: only the hard rows run, over a gathered copy of their cached keys/values; measured at
            # dim 384, batch 8, that is ~10% faster than a pass over every row that clears the easy keys after
            idx = hard.nonzero().squeeze(1)
            if self.policy == "skip":
                h_up = self.upper(h.index_select(0, idx), subset(at, idx))
                return ex.index_copy(0, idx, self.deep_logits(h_up)[:, 0]), ~hard
            h_up = self.upper(h, at, frozen=None if self.policy == "full" else ~hard.unsqueeze(1))
            return ex.index_copy(0, idx, self.deep_logits(h_up.index_select(0, idx))[:, 0]), ~hard


def subset(at: Positions, idx: torch.Tensor) -> Positions:
    """The positions of the chunk's rows `idx` (R',) (indices into at's rows)."""
    cache_rows = idx if at.rows is None else at.rows.index_select(0, idx)
    pos = None if at.pos is None else at.pos.index_select(0, idx)
    return Positions(cache_rows, at.start, pos, at.length, at.span)
