"""Routing arithmetic for any number of exits, on the per-token numbers of one unrouted pass.

`lego.analysis.token_outputs` keeps, per counted token, the confidence at each of the K exits
(conf_at_<measure>, (N, K)) and the NLL and top-1 at each exit and the last layer (nll_at,
pred_at, (N, K + 1)). A router is then a stop index per token, (N,) in 0..K (K: the last layer):

    stop = exit_index(tok["conf_at_max_prob"], [t1, t2])      # the first exit with conf >= its threshold
    thresholds = share_thresholds(val["conf_at_max_prob"], 0.3)  # 30% of the tokens reaching each exit stop there
    stop = first_agreeing(tok["pred_at"])                     # the oracle router

Two exits (K = 1) are the same arithmetic, value for value.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from lego.confidence import exact_quantile


def exit_index(conf_at: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """(N,) long: the first exit j whose confidence conf_at[:, j] >= thresholds[j], else K (the last layer).

    The float32 confidences are compared with Python floats, as `lego.evaluation.cascade_exits` routes."""
    K = conf_at.shape[1]
    if len(thresholds) != K:
        raise ValueError(f"{len(thresholds)} thresholds for {K} exits: one per exit")
    stop = torch.full((conf_at.shape[0],), K, dtype=torch.long)
    for j in reversed(range(K)):  # the lowest confident exit is written last
        stop[conf_at[:, j] >= thresholds[j]] = j
    return stop


def share_threshold(conf: torch.Tensor, share: float) -> float:
    """A threshold at which `share` of the tokens exit (ties may add a few): share 0 exits none."""
    if share <= 0.0:
        return float(np.nextafter(np.float32(conf.max()), np.float32(np.inf)))  # just above every confidence
    return exact_quantile(conf, 1.0 - share)  # the same rule ASHEM calibrates with


def share_thresholds(conf_at: torch.Tensor, share: float) -> List[float]:
    """One threshold per exit: at exit j, the one at which `share` of the tokens that reach exit j stop
    there (`share_threshold` over those tokens' confidences). An exit no token reaches stops none."""
    reach = torch.ones(conf_at.shape[0], dtype=torch.bool)
    out = []
    for j in range(conf_at.shape[1]):
        conf = conf_at[:, j] if bool(reach.all()) else conf_at[:, j][reach]
        thr = share_threshold(conf, share) if conf.numel() else float("inf")
        out.append(thr)
        reach = reach & ~(conf_at[:, j] >= thr)
    return out


def first_agreeing(pred_at: torch.Tensor) -> torch.Tensor:
    """(N,) long: the first exit whose top-1 equals the last layer's (K when none does): the oracle router."""
    agree = pred_at[:, :-1] == pred_at[:, -1:]  # (N, K)
    K = agree.shape[1]
    stop = torch.full((pred_at.shape[0],), K, dtype=torch.long)
    for j in reversed(range(K)):
        stop[agree[:, j]] = j
    return stop


def stop_totals(tok: Dict[str, torch.Tensor], stop: torch.Tensor) -> Tuple[List[int], List[float], List[int]]:
    """Per exit and the last layer (K + 1 entries): tokens predicted there, their NLL sum and their correct
    top-1s."""
    y, nll, pred = tok["target"], tok["nll_at"], tok["pred_at"]
    here = [stop == j for j in range(nll.shape[1])]
    return ([int(h.sum()) for h in here], [float(nll[:, j][h].double().sum()) for j, h in enumerate(here)],
            [int((pred[:, j][h] == y[h]).sum()) for j, h in enumerate(here)])
