"""The vocabulary heads that read an exit (`model.exit_head`): full, tied, or factored at a low rank.

    head = make_head(dim, vocab_size, norm)                # separate: norm + (V, C) projection
    head = make_head(dim, vocab_size, norm, rank=64)       # lowrank: norm + (V, r) @ (r, C)
    deep = make_head(dim, vocab_size, norm, proj=head.proj)  # tied: its own norm, the same projection

- separate: every head is a full norm + projection; with phase2.deep_head the deep exit trains its
  own copy (the exit's stays frozen).
- tied: every head of the model uses the first exit's projection (one (V, C) matrix, as LayerSkip
  shares its LM head). The projection is frozen with Block 1 after phase 1, so the exit's logits stay
  bit-identical; with phase2.deep_head the deep exit trains its own final norm only.
- lowrank: every head factors its projection at rank r (`exit_rank`): r * (C + V) multiply-adds per
  token instead of C * V, the cost every token pays at the exit. With phase2.deep_head the deep exit
  trains its own low-rank copy.
A plain LM (phase 1, a dense baseline) has one head, `output_head`, of the same kind.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)


class OutputHead(nn.Module):
    """Final norm + vocabulary projection; usable on the hidden state of any layer.

    `proj`: a projection to share (exit_head=tied), else a fresh (V, C) one."""

    def __init__(self, dim: int, vocab_size: int, norm: str, proj: Optional[nn.Linear] = None):
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.proj = proj if proj is not None else nn.Linear(dim, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h))  # (..., C) -> (..., V)


class LowRankHead(nn.Module):
    """Final norm + a rank-r vocabulary projection: up(down(norm(h))), (..., C) -> (..., r) -> (..., V)."""

    def __init__(self, dim: int, vocab_size: int, norm: str, rank: int):
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.norm(h)))


def make_head(dim: int, vocab_size: int, norm: str, rank: Optional[int] = None,
              proj: Optional[nn.Linear] = None) -> nn.Module:
    """A low-rank head when `rank` is given, else a full one (sharing `proj` when given)."""
    return LowRankHead(dim, vocab_size, norm, rank) if rank is not None else OutputHead(dim, vocab_size, norm, proj)


class RouterProbe(nn.Module):
    """The learned router (`eval.learned_router`, CALM's "meta" measure): a logistic probe on the first exit's
    hidden state (..., C) -> (...) float32, the negated logit of "the last layer beats the exit on this token";
    higher means safer to exit, as for every confidence measure. Standardises the state by `mean` and `scale`.
    Buffers only: it is fit (`lego.labels.fit_probe`), never trained with the model."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: float):
        super().__init__()
        for name, value in (("mean", mean), ("scale", scale), ("weight", weight)):
            self.register_buffer(name, value.detach().float().clone())
        self.register_buffer("bias", torch.tensor(float(bias)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return -(((h.float() - self.mean) / self.scale) @ self.weight + self.bias)

    @classmethod
    def from_state(cls, state: dict) -> "RouterProbe":
        return cls(state["mean"], state["scale"], state["weight"], float(state["bias"]))
