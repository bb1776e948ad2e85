"""Confidence at an exit, per-token statistics from one log-softmax, and the exact quantile.

A leaf module: calibration (`lego.ashem`), routing (`lego.training`), decoding and the analysis
all compute confidences here, so they agree to the bit.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lego.config import CONFIDENCE_MEASURES, IGNORE_INDEX, check_choice


def confidence_from_logits(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Per-token confidence (..., V) -> (...); higher means more confident for every measure.

    max_prob: max softmax probability (the specification's); margin: top-1 minus top-2
    probability; entropy: negated entropy of the softmax, in nats. Computed from one
    log-softmax, exactly as `token_stats` computes it (calibration, mining and routing agree
    to the bit).
    """
    return token_stats(logits, None, measure)["conf"]


def token_stats(logits: torch.Tensor, targets: Optional[torch.Tensor], measure: Optional[str] = "max_prob",
                ignore_index: int = IGNORE_INDEX, chunk: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """What routing and scoring need per token, from one log-softmax of (..., V) logits of any float dtype.

    Returns (...)-shaped tensors: 'conf' (float32, `measure`; absent when measure is None) and,
    with `targets`, 'nll' (the target's negative log-likelihood; 0 where the target is
    ignore_index) and 'pred' (the top-1 token). Rows go `chunk` at a time (default `chunk_rows`),
    each chunk cast to float32 on its own (float64 logits stay float64): no float32 copy of the whole
    (B, T, V) is ever made (at B=64, T=1024, V=50k that copy alone is 13 GB). Every value is computed
    row by row, so the chunk size changes no bit. Replaces separate softmax, cross entropy, argmax and
    boolean-index passes over the logits (each a full read of them).
    """
    if measure is not None:
        check_choice("confidence", measure, CONFIDENCE_MEASURES)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    flat_t = None if targets is None else targets.reshape(-1)
    rows = chunk_rows(V, logits.device) if chunk is None else chunk
    if rows < 1:
        raise ValueError(f"chunk={chunk} must be a positive number of rows")
    starts = range(0, flat.shape[0], rows) if flat.shape[0] else [0]
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays
    parts = [_row_stats(flat[i:i + rows].to(dtype), None if flat_t is None else flat_t[i:i + rows], measure,
                        ignore_index) for i in starts]
    return {k: torch.cat([p[k] for p in parts]).view(logits.shape[:-1]) for k in parts[0]}


_CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32 logits per chunk on CPU
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26  # 256 MB on a GPU: few kernel launches, a few chunks' worth of temporaries


def chunk_rows(vocab: int, device: torch.device) -> int:
    """`token_stats`' default rows per chunk. CPU: 4 MB of float32 logits, since a whole (B, T, V)
    temporary costs more than the arithmetic (page faults, cache misses); GPU: 256 MB, large
    enough that launches do not dominate, small enough next to the model (V=50k: 1,334 rows)."""
    budget = _CHUNK_ELEMENTS if torch.device(device).type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
    return max(1, budget // vocab)


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


def exit_confidence(routing, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The routing confidence at a model's first exit under `routing` (`lego.config.Routing`): its learned router
    (`routing.probe`, a probe on the exit's hidden state (..., C)) when it has one, else `routing.measure` of the
    exit logits (..., V). (...)"""
    return routing.probe(hidden) if routing.probe is not None else confidence_from_logits(logits, routing.measure)


def compute_confidence(model, hidden_state: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Confidence of the early exit's prediction: the exit head (`output_head`) on `hidden_state`."""
    with model.autocast():
        logits = model.output_head(hidden_state)
    return confidence_from_logits(logits, measure)


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
