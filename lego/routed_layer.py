"""The routed layer step: one decoder layer over the hard tokens of a batch only (upper_context propagate or
skip), dense parts on the packed hard tokens, attention in a per-sequence padded layout. `Layer.forward_routed`
runs it; training, routed evaluation and mining of later Blocks reach it through `run_layers(..., hard=)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lego.rope import apply_rope


def layer_routed(layer, x: torch.Tensor, hard: torch.Tensor, policy: str, rope=None) -> torch.Tensor:
    """Run `layer` (`lego.model.Layer`) for hard tokens only; easy tokens keep their state (copied upward).

    x: (B, T, C); hard: (B, T) bool. Easy tokens run no query, MLP or head. Under
    `propagate` they still give keys/values (from their copied state); under `skip` they
    take no part at all. Returns the new (B, T, C) state.
    """
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
