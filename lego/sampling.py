"""Sampling the next token: temperature, top-k, nucleus top-p, and the greedy/sampling `Sampler`.

    sampler = Sampler(temperature=0.8, top_k=50, top_p=None, gen=torch.Generator().manual_seed(0))
    tok = sampler(logits)  # (R, V) -> (R,)
"""

from __future__ import annotations

import torch


def probabilities(logits: torch.Tensor, temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """(..., V) logits -> the sampling distribution: temperature, then top-k, then nucleus top-p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(R, V) -> (R,) one draw per row."""
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


class Sampler:
    """Picks next tokens from (R, V) logits: argmax at temperature 0, else a draw from
    `probabilities(...)` with the generator `gen`."""

    def __init__(self, temperature, top_k, top_p, gen):
        self.greedy = temperature == 0
        self.temperature, self.top_k, self.top_p, self.gen = temperature, top_k, top_p, gen

    def probs(self, logits):
        return probabilities(logits, self.temperature, self.top_k, self.top_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if self.greedy else sample(self.probs(logits), self.gen)
