"""What routing really costs: multiply-accumulates per token, by upper-context policy.

The specification's `compute_cost` counts layers: (n_easy * exit_layer + n_hard * L) / (n * L).
It ignores the vocabulary projection (often dearer than a layer), the exit head every token
pays for, and what upper layers still do for easy tokens. `routed_macs` counts what each
policy runs (see `DeepSupervisionTransformer.run_layers`):

- full: every token runs every layer; only hard tokens pay for the deep head.
- propagate: easy tokens pay only key/value projections at upper layers; hard queries attend
  over all earlier tokens.
- skip: easy tokens take no part in upper layers; hard queries attend over hard tokens only.

Counts are per token, for a causal sequence of `seq_len` (average context (T + 1) / 2);
norms, softmax and residual adds are left out.
"""

from __future__ import annotations

from typing import Dict


def layer_macs(dim: int, ffn_mult: int, ffn: str, context: float) -> Dict[str, float]:
    """MACs of one layer for one token attending over `context` keys."""
    mlp = (3 if ffn == "swiglu" else 2) * ffn_mult * dim * dim
    return {"q": dim * dim, "kv": 2 * dim * dim, "attn": 2 * dim * context, "out": dim * dim, "mlp": mlp}


def routed_macs(*, dim: int, ffn_mult: int, ffn: str, vocab_size: int, seq_len: int, exit_layer: int,
                num_layers: int, shallow_ratio: float, policy: str) -> Dict[str, float]:
    """Per-token MACs of routed inference, of the full-depth model, and their ratio (`flop_cost`)."""
    s, h = shallow_ratio, 1.0 - shallow_ratio
    ctx = (seq_len + 1) / 2
    full_layer = sum(layer_macs(dim, ffn_mult, ffn, ctx).values())
    head = dim * vocab_size
    full_depth = num_layers * full_layer + head
    lower = exit_layer * full_layer + head  # every token: Block 1 and the exit head
    upper_layers = num_layers - exit_layer
    if policy == "full":
        upper = upper_layers * full_layer
    elif policy == "propagate":
        parts = layer_macs(dim, ffn_mult, ffn, ctx)
        upper = upper_layers * (h * full_layer + s * parts["kv"])
    elif policy == "skip":
        upper = upper_layers * h * sum(layer_macs(dim, ffn_mult, ffn, h * ctx).values())
    else:
        raise ValueError(f"upper_context={policy!r} is not allowed; choose one of full, propagate, skip")
    routed = lower + upper + h * head  # deep head for hard tokens only
    return {"macs_per_token": routed, "full_depth_macs_per_token": full_depth, "flop_cost": routed / full_depth}
