"""Evaluation analysis: the quality-versus-compute curve from one pass, the oracle router,
confidence diagnostics, and pictures.

With `upper_context='full'` every token runs every layer, so a hard token's deep prediction does
not depend on which other tokens exited. One pass that keeps, per counted token, the confidence
at the exit layer, the target's NLL and the top-1 at both exits therefore gives the routed
model's exact metrics for any threshold (`routed_from_tokens`); everything here is arithmetic
on that pass:

    tok = token_outputs(model, test_loader, "cpu", exit_layer=2)
    stats = routed_from_tokens(tok, threshold, measure="max_prob", exit_layer=2, num_layers=4)
    summary = analyze(run_dir / "eval", model=model, loader=test_loader, device="cpu", threshold=threshold,
                      measure="max_prob", exit_layer=2, baselines={"phase-1 model": m1}, vocab_size=V)

`analyze` writes tradeoff.csv, report.md, tokens.html, analysis.json and (with matplotlib:
pip install -e '.[plots]') tradeoff.png; `scripts/plot_tradeoff.py EVAL_DIR` re-plots.
Throughout, "a token" is the target a position predicts: its exit is the exit that predicted it.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from lego.config import CONFIDENCE_MEASURES, IGNORE_INDEX
from lego.cascade import exit_index, first_agreeing, share_threshold, share_thresholds, stop_totals
from lego.confidence import confidence_from_logits, token_stats
from lego.evaluation import exit_table, routed_metrics, summarize
from lego.progress import progress as show_progress

log = logging.getLogger(__name__)

CSV_COLUMNS = ("kind", "target_share", "threshold", "shallow_ratio", "compute_cost", "flop_cost", "ppl", "acc")
METRICS = ("acc", "ppl", "shallow_ratio", "compute_cost")  # what every router and baseline reports
COSTS = ("flop_cost", "wall_cost")  # shown too when a baseline has them
ECE_BINS = 15
BUCKETS = ("frequent", "mid", "rare")
PLOT_HINT = "pip install -e '.[plots]'"


# -- one pass -----------------------------------------------------------------------------------
def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


@torch.no_grad()
def token_outputs(model, loader: Iterable, device, *, exit_layer, measures: Sequence[str] = CONFIDENCE_MEASURES,
                  ignore_index: int = IGNORE_INDEX, progress: bool = True) -> Dict[str, torch.Tensor]:
    """Per-token numbers of one unrouted pass (every token through every layer), on CPU.

    `exit_layer`: the exit layer, or the list of a cascade's exit layers (K exits). Flat tensors over
    the counted tokens (target != ignore_index) in loader order: 'input' (token at the position),
    'target', 'sequence' and 'position' (row in loader order, index in the row); per exit
    f'conf_at_{m}' (N, K) (float32, each exit head's confidence, computed exactly as
    `Trainer.evaluate` routes), 'nll_at' (float32) and 'pred_at' (N, K + 1) at each exit and the
    last layer. The first exit's f'conf_{m}', 'nll_exit', 'pred_exit' and the last layer's
    'nll_deep', 'pred_deep' are (N,) columns of them.
    """
    L = model.num_layers
    exits = _as_list(exit_layer)
    if not 1 <= exits[0] or exits[-1] >= L or any(b <= a for a, b in zip(exits, exits[1:])):
        raise ValueError(f"exit_layer={exit_layer} must increase within [1, num_layers) = [1, {L})")
    if model.deep_head is not None and exits != model.exit_layers:
        raise ValueError(f"exit_layer={exit_layer} differs from the model's exit layers {model.exit_layers}: "
                         "the deep head would read it")
    for m in measures:
        if m not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure={m!r} is not allowed; choose one of {', '.join(CONFIDENCE_MEASURES)}")
    model.eval()
    first = measures[0] if measures else None
    parts: Dict[str, list] = {}
    rows = 0
    for inputs, targets in show_progress(loader, desc="analysis", enabled=progress):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        B, T = targets.shape
        valid = targets != ignore_index
        conf: Dict[str, list] = {m: [] for m in measures}
        nll, pred = [], []
        with model.autocast():  # the model's precision, as calibration and Trainer.evaluate run it
            h = model.embed(inputs)
        start = 0
        for layer in exits:  # as lego.evaluation.cascade_exits computes each exit (upper_context='full')
            with model.autocast():
                h = model.run_layers(h, start, layer)  # (B, T, C)
                logits = model.logits_at(h, layer)  # (B, T, V)
            st = token_stats(logits, targets, first, ignore_index)
            for m in measures:
                conf[m].append((st["conf"] if m == first else confidence_from_logits(logits, m))[valid])
            nll.append(st["nll"][valid])
            pred.append(st["pred"][valid])
            start = layer
        with model.autocast():
            h_deep = model.run_layers(h, start, L)
            deep_logits = model.logits_at(h_deep[valid], L)  # (N, V)
        y = targets[valid]
        deep = token_stats(deep_logits, y, None)  # (N,)
        grid = torch.stack(torch.meshgrid(torch.arange(rows, rows + B, device=device),
                                          torch.arange(T, device=device), indexing="ij"))  # (2, B, T)
        batch = {
            "input": inputs[valid], "target": y, "sequence": grid[0][valid], "position": grid[1][valid],
            **{f"conf_at_{m}": torch.stack(c, 1) for m, c in conf.items()},  # (N, K)
            "nll_at": torch.stack([*nll, deep["nll"]], 1), "pred_at": torch.stack([*pred, deep["pred"]], 1),
        }
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.cpu())
        rows += B
    if not parts or sum(len(p) for p in parts["target"]) == 0:
        raise ValueError("loader: no tokens to analyze (empty loader or all targets ignored)")
    tok = {key: torch.cat(value) for key, value in parts.items()}
    tok.update({f"conf_{m}": tok[f"conf_at_{m}"][:, 0] for m in measures})
    tok.update(nll_exit=tok["nll_at"][:, 0], nll_deep=tok["nll_at"][:, -1],
               pred_exit=tok["pred_at"][:, 0], pred_deep=tok["pred_at"][:, -1])
    return tok


def _conf(tok: Dict[str, torch.Tensor], measure: str, *, every_exit: bool = False) -> torch.Tensor:
    """The first exit's confidences (N,), or with `every_exit` every exit's (N, K)."""
    key = f"conf_at_{measure}" if every_exit else f"conf_{measure}"
    if key not in tok:
        have = [k[len("conf_"):] for k in tok if k.startswith("conf_") and not k.startswith("conf_at_")]
        raise ValueError(f"measure={measure!r} was not gathered; token_outputs has {', '.join(have)}")
    return tok[key]


def with_stops(tok: Dict[str, torch.Tensor], stop: torch.Tensor, exit_layer, num_layers: int) -> dict:
    """The specification's metrics (and the per-exit table `exits`) when each token is predicted at exit
    stop[i] (`lego.cascade`; K = len(exit_layer): the last layer)."""
    counts, nll, correct = stop_totals(tok, stop)
    n, exits = tok["target"].numel(), _as_list(exit_layer)
    return {**summarize(sum(nll), sum(correct), n, counts[:-1], exits, num_layers),
            "exits": exit_table(exits + [num_layers], counts, nll, correct, n, [None] * len(counts))}


def routed_from_tokens(tok: Dict[str, torch.Tensor], threshold, *, measure: str, exit_layer,
                       num_layers: int) -> dict:
    """What `Trainer.evaluate` returns with this threshold (a list of one per exit for a cascade, with
    `exit_layer` the list of exit layers) under upper_context='full', from one pass."""
    exits, thresholds = _as_list(exit_layer), _as_list(threshold)
    stop = exit_index(_conf(tok, measure, every_exit=True), thresholds)
    counts, nll, correct = stop_totals(tok, stop)
    y = tok["target"]
    out = routed_metrics(sum(nll), sum(correct), y.numel(), counts[:-1],
                         float(tok["nll_exit"].double().sum()), int((tok["pred_exit"] == y).sum()),
                         nll[-1], threshold=thresholds[0], exit_layer=exits, num_layers=num_layers)
    if len(exits) > 1:  # as Trainer.evaluate reports a cascade
        out.update(exit_layers=exits, thresholds=[float(t) for t in thresholds])
    out["exits"] = exit_table(exits + [num_layers], counts, nll, correct, y.numel(), [*thresholds, None])
    return out


def tradeoff_curve(tok: Dict[str, torch.Tensor], *, measure: str, exit_layer, num_layers: int,
                   calibrated_threshold, step: float = 0.05,
                   choose: Optional[Dict[str, torch.Tensor]] = None) -> List[dict]:
    """Rows (CSV_COLUMNS) for exit shares 0, step, ..., 1 ('grid'), then the calibrated threshold(s).

    Each grid row's thresholds send that share of the tokens reaching each exit out there
    (`share_thresholds`) on `choose` (the validation split's tokens; default `tok` itself), and the
    row reports `tok`'s numbers at them: nothing is chosen on the split the curve reports. Share 0 is
    the full-depth model; share 1 the first exit. A cascade's rows also give each exit's threshold
    (threshold_<layer>) and the share of all tokens predicted at each exit (share_<layer>).
    """
    n_steps = round(1.0 / step)
    if step <= 0 or not math.isclose(n_steps * step, 1.0, rel_tol=1e-9):
        raise ValueError(f"step={step} must divide 1 (0.05, 0.1, 0.25, ...)")
    conf = _conf(tok if choose is None else choose, measure, every_exit=True)
    targets = [("grid", i / n_steps, share_thresholds(conf, i / n_steps)) for i in range(n_steps + 1)]
    targets.append(("calibrated", None, [float(t) for t in _as_list(calibrated_threshold)]))
    exits = _as_list(exit_layer)
    rows = []
    for kind, share, thr in targets:
        m = routed_from_tokens(tok, thr, measure=measure, exit_layer=exits, num_layers=num_layers)
        row = {"kind": kind, "target_share": share, **{k: m[k] for k in CSV_COLUMNS[2:] if k in m}}
        if len(exits) > 1:
            row.update({f"threshold_{e}": t for e, t in zip(exits, thr)})
            row.update({f"share_{e['layer']}": e["share"] for e in m["exits"]})
        rows.append(row)
    return rows


def oracle_router(tok: Dict[str, torch.Tensor], *, exit_layer, num_layers: int) -> dict:
    """A token stops at the first exit whose top-1 equals the last layer's (`first_agreeing`).

    The most tokens any router can send out early while keeping every deep prediction; its
    accuracy equals the full-depth model's by definition (checked here).
    """
    out = with_stops(tok, first_agreeing(tok["pred_at"]), exit_layer, num_layers)
    if round(out["acc"] * out["n_tokens"]) != int((tok["pred_deep"] == tok["target"]).sum()):
        raise AssertionError("oracle router: accuracy differs from the full-depth model's")
    return out


def compute_saved_at(tok: Dict[str, torch.Tensor], *, measure: str, exit_layer, num_layers: int,
                     max_ppl_increase: float = 0.01, choose: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """The most compute a threshold saves with ppl <= (1 + max_ppl_increase) x full depth.

    The threshold is chosen on `choose` (the validation split's tokens; default `tok` itself), then
    reported on `tok`: {"chosen_on": ..., "threshold", "chosen": the numbers where it was chosen, and
    `tok`'s numbers (compute_saved, shallow_ratio, compute_cost, ppl, acc) at the top level}. One exit:
    an exact search over every cut point between distinct confidences. A cascade: the best of the
    shared exit shares 0, 0.01, ..., 1 (`share_thresholds`; "thresholds" lists one per exit).
    """
    ref = tok if choose is None else choose
    kw = dict(measure=measure, exit_layer=exit_layer, num_layers=num_layers)
    if len(_as_list(exit_layer)) > 1:
        conf_at = _conf(ref, measure, every_exit=True)
        limit = with_stops(ref, torch.full_like(ref["target"], conf_at.shape[1]), exit_layer, num_layers)["ppl"]
        shares = (share_thresholds(conf_at, i / 100) for i in range(101))
        rows = [routed_from_tokens(ref, thr, **kw) for thr in shares]
        chosen = min((r for r in rows if r["shallow_ratio"] == 0 or r["ppl"] <= limit * (1 + max_ppl_increase)),
                     key=lambda r: r["compute_cost"])  # share 0 (full depth) always qualifies
        thr = chosen["thresholds"]
        m = routed_from_tokens(tok, thr, **kw)
        extra = {"thresholds": thr}
    else:
        conf = _conf(ref, measure)
        n = conf.numel()
        c, order = torch.sort(conf, descending=True, stable=True)
        gain = (ref["nll_exit"] - ref["nll_deep"])[order].double()
        deep_total = float(ref["nll_deep"].double().sum())
        nll_k = deep_total + torch.cat([gain.new_zeros(1), gain.cumsum(0)])  # (n + 1,): the k most confident exit
        cut = torch.ones(n + 1, dtype=torch.bool)
        cut[1:n] = c[:-1] != c[1:]  # a threshold can only separate distinct confidences
        ok = cut & (nll_k / n <= math.log1p(max_ppl_increase) + deep_total / n)
        k = int(ok.nonzero().max())  # k = 0 always qualifies
        thr = share_threshold(conf, 0.0) if k == 0 else float(c[k - 1])
        chosen = routed_from_tokens(ref, thr, **kw)
        m = routed_from_tokens(tok, thr, **kw)
        extra = {}
    keys = ("shallow_ratio", "compute_cost", "ppl", "acc")
    return {"max_ppl_increase": max_ppl_increase, "threshold": _as_list(thr)[0], **extra,
            "chosen_on": "this split" if choose is None else "validation",
            "chosen": {"compute_saved": 1.0 - chosen["compute_cost"], **{key: chosen[key] for key in keys}},
            "compute_saved": 1.0 - m["compute_cost"], **{key: m[key] for key in keys}}


def ppl_compute_area(rows: List[dict]) -> dict:
    """Trapezoid area under ppl against compute_cost over the grid rows (lower is better), and that
    area over the width of the compute range (the mean ppl across it, comparable between depths)."""
    pts = sorted((r["compute_cost"], r["ppl"]) for r in rows if r["kind"] == "grid")
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    width = pts[-1][0] - pts[0][0]
    return {"ppl_compute_auc": area, "ppl_compute_auc_per_unit": area / width if width > 0 else float("nan"),
            "compute_range": [pts[0][0], pts[-1][0]]}


# -- confidence diagnostics ---------------------------------------------------------------------
def _np(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (Mann-Whitney U / (n_pos * n_neg)).

    Ties count 1/2 (average ranks). NaN when one class is absent.
    """
    s, pos = _np(scores, np.float64), _np(labels, bool)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]  # 1-based average rank of each value's tie group
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(conf, correct, n_bins: int = 15) -> float:
    """sum_b (n_b / n) |accuracy_b - mean confidence_b| over equal-width bins (b/n_bins, (b+1)/n_bins];
    a confidence of 0 falls in the first bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins} must be >= 1")
    c, ok = _np(conf, np.float64), _np(correct, np.float64)
    if c.size == 0:
        raise ValueError("expected_calibration_error: no confidences")
    b = np.clip(np.ceil(c * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(b, weights=ok, minlength=n_bins) - np.bincount(b, weights=c, minlength=n_bins)
    return float(np.abs(gap).sum() / c.size)


# -- where the hard tokens are ------------------------------------------------------------------
def frequency_buckets(counts: np.ndarray) -> np.ndarray:
    """Bucket per vocabulary id (0 frequent, 1 mid, 2 rare) by thirds of the training token mass.

    Types sorted by training count: 'frequent' are the most frequent types that start within the
    first third of all training tokens, 'mid' the second third, 'rare' the rest (unseen types too).
    """
    total = counts.sum()
    if total == 0:
        raise ValueError("train_tokens: empty")
    order = np.argsort(-counts, kind="stable")
    before = (np.cumsum(counts[order]) - counts[order]) / total  # mass of the more frequent types
    bucket = np.empty(len(counts), dtype=np.int64)
    bucket[order] = np.where(before < 1 / 3, 0, np.where(before < 2 / 3, 1, 2))
    return bucket


BUCKET_METHOD = ("Buckets are thirds of the training-split token mass: vocabulary types sorted by training "
                 "frequency; 'frequent' = the types that make up the first third of all training tokens, "
                 "'mid' the second third, 'rare' the rest (including types never seen in training).")


def exit_share_by_bucket(targets: torch.Tensor, exits: Dict[str, torch.Tensor], counts: np.ndarray) -> dict:
    """Per frequency bucket: its types, training mass, tokens here and the share of them in each mask of `exits`."""
    bucket_of = frequency_buckets(counts)
    b = torch.from_numpy(bucket_of)[targets]
    out = {}
    for i, name in enumerate(BUCKETS):
        here = b == i
        n_here = int(here.sum())
        out[name] = {"n_types": int((bucket_of == i).sum()),
                     "train_mass": float(counts[bucket_of == i].sum() / counts.sum()), "n_tokens": n_here}
        for key, mask in exits.items():
            out[name][key] = float(mask[here].double().mean()) if n_here else float("nan")
    return out


def _decode(i: int, tokenizer) -> str:
    return tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i))


def top_tokens(targets: torch.Tensor, chosen: torch.Tensor, vocab_size: int, *, k: int = 20,
               tokenizer=None) -> List[dict]:
    """The `k` most common targets among `chosen` tokens: id, token, count, and the share of that
    target's occurrences that were chosen."""
    total = torch.bincount(targets, minlength=vocab_size).numpy()
    count = torch.bincount(targets[chosen], minlength=vocab_size).numpy()
    ids = np.lexsort((np.arange(len(count)), -count))[:k]  # most common first, ties by id
    return [{"id": int(i), "token": _decode(i, tokenizer), "count": int(count[i]),
             "share_of_occurrences": int(count[i]) / int(total[i])} for i in ids if count[i] > 0]
