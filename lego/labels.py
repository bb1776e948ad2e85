"""Metrics by token label (data=chains, `lego.chains`), routing against the truth, and the learned router.

    tok = labelled_tokens(model2, labelled_test_loader, "cpu", exit_layer=2, measure="max_prob")
    by = label_table(tok["label"], *routed(tok, tok["conf"] >= threshold)[:2], stop=tok["conf"] >= threshold)
    probe = fit_probe(val_tok["hidden"], val_tok["nll_deep"] < val_tok["nll_exit"])   # CALM's meta measure

A router here is a boolean `stop` per token (True: predicted at the exit, False: sent up to the last
layer), applied to one unrouted pass: exact for upper_context='full', as `lego.analysis` is. Every
per-label table adds up to its 'all' row: token and correct counts exactly, NLL sums in float64
(the 'all' row's sum is the sum of the per-label sums).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import numpy as np
import torch

from lego.chains import UNPREDICTABLE, label_name
from lego.config import IGNORE_INDEX, Routing
from lego.confidence import exact_quantile, exit_confidence, token_stats
from lego.heads import RouterProbe
from lego.progress import progress as show_progress

SOLVED_TOLERANCE = 0.02  # Block 1 "solves" k hops when its accuracy there is within 2 points of the deep exit's


@torch.no_grad()
def labelled_tokens(model, loader: Iterable, device, *, exit_layer: Optional[int] = None, measure: str = "max_prob",
                    hidden: bool = False, ignore_index: int = IGNORE_INDEX, progress: bool = True,
                    routing: Optional[Routing] = None) -> Dict[str, torch.Tensor]:
    """Per counted token (target != ignore_index), in loader order, flat CPU tensors: 'label' (int8; only when
    the loader yields (inputs, targets, labels)), 'nll_deep' (float32), 'ok_deep' (bool) at the model's last
    layer; with `exit_layer` also 'conf' (`measure` at the exit, as routing computes it), 'nll_exit', 'ok_exit',
    and with `hidden` the exit's hidden state 'hidden' (N, C) float32 (the learned router's features).
    With `routing` (`lego.config.Routing`) also the live routed pass, as `Trainer.evaluate` runs it: 'stop' (the
    exit's routing confidence, `lego.confidence.exit_confidence`, at or above its threshold), 'nll_live' and 'ok_live'
    (the exit's for stopped tokens, the last layer's after the upper layers ran the others under its policy)."""
    model.eval()
    L = model.num_layers
    parts: Dict[str, list] = {}
    for batch in show_progress(loader, desc="by label", enabled=progress):
        inputs, targets = batch[0].to(device), batch[1].to(device)
        valid = targets != ignore_index
        out = {"label": batch[2][valid.cpu()]} if len(batch) > 2 else {}
        with model.autocast():
            h = model.embed(inputs)  # (B, T, C)
        if exit_layer is not None:
            with model.autocast():
                h = model.run_layers(h, 0, exit_layer)
                logits = model.logits_at(h, exit_layer)  # (B, T, V)
            st = token_stats(logits, targets, measure, ignore_index)
            out.update(conf=st["conf"][valid], nll_exit=st["nll"][valid], ok_exit=(st["pred"] == targets)[valid])
            if hidden:
                out["hidden"] = h[valid].float()  # (N, C)
        if routing is not None:
            stop = exit_confidence(routing, h, logits) >= routing.threshold
            with model.autocast():
                up = model.logits_at(model.run_layers(h, exit_layer, L, hard=valid & ~stop, policy=routing.policy), L)
            live = token_stats(up, targets, None, ignore_index)
            out.update(stop=stop[valid], nll_live=torch.where(stop, st["nll"], live["nll"])[valid],
                       ok_live=torch.where(stop, st["pred"], live["pred"])[valid] == targets[valid])
        with model.autocast():
            h = model.run_layers(h, exit_layer or 0, L)
            deep = token_stats(model.logits_at(h[valid], L), targets[valid], None, ignore_index)
        out.update(nll_deep=deep["nll"], ok_deep=deep["pred"] == targets[valid])
        for key, value in out.items():
            parts.setdefault(key, []).append(value.cpu())
    if not parts:
        raise ValueError("loader: no tokens")
    return {key: torch.cat(value) for key, value in parts.items()}


def routed(tok: Dict[str, torch.Tensor], stop: torch.Tensor):
    """(nll, ok) per token when `stop` tokens are predicted at the exit and the others at the last layer."""
    return torch.where(stop, tok["nll_exit"], tok["nll_deep"]), torch.where(stop, tok["ok_exit"], tok["ok_deep"])


def label_table(labels: torch.Tensor, nll: torch.Tensor, ok: torch.Tensor,
                stop: Optional[torch.Tensor] = None) -> Dict[str, dict]:
    """{label name: {n_tokens, correct, nll_sum, acc, ppl[, exit_share]}} in label-code order, then 'all':
    the sums of the rows above it (NLL in float64)."""
    lab = labels.numpy().astype(np.int64)
    codes, index = np.unique(lab, return_inverse=True)
    n = np.bincount(index, minlength=len(codes))
    nll_sum = np.bincount(index, weights=nll.numpy().astype(np.float64), minlength=len(codes))
    correct = np.bincount(index, weights=ok.numpy().astype(np.float64), minlength=len(codes)).astype(np.int64)
    exits = None if stop is None else np.bincount(index, weights=stop.numpy().astype(np.float64),
                                                 minlength=len(codes)).astype(np.int64)
    rows = {}
    for i, code in enumerate(codes):
        rows[label_name(code)] = _row(int(n[i]), int(correct[i]), float(nll_sum[i]),
                                      None if exits is None else int(exits[i]))
    total = sum(float(s) for s in nll_sum)  # in code order: the 'all' row is exactly the sum of the rows
    rows["all"] = _row(int(n.sum()), int(correct.sum()), total, None if exits is None else int(exits.sum()))
    return rows


def _row(n: int, correct: int, nll_sum: float, n_exit: Optional[int]) -> dict:
    row = {"n_tokens": n, "correct": correct, "nll_sum": nll_sum, "acc": correct / n, "ppl": math.exp(nll_sum / n)}
    if n_exit is not None:
        row.update(n_exit=n_exit, exit_share=n_exit / n)
    return row


def truth(labels: torch.Tensor, stop: torch.Tensor) -> dict:
    """Routing against the labels: per k the share of k-hop answers sent up, the share of answers of 2+ hops
    sent up, and the share of the tokens sent up that are `unpredictable` (no depth helps them)."""
    lab, up = labels.long(), ~stop
    hops = sorted(int(k) for k in lab.unique() if k > 0)
    deep = lab >= 2
    return {"sent_up_by_hops": {str(k): float(up[lab == k].double().mean()) for k in hops},
            "sent_up_2plus_hops": float(up[deep].double().mean()) if deep.any() else float("nan"),
            "unpredictable_share_of_sent_up": float((lab[up] == UNPREDICTABLE).double().mean()) if up.any()
            else float("nan"),
            "sent_up_share": float(up.double().mean())}


def solved_hops(exit_table: Dict[str, dict], deep_table: Dict[str, dict], tol: float = SOLVED_TOLERANCE) -> int:
    """What Block 1 solves: the largest k such that on every j <= k hops the exit's accuracy is within `tol`
    of the last layer's (0 when it fails at 1 hop). Chosen on the tables of the validation split."""
    k = 0
    while f"{k + 1} hops" in exit_table and \
            exit_table[f"{k + 1} hops"]["acc"] >= deep_table[f"{k + 1} hops"]["acc"] - tol:
        k += 1
    return k


def oracle_by_label(labels: torch.Tensor, solved: int) -> torch.Tensor:
    """The router that knows the labels: every token exits except the answers deeper than `solved` hops."""
    return ~(labels.long() > solved)


# -- the learned router ------------------------------------------------------------------------------
def fit_probe(hidden: torch.Tensor, deep_wins: torch.Tensor, *, l2: float = 1e-3, max_iter: int = 100) -> RouterProbe:
    """L2-regularised logistic regression of `deep_wins` (N,) on standardised `hidden` (N, C), fit by
    full-batch L-BFGS in float64 (deterministic for the same data); the router runs in float32."""
    x = hidden.double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z, y = (x - mean) / scale, deep_wins.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    return RouterProbe(mean, scale, w.detach(), float(b.detach()))


def fit_gain_probe(hidden: torch.Tensor, gain: torch.Tensor, *, l2: float = 1e-3) -> RouterProbe:
    """Ridge regression of `gain` (N,), what the last layer saves on a token (nll_exit - nll_deep), on
    standardised `hidden` (N, C), in closed form in float64 (`l2` x N on the weights, none on the intercept):
    the router scores a token by its negated predicted gain, so the tokens the last layer helps most go up first
    and those no depth helps (a gain near 0, however uncertain the exit) stay. Same probe as `fit_probe`."""
    x = hidden.double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z, y = (x - mean) / scale, gain.double()
    n, c = z.shape
    zc, yc = z - z.mean(0), y - y.mean()  # centred: the intercept is the mean gain at the mean state
    w = torch.linalg.solve(zc.T @ zc + l2 * n * torch.eye(c, dtype=torch.float64), zc.T @ yc)
    b = float(y.mean() - z.mean(0) @ w)
    return RouterProbe(mean, scale, w, b)


def learned_threshold(conf: torch.Tensor, hard_ratio: float) -> float:
    """The threshold that sends the share `hard_ratio` of `conf` up, as calibration does (`exact_quantile`)."""
    return exact_quantile(conf, hard_ratio)


# -- summaries ---------------------------------------------------------------------------------------
def router_summary(tok: Dict[str, torch.Tensor], stop: Optional[torch.Tensor], *, exit_layer: int, num_layers: int,
                   live: bool = False) -> dict:
    """acc, ppl, shallow_ratio, compute_cost of routing by `stop`, and with labels its table and `truth`; `live`:
    the routed pass's own NLL and top-1 ('nll_live', 'ok_live'), else the exit's and the unrouted last layer's."""
    if live:
        stop, nll, ok = tok["stop"], tok["nll_live"], tok["ok_live"]
    else:
        nll, ok = routed(tok, stop)
    n, n_exit = stop.numel(), int(stop.sum())
    nll_sum = float(nll.double().sum())
    out = {"acc": int(ok.sum()) / n, "ppl": math.exp(nll_sum / n), "shallow_ratio": n_exit / n,
           "compute_cost": (n_exit * exit_layer + (n - n_exit) * num_layers) / (n * num_layers), "n_tokens": n}
    if "label" in tok:
        out["by_label"] = label_table(tok["label"], nll, ok, stop)
        out["truth"] = truth(tok["label"], stop)
    return out
