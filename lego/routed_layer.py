"""The routed layer step: one decoder layer over the hard tokens of a batch only (upper_context propagate or
skip), dense parts on the packed hard tokens, attention in a per-sequence padded layout. `Layer.forward_routed`
runs it; training, routed evaluation and mining of later Blocks reach it through `run_layers(..., hard=)`.

With `capacity` (slots per row) the step has static shapes and no host sync, so it compiles: each row's first
`capacity` hard tokens run, the rest overflow and keep their state (`capacity_mask` counts them)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from lego.rope import apply_rope


def layer_routed(layer, x: torch.Tensor, hard: torch.Tensor, policy: str, rope=None,
                 capacity: Optional[int] = None) -> torch.Tensor:
    """Run `layer` (`lego.model.Layer`) for hard tokens only; easy tokens keep their state (copied upward).

    x: (B, T, C); hard: (B, T) bool. Easy tokens run no query, MLP or head. Under
    `propagate` they still give keys/values (from their copied state); under `skip` they
    take no part at all. Returns the new (B, T, C) state.
    capacity: None packs exactly the hard tokens (shapes depend on how many there are: two host syncs);
    an int runs `layer_capacity` instead (static shapes, tokens beyond capacity stay as they are).
    """
    if capacity is not None:
        return layer_capacity(layer, x, hard, policy, rope, capacity)
    B, T, C = x.shape
    nh, hd = layer.num_heads, C // layer.num_heads
    flat = x.reshape(B * T, C)
    idx = hard.reshape(-1).nonzero().squeeze(1)  # (N,) row-major flat positions of the hard tokens
    N = idx.numel()
    if N == 0:
        return x
    tpos = idx % T  # (N,) position of each hard token in its sequence
    # Dense parts (projections, MLP) run on the N hard tokens, unpadded. Only attention needs a
    # per-sequence layout: slot j of row b holds that row's j-th hard token, rows padded to H.
    n_hard = hard.sum(1)  # (B,)
    H = int(n_hard.max())
    slot = (idx // T) * H + hard.cumsum(1).reshape(-1)[idx] - 1  # (N,) flat index into (B * H)
    w_q, w_kv = layer.qkv.weight.split([C, 2 * C], 0)
    b_q, b_kv = layer.qkv.bias.split([C, 2 * C], 0)
    xh = flat.index_select(0, idx)  # (N, C)
    if policy == "propagate":
        normed = layer.norm1(x)  # (B, T, C): every token gives keys/values
        hn = normed.reshape(B * T, C).index_select(0, idx)  # (N, C)
        kv = F.linear(normed, w_kv, b_kv)  # (B, T, 2C)
        k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in kv.split(C, 2))  # (B, nh, T, hd)
        if rope is not None:
            k = apply_rope(k, rope[0][:T], rope[1][:T])
    else:  # skip: keys and values from hard tokens only, packed like the queries
        hn = layer.norm1(xh)
        kv = F.linear(hn, w_kv, b_kv)  # (N, 2C)
        if rope is not None:
            k_, v_ = kv.view(N, 2, nh, hd).unbind(1)
            kv = torch.cat((apply_rope(k_, rope[0][tpos, None], rope[1][tpos, None]), v_), 1).view(N, 2 * C)
        kv = kv.new_zeros(B * H, 2 * C).index_copy(0, slot, kv)
        k, v = (t.view(B, H, nh, hd).transpose(1, 2) for t in kv.split(C, 1))  # (B, nh, H, hd)
    q = F.linear(hn, w_q, b_q)  # (N, C)
    if rope is not None:
        q = apply_rope(q.view(N, nh, hd), rope[0][tpos, None], rope[1][tpos, None]).view(N, C)
    q = q.new_zeros(B * H, C).index_copy(0, slot, q).view(B, H, nh, hd).transpose(1, 2)  # (B, nh, H, hd)
    if policy == "propagate":
        # padding slots sit at position T - 1, so they attend to every key and never yield NaN
        qpos = idx.new_full((B * H,), T - 1).index_copy(0, slot, tpos).view(B, 1, H, 1)
        mask = torch.arange(T, device=x.device).view(1, 1, 1, T) <= qpos  # (B, 1, H, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # packed order is sequence order, so causal over slots is causal over positions
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = y.transpose(1, 2).reshape(B * H, C).index_select(0, slot)  # (N, C)
    xh = xh + layer.attn_out(y)
    xh = xh + layer.mlp(layer.norm2(xh))
    return flat.index_copy(0, idx, xh).view(B, T, C)


# -- fixed capacity: static shapes, no host sync ---------------------------------------------------------------


def routing_capacity(share: float, seq_len: int, slack: float = 0.1, multiple: int = 8) -> int:
    """Slots per row for a calibrated hard share: ceil((share + slack) * seq_len), rounded up to a multiple of
    `multiple` (kernel-friendly shapes), at most `seq_len` (where nothing can overflow).

    share: the hard share the routing threshold was calibrated for; slack: headroom in the same unit (a share of
    the row), for rows harder than the average (a row's share spreads by about sqrt(share (1 - share) / T))."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share={share} must be in [0, 1]")
    if slack < 0 or multiple < 1 or seq_len < 1:
        raise ValueError(f"slack={slack} must be >= 0, multiple={multiple} and seq_len={seq_len} >= 1")
    slots = max(1, math.ceil((share + slack) * seq_len))
    return min(seq_len, -(-slots // multiple) * multiple)


def capacity_mask(hard: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept, overflow) for hard (B, T) bool: kept (B, T) bool marks each row's first `capacity` hard tokens in
    sequence order, the ones a fixed-capacity layer computes; overflow is the number of hard tokens beyond
    capacity over the batch, a 0-dim long tensor on hard's device (no host sync; add it up across calls).
    The mask is the same in every routed layer of a call, so a caller counts overflow once per call."""
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    kept = hard & (hard.cumsum(1) <= capacity)
    return kept, hard.sum() - kept.sum()


def layer_capacity(layer, x: torch.Tensor, hard: torch.Tensor, policy: str, rope, capacity: int) -> torch.Tensor:
    """`layer_routed` with S = min(capacity, T) slots per row: the same states where no row has more than S hard
    tokens; a hard token beyond a row's S-th keeps its state and, under skip, gives no key/value.

    Per row, not per batch: attention needs a per-row layout anyway, and (B, S) has no data-dependent size,
    so dense parts and attention run on static (B, S) shapes, empty slots included (their results are dropped).
    """
    B, T, C = x.shape
    nh, hd = layer.num_heads, C // layer.num_heads
    S = min(capacity, T)
    kept, _ = capacity_mask(hard, S)  # refuses a capacity below 1
    # pos[b, s]: position of row b's s-th kept token; empty slots point at T, a zero state appended to
    # each row (LayerNorm/RMSNorm of zeros is finite). Tokens not kept scatter into a dropped column S.
    slot = torch.where(kept, hard.cumsum(1) - 1, S)  # (B, T)
    pos = torch.full((B, S + 1), T, dtype=torch.long, device=x.device)
    pos = pos.scatter(1, slot, torch.arange(T, device=x.device).expand(B, T))[:, :S]  # (B, S)
    tpos = pos.clamp(max=T - 1)  # empty slots sit at position T - 1: they attend to every key, never NaN
    xe = torch.cat((x, x.new_zeros(B, 1, C)), 1)  # (B, T + 1, C)
    xh = xe.gather(1, pos[..., None].expand(B, S, C))  # (B, S, C)
    w_q, w_kv = layer.qkv.weight.split([C, 2 * C], 0)
    b_q, b_kv = layer.qkv.bias.split([C, 2 * C], 0)
    cos, sin = (None, None) if rope is None else (rope[0][tpos][:, None], rope[1][tpos][:, None])  # (B, 1, S, hd/2)
    if policy == "propagate":
        normed = layer.norm1(x)  # (B, T, C): every token gives keys/values
        hn = normed.gather(1, tpos[..., None].expand(B, S, C))  # (B, S, C)
        kv = F.linear(normed, w_kv, b_kv)  # (B, T, 2C)
        k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in kv.split(C, 2))  # (B, nh, T, hd)
        if rope is not None:
            k = apply_rope(k, rope[0][:T], rope[1][:T])
    else:  # skip: keys and values from the slots only
        hn = layer.norm1(xh)
        kv = F.linear(hn, w_kv, b_kv)  # (B, S, 2C)
        k, v = (t.view(B, S, nh, hd).transpose(1, 2) for t in kv.split(C, 2))  # (B, nh, S, hd)
        if rope is not None:
            k = apply_rope(k, cos, sin)
    q = F.linear(hn, w_q, b_q).view(B, S, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
    if rope is not None:
        q = apply_rope(q, cos, sin)
    if policy == "propagate":
        mask = torch.arange(T, device=x.device).view(1, 1, 1, T) <= tpos.view(B, 1, S, 1)  # (B, 1, S, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # kept tokens fill the first slots in sequence order, empty slots come after them: causal is causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    xh = xh + layer.attn_out(y.transpose(1, 2).reshape(B, S, C))
    xh = xh + layer.mlp(layer.norm2(xh))
    return xe.scatter(1, pos[..., None].expand(B, S, C), xh)[:, :T]  # empty slots write the dropped row T
