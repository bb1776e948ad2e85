"""What routing really costs: multiply-accumulates per token, by upper-context policy.

The specification's `compute_cost` counts layers: (n_easy * exit_layer + n_hard * L) / (n * L).
It ignores the vocabulary projection (often dearer than a layer), the exit head every token
pays for, and what upper layers still do for easy tokens. `routed_macs` counts what each
policy runs (see `Model.run_layers`):

- full: every token runs every layer; only hard tokens pay for the deep head.
- propagate: easy tokens pay only key/value projections at upper layers; hard queries attend
  over all earlier tokens.
- skip: easy tokens take no part in upper layers; hard queries attend over hard tokens only.

`phase2_step_macs` counts a phase-2 training step the same way (backward = 2x forward).

Training compute (SPEC section 6: a baseline gets the MACs of the whole pipeline it is compared
with): `dense_training_macs` (phase 1, a standard LM, a matched baseline), `mining_macs`
(calibration and hard-example mining: forward through Block 1 and its exit head),
`phase2_training_macs` (lego.pipeline.compute adds them up per training from their records), and
`steps_for_macs` turns a MAC budget into optimizer steps of a dense model. Evaluation passes are not
training compute. Every function takes `exit_rank`: None for full vocabulary heads (`model.exit_head`
separate or tied, dim * V each), r for heads factored at rank r (`lowrank`, r * (dim + V) each; `head_macs`).
Counts are per token, for a causal sequence of `seq_len` (average context (T + 1) / 2);
norms, softmax, residual adds, the embedding lookup and the optimizer are left out.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

POLICIES = ("full", "propagate", "skip")


def layer_macs(dim: int, ffn_mult: int, ffn: str, context: float) -> Dict[str, float]:
    """MACs of one layer for one token attending over `context` keys (q.k and p.v: 2 * dim each)."""
    mlp = (3 if ffn == "swiglu" else 2) * ffn_mult * dim * dim
    return {"q": dim * dim, "kv": 2 * dim * dim, "attn": 2 * dim * context, "out": dim * dim, "mlp": mlp}


def head_macs(dim: int, vocab_size: int, exit_rank: Optional[int] = None) -> float:
    """MACs of one vocabulary head for one token: dim * V, or r * (dim + V) factored at rank r."""
    return dim * vocab_size if exit_rank is None else exit_rank * (dim + vocab_size)


def upper_macs(*, dim: int, ffn_mult: int, ffn: str, seq_len: int, num_upper_layers: int, hard_ratio: float,
               policy: str) -> float:
    """MACs per token (averaged over all tokens) of `num_upper_layers` layers under `policy`, heads excluded."""
    if policy not in POLICIES:
        raise ValueError(f"upper_context={policy!r} is not allowed; choose one of {', '.join(POLICIES)}")
    h, s = hard_ratio, 1.0 - hard_ratio
    ctx = (seq_len + 1) / 2
    parts = layer_macs(dim, ffn_mult, ffn, ctx)
    full_layer = sum(parts.values())
    if policy == "full":
        per_layer = full_layer
    elif policy == "propagate":
        per_layer = h * full_layer + s * parts["kv"]
    else:  # skip: a hard query sees only the hard share of its context
        per_layer = h * sum(layer_macs(dim, ffn_mult, ffn, h * ctx).values())
    return num_upper_layers * per_layer


def routed_macs(*, dim: int, ffn_mult: int, ffn: str, vocab_size: int, seq_len: int, exit_layer: int,
                num_layers: int, shallow_ratio: float, policy: str, exit_layers: Optional[Sequence[int]] = None,
                exit_shares: Optional[Sequence[float]] = None, exit_rank: Optional[int] = None) -> Dict[str, float]:
    """Per-token MACs of routed inference, of the full-depth model, and their ratio (`flop_cost`).

    A cascade passes `exit_layers` (the first is `exit_layer`) and `exit_shares`, the share of all
    tokens predicted at each; between two exits the layers run under `policy` with the tokens that
    reach the upper one as the hard ones, and each later head runs for those tokens only."""
    exits = [exit_layer] if exit_layers is None else list(exit_layers)
    shares = [shallow_ratio] if exit_shares is None else list(exit_shares)
    if exits[0] != exit_layer or len(shares) != len(exits):
        raise ValueError(f"exit_layers={exits} must start with exit_layer={exit_layer}, one share per exit")
    full_layer = sum(layer_macs(dim, ffn_mult, ffn, (seq_len + 1) / 2).values())
    head = head_macs(dim, vocab_size, exit_rank)
    full_depth = num_layers * full_layer + head
    routed = exit_layer * full_layer + head  # every token: Block 1 and the exit head
    reach = 1.0
    for j, share in enumerate(shares):
        top = exits[j + 1] if j + 1 < len(exits) else num_layers
        reach = reach - share  # the tokens that continue past exit j + 1
        routed = routed + upper_macs(dim=dim, ffn_mult=ffn_mult, ffn=ffn, seq_len=seq_len,
                                     num_upper_layers=top - exits[j], hard_ratio=reach,
                                     policy=policy) + reach * head  # the next head for them only
    return {"macs_per_token": routed, "full_depth_macs_per_token": full_depth, "flop_cost": routed / full_depth}


def phase2_step_macs(*, dim: int, ffn_mult: int, ffn: str, vocab_size: int, seq_len: int, exit_layer: int,
                     num_layers: int, hard_ratio: float, policy: str, recompute: bool = False,
                     exit_rank: Optional[int] = None) -> Dict[str, float]:
    """Per-token MACs of one phase-2 training step, of a full-model training step, and their ratio.

    A training step costs its forward plus a backward of twice that. Phase 2 trains the upper
    layers under `policy` and the deep head at hard positions only, from stored exit-layer
    states; with `recompute` it first runs the frozen lower Block forward (no backward).
    The full-model step trains every layer and the head on every token.
    """
    full_layer = sum(layer_macs(dim, ffn_mult, ffn, (seq_len + 1) / 2).values())
    head = head_macs(dim, vocab_size, exit_rank)
    full_step = 3 * (num_layers * full_layer + head)
    upper = upper_macs(dim=dim, ffn_mult=ffn_mult, ffn=ffn, seq_len=seq_len,
                       num_upper_layers=num_layers - exit_layer, hard_ratio=hard_ratio, policy=policy)
    step = 3 * (upper + hard_ratio * head) + (exit_layer * full_layer if recompute else 0.0)
    return {"macs_per_token": step, "full_step_macs_per_token": full_step, "flop_ratio": step / full_step}


def forward_macs_per_token(*, dim: int, ffn_mult: int, ffn: str, vocab_size: int, seq_len: int, num_layers: int,
                           heads: int = 1, exit_rank: Optional[int] = None) -> float:
    """Per-token MACs of a dense forward: `num_layers` full layers and `heads` output heads.

    `heads=0` is a stack of layers alone (e.g. the frozen lower Block recomputed in phase 2);
    `heads=2` a deep-supervision model that takes a loss at two layers.
    """
    if num_layers < 0 or heads < 0:
        raise ValueError(f"num_layers={num_layers} and heads={heads} must be >= 0")
    full_layer = sum(layer_macs(dim, ffn_mult, ffn, (seq_len + 1) / 2).values())
    return num_layers * full_layer + heads * head_macs(dim, vocab_size, exit_rank)


def dense_training_macs(*, tokens: float, dim: int, ffn_mult: int, ffn: str, vocab_size: int, seq_len: int,
                        num_layers: int, heads: int = 1, exit_rank: Optional[int] = None) -> float:
    """MACs of training every layer and head of a dense model on `tokens` tokens: 3x the forward.

    `tokens` counts input positions (batch x seq_len per step), ignored targets included: the
    model runs on them all. Phase 1 is this with `num_layers=phase1.layers`.
    """
    return 3 * tokens * forward_macs_per_token(dim=dim, ffn_mult=ffn_mult, ffn=ffn, vocab_size=vocab_size,
                                               seq_len=seq_len, num_layers=num_layers, heads=heads,
                                               exit_rank=exit_rank)


def mining_macs(*, tokens: float, dim: int, ffn_mult: int, ffn: str, vocab_size: int, seq_len: int,
                exit_layer: int, exit_rank: Optional[int] = None) -> float:
    """MACs of threshold calibration or hard-example mining over `tokens` tokens.

    Forward only, through Block 1 (`exit_layer` layers) and its exit head, for every token scored.
    """
    return tokens * forward_macs_per_token(dim=dim, ffn_mult=ffn_mult, ffn=ffn, vocab_size=vocab_size,
                                           seq_len=seq_len, num_layers=exit_layer, heads=1, exit_rank=exit_rank)


def phase2_training_macs(*, tokens: float, hard_ratio: float, dim: int, ffn_mult: int, ffn: str, vocab_size: int,
                         seq_len: int, exit_layer: int, num_layers: int, policy: str,
                         recompute: bool = False, exit_rank: Optional[int] = None) -> float:
    """MACs of phase 2 over `tokens` tokens of hard sequences (every position, not only hard ones).

    `hard_ratio` is the share of those positions that are hard (trained). Per token this is
    `phase2_step_macs`: the upper layers under `policy` trained (3x), the deep head at hard
    positions only, plus the frozen lower Block's forward when `recompute`
    (`hard_examples.store=recompute`); stored states cost nothing.
    """
    per_token = phase2_step_macs(dim=dim, ffn_mult=ffn_mult, ffn=ffn, vocab_size=vocab_size, seq_len=seq_len,
                                 exit_layer=exit_layer, num_layers=num_layers, hard_ratio=hard_ratio,
                                 policy=policy, recompute=recompute, exit_rank=exit_rank)["macs_per_token"]
    return tokens * per_token


def steps_for_macs(target_macs: float, macs_per_step: float) -> int:
    """Optimizer steps whose MACs come nearest `target_macs` (halves round up), at least 1.

    The matched baseline: `steps_for_macs(pipeline_macs, dense_training_macs(tokens=B * T, ...))` gives a
    dense model the pipeline's training budget to within half of one of its steps.
    """
    if not macs_per_step > 0:
        raise ValueError(f"macs_per_step={macs_per_step!r} must be positive")
    if not target_macs >= 0:
        raise ValueError(f"target_macs={target_macs!r} must be >= 0")
    return max(1, math.floor(target_macs / macs_per_step + 0.5))
