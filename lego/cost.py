"""What routing really costs: multiply-accumulates per token, by upper-context policy.

The specification's `compute_cost` counts layers: (n_easy * exit_layer + n_hard * L) / (n * L).
It ignores the vocabulary projection (often dearer than a layer), the exit head every token
pays for, and what upper layers still do for easy tokens. `routed_macs` counts what each
policy runs (see `DeepSupervisionTransformer.run_layers`):

- full: every token runs every layer; only hard tokens pay for the deep head.
- propagate: easy tokens pay only key/value projections at upper layers; hard queries attend
  over all earlier tokens.
- skip: easy tokens take no part in upper layers; hard queries attend over hard tokens only.

`phase2_step_macs` counts a phase-2 training step the same way (backward = 2x forward).
Counts are per token, for a causal sequence of `seq_len` (average context (T + 1) / 2);
norms, softmax, residual adds, the embedding lookup and the optimizer are left out.
"""

from __future__ import annotations

from typing import Dict

POLICIES = ("full", "propagate", "skip")


def layer_macs(dim: int, ffn_mult: int, ffn: str, context: float) -> Dict[str, float]:
    """MACs of one layer for one token attending over `context` keys (q.k and p.v: 2 * dim each)."""
    mlp = (3 if ffn == "swiglu" else 2) * ffn_mult * dim * dim
    return {"q": dim * dim, "kv": 2 * dim * dim, "attn": 2 * dim * context, "out": dim * dim, "mlp": mlp}


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
                num_layers: int, shallow_ratio: float, policy: str) -> Dict[str, float]:
    """Per-token MACs of routed inference, of the full-depth model, and their ratio (`flop_cost`)."""
    h = 1.0 - shallow_ratio
    full_layer = sum(layer_macs(dim, ffn_mult, ffn, (seq_len + 1) / 2).values())
    head = dim * vocab_size
    full_depth = num_layers * full_layer + head
    lower = exit_layer * full_layer + head  # every token: Block 1 and the exit head
    upper = upper_macs(dim=dim, ffn_mult=ffn_mult, ffn=ffn, seq_len=seq_len,
                       num_upper_layers=num_layers - exit_layer, hard_ratio=h, policy=policy)
    routed = lower + upper + h * head  # deep head for hard tokens only
    return {"macs_per_token": routed, "full_depth_macs_per_token": full_depth, "flop_cost": routed / full_depth}


def phase2_step_macs(*, dim: int, ffn_mult: int, ffn: str, vocab_size: int, seq_len: int, exit_layer: int,
                     num_layers: int, hard_ratio: float, policy: str, recompute: bool = False) -> Dict[str, float]:
    """Per-token MACs of one phase-2 training step, of a full-model training step, and their ratio.

    A training step costs its forward plus a backward of twice that. Phase 2 trains the upper
    layers under `policy` and the deep head at hard positions only, from stored exit-layer
    states; with `recompute` it first runs the frozen lower Block forward (no backward).
    The full-model step trains every layer and the head on every token.
    """
    full_layer = sum(layer_macs(dim, ffn_mult, ffn, (seq_len + 1) / 2).values())
    head = dim * vocab_size
    full_step = 3 * (num_layers * full_layer + head)
    upper = upper_macs(dim=dim, ffn_mult=ffn_mult, ffn=ffn, seq_len=seq_len,
                       num_upper_layers=num_layers - exit_layer, hard_ratio=hard_ratio, policy=policy)
    step = 3 * (upper + hard_ratio * head) + (exit_layer * full_layer if recompute else 0.0)
    return {"macs_per_token": step, "full_step_macs_per_token": full_step, "flop_ratio": step / full_step}
