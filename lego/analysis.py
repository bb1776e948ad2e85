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

import csv
import html
import io
import logging
import math
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lego.artifacts import atomic_write, write_json
from lego.ashem import CONFIDENCE_MEASURES, IGNORE_INDEX, confidence_from_logits, exact_quantile, token_stats
from lego.training import summarize

log = logging.getLogger(__name__)

CSV_COLUMNS = ("kind", "target_share", "threshold", "shallow_ratio", "compute_cost", "ppl", "acc")
METRICS = ("acc", "ppl", "shallow_ratio", "compute_cost")  # what every router and baseline reports
COSTS = ("flop_cost", "wall_cost")  # shown too when a baseline has them
ECE_BINS = 15
BUCKETS = ("frequent", "mid", "rare")
PLOT_HINT = "pip install -e '.[plots]'"


# -- one pass -----------------------------------------------------------------------------------
@torch.no_grad()
def token_outputs(model, loader: Iterable, device, *, exit_layer: int, measures: Sequence[str] = CONFIDENCE_MEASURES,
                  ignore_index: int = IGNORE_INDEX) -> Dict[str, torch.Tensor]:
    """Per-token numbers of one unrouted pass (every token through every layer), on CPU.

    Flat 1-D tensors over the counted tokens (target != ignore_index) in loader order:
    'input' (token at the position), 'target', 'sequence' and 'position' (row in loader order,
    index in the row), f'conf_{m}' (float32, the exit head's confidence at `exit_layer`, computed
    exactly as `Trainer.evaluate` routes), 'nll_exit', 'nll_deep' (float32), 'pred_exit', 'pred_deep'.
    """
    L = model.num_layers
    if not 1 <= exit_layer < L:
        raise ValueError(f"exit_layer={exit_layer} must be in [1, num_layers) = [1, {L})")
    if model.deep_head is not None and exit_layer != model.exit_layer:
        raise ValueError(f"exit_layer={exit_layer} differs from the model's exit_layer={model.exit_layer}: "
                         "the deep head would read it")
    for m in measures:
        if m not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure={m!r} is not allowed; choose one of {', '.join(CONFIDENCE_MEASURES)}")
    model.eval()
    first = measures[0] if measures else None
    parts: Dict[str, list] = {}
    rows = 0
    for inputs, targets in tqdm(loader, desc="analysis", leave=False, disable=None):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        B, T = targets.shape
        valid = targets != ignore_index
        with model.autocast():  # the model's precision, as calibration and Trainer.evaluate run it
            h = model.run_layers(model.embed(inputs), 0, exit_layer)  # (B, T, C)
            exit_logits = model.output_head(h).float()  # (B, T, V), as Trainer.evaluate computes it
            h_deep = model.run_layers(h, exit_layer, L)
            deep_logits = model.logits_at(h_deep[valid], L).float()  # (N, V)
        y = targets[valid]
        ex = token_stats(exit_logits, targets, first, ignore_index)  # as Trainer.evaluate routes
        deep = token_stats(deep_logits, y, None)  # (N,)
        grid = torch.stack(torch.meshgrid(torch.arange(rows, rows + B, device=device),
                                          torch.arange(T, device=device), indexing="ij"))  # (2, B, T)
        batch = {
            "input": inputs[valid], "target": y, "sequence": grid[0][valid], "position": grid[1][valid],
            **({f"conf_{first}": ex["conf"][valid]} if first else {}),
            **{f"conf_{m}": confidence_from_logits(exit_logits, m)[valid] for m in measures[1:]},
            "nll_exit": ex["nll"][valid], "nll_deep": deep["nll"],
            "pred_exit": ex["pred"][valid], "pred_deep": deep["pred"],
        }
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.cpu())
        rows += B
    if not parts or sum(len(p) for p in parts["target"]) == 0:
        raise ValueError("loader: no tokens to analyze (empty loader or all targets ignored)")
    return {key: torch.cat(value) for key, value in parts.items()}


def _conf(tok: Dict[str, torch.Tensor], measure: str) -> torch.Tensor:
    key = f"conf_{measure}"
    if key not in tok:
        have = [k[len("conf_"):] for k in tok if k.startswith("conf_")]
        raise ValueError(f"measure={measure!r} was not gathered; token_outputs has {', '.join(have)}")
    return tok[key]


def _with_exits(tok: Dict[str, torch.Tensor], easy: torch.Tensor, exit_layer: int, num_layers: int) -> dict:
    """Metrics when the tokens in `easy` are predicted at the exit layer and the rest at the last."""
    y = tok["target"]
    nll = float(tok["nll_exit"][easy].double().sum() + tok["nll_deep"][~easy].double().sum())
    correct = int((tok["pred_exit"][easy] == y[easy]).sum() + (tok["pred_deep"][~easy] == y[~easy]).sum())
    n, n_easy = y.numel(), int(easy.sum())
    out = summarize(nll, correct, n, n_easy, exit_layer, num_layers)
    out["n_correct"] = correct
    return out


def routed_from_tokens(tok: Dict[str, torch.Tensor], threshold: float, *, measure: str, exit_layer: int,
                       num_layers: int) -> dict:
    """What `Trainer.evaluate` returns with this threshold under upper_context='full', from one pass."""
    easy = _conf(tok, measure) >= threshold  # float32 against a Python float, as in Trainer.evaluate
    out = _with_exits(tok, easy, exit_layer, num_layers)
    del out["n_correct"]
    n, n_hard = tok["target"].numel(), int((~easy).sum())
    out.update({
        "exit_acc": int((tok["pred_exit"] == tok["target"]).sum()) / n,
        "exit_ppl": math.exp(float(tok["nll_exit"].double().sum()) / n),
        "hard_deep_ppl": math.exp(float(tok["nll_deep"][~easy].double().sum()) / n_hard) if n_hard else float("nan"),
        "threshold": float(threshold),
        "exit_layer": exit_layer,
        "num_layers": num_layers,
    })
    return out


def share_threshold(conf: torch.Tensor, share: float) -> float:
    """A threshold at which `share` of the tokens exit (ties may add a few): share 0 exits none."""
    if share <= 0.0:
        return float(np.nextafter(np.float32(conf.max()), np.float32(np.inf)))  # just above every confidence
    return exact_quantile(conf, 1.0 - share)  # the same rule ASHEM calibrates with


def tradeoff_curve(tok: Dict[str, torch.Tensor], *, measure: str, exit_layer: int, num_layers: int,
                   calibrated_threshold: float, step: float = 0.05) -> List[dict]:
    """Rows (CSV_COLUMNS) for exit shares 0, step, ..., 1 ('grid'), then the calibrated threshold.

    Share 0 is the full-depth model; share 1 the exit-layer model (compute_cost exit_layer/num_layers).
    """
    n_steps = round(1.0 / step)
    if step <= 0 or not math.isclose(n_steps * step, 1.0, rel_tol=1e-9):
        raise ValueError(f"step={step} must divide 1 (0.05, 0.1, 0.25, ...)")
    conf = _conf(tok, measure)
    targets = [("grid", i / n_steps, share_threshold(conf, i / n_steps)) for i in range(n_steps + 1)]
    targets.append(("calibrated", None, float(calibrated_threshold)))
    rows = []
    for kind, share, thr in targets:
        m = routed_from_tokens(tok, thr, measure=measure, exit_layer=exit_layer, num_layers=num_layers)
        rows.append({"kind": kind, "target_share": share, **{k: m[k] for k in CSV_COLUMNS[2:]}})
    return rows


def oracle_router(tok: Dict[str, torch.Tensor], *, exit_layer: int, num_layers: int) -> dict:
    """A token exits early exactly when the early exit's top-1 equals the deep exit's.

    The most tokens any router can send out early while keeping every deep prediction; its
    accuracy equals the full-depth model's by definition (checked here).
    """
    agree = tok["pred_exit"] == tok["pred_deep"]
    out = _with_exits(tok, agree, exit_layer, num_layers)
    deep_correct = int((tok["pred_deep"] == tok["target"]).sum())
    if out.pop("n_correct") != deep_correct:
        raise AssertionError("oracle router: accuracy differs from the full-depth model's")
    return out


def compute_saved_at(tok: Dict[str, torch.Tensor], *, measure: str, exit_layer: int, num_layers: int,
                     max_ppl_increase: float = 0.01) -> dict:
    """The most compute any threshold saves with ppl <= (1 + max_ppl_increase) x full depth.

    Exact over every threshold (all cut points between distinct confidences), not only the grid.
    Chosen on the evaluated split itself, so it describes the curve; it is not a router.
    """
    conf = _conf(tok, measure)
    n = conf.numel()
    c, order = torch.sort(conf, descending=True, stable=True)
    gain = (tok["nll_exit"] - tok["nll_deep"])[order].double()
    deep_total = float(tok["nll_deep"].double().sum())
    nll_k = deep_total + torch.cat([gain.new_zeros(1), gain.cumsum(0)])  # (n + 1,): the k most confident exit
    cut = torch.ones(n + 1, dtype=torch.bool)
    cut[1:n] = c[:-1] != c[1:]  # a threshold can only separate distinct confidences
    ok = cut & (nll_k / n <= math.log1p(max_ppl_increase) + deep_total / n)
    k = int(ok.nonzero().max())  # k = 0 always qualifies
    thr = share_threshold(conf, 0.0) if k == 0 else float(c[k - 1])
    m = routed_from_tokens(tok, thr, measure=measure, exit_layer=exit_layer, num_layers=num_layers)
    return {"max_ppl_increase": max_ppl_increase, "threshold": thr, "compute_saved": 1.0 - m["compute_cost"],
            **{key: m[key] for key in ("shallow_ratio", "compute_cost", "ppl", "acc")}}


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
def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of every vocabulary id in `tokens` (int64, length vocab_size)."""
    chunk = 1 << 22  # bincount converts to int64; chunks keep that copy small on big corpora
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


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


# -- pictures -----------------------------------------------------------------------------------
def plot_points(summary: dict) -> Dict[str, dict]:
    """The points `analyze` marks on the curve: every baseline and the oracle router."""
    return {**summary["baselines"], "oracle router": summary["oracle"]}


def plot_title(summary: dict) -> str:
    return f"Exit at layer {summary['exit_layer']} of {summary['num_layers']}, routing on {summary['measure']}"


def plot_tradeoff(rows: List[dict], points: Dict[str, dict], path, *, title: str = "") -> bool:
    """Two panels (ppl, accuracy) against compute_cost: the grid curve, the calibrated row and every
    point in `points` (name -> metrics) marked and named in the legend. False without matplotlib."""
    path = Path(path)
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched
    except ImportError:
        log.info("matplotlib is not installed: no %s (%s)", path.name, PLOT_HINT)
        return False
    grid = sorted((r for r in rows if r["kind"] == "grid"), key=lambda r: r["compute_cost"])
    calibrated = [r for r in rows if r["kind"] == "calibrated"]
    full_ppl = next(r["ppl"] for r in rows if r["kind"] == "grid" and r["target_share"] == 0)
    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    markers = "s^vDPXph<>"
    for ax, key, label in ((axes[0], "ppl", "perplexity"), (axes[1], "acc", "accuracy")):
        ax.plot([r["compute_cost"] for r in grid], [r[key] for r in grid], "-o", color="tab:blue", ms=3, lw=1.2,
                label=f"threshold sweep (exit share 0 to 1 by {1 / (len(grid) - 1):.2g})")
        for r in grid:
            if r["target_share"] in (0.0, 0.5, 1.0):
                ax.annotate(f"exit {r['target_share']:.0%}", (r["compute_cost"], r[key]), xytext=(4, 5),
                            textcoords="offset points", fontsize=7, color="tab:blue")
        for j, (name, m) in enumerate(points.items()):
            if m.get(key) is None or m.get("compute_cost") is None:
                continue
            ax.plot(m["compute_cost"], m[key], markers[j % len(markers)], ms=8, mfc="none", mew=1.6,
                    color=f"C{(j + 1) % 10}", label=name)
        for r in calibrated:
            ax.plot(r["compute_cost"], r[key], "*", ms=15, color="crimson", mec="black", mew=0.6, zorder=5,
                    label=f"calibrated threshold {r['threshold']:.4g} (exit share {r['shallow_ratio']:.0%})")
            ax.annotate("calibrated", (r["compute_cost"], r[key]), xytext=(6, -12), textcoords="offset points",
                        fontsize=8, color="crimson")
        if key == "ppl":
            ax.axhline(full_ppl * 1.01, color="gray", ls=":", lw=1, label="full depth ppl + 1%")
        ax.set_xlabel("compute_cost (layers run / full depth)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "Quality against compute")
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    atomic_write(path, fig.savefig, mode="wb")
    return True


EARLY_BG, DEEP_BG = "#c6dbef", "#08306b"


def tokens_html(tok: Dict[str, torch.Tensor], *, threshold: float, measure: str, exit_layer: int, num_layers: int,
                tokenizer=None, max_tokens: int = 400) -> str:
    """A self-contained page: the first `max_tokens` predicted tokens in loader order, each coloured by
    the exit that predicted it at `threshold`, its confidence and exit on hover."""
    n = min(max_tokens, tok["target"].numel())
    conf = _conf(tok, measure)[:n]
    is_early = (conf >= threshold).tolist()  # the tensor comparison routing makes, not a float64 one
    fields = ("input", "target", "position", "pred_exit", "pred_deep")
    inp, tgt, pos, p_exit, p_deep = (tok[f][:n].tolist() for f in fields)
    conf = conf.tolist()

    def text(i: int) -> str:
        return html.escape(_decode(i, tokenizer) if tokenizer is not None else f"{i} ")

    spans, n_early = [], 0
    for j in range(n):
        if pos[j] == 0:  # a row's first token: context, predicted by nothing
            spans.append(f'<span class="ctx" title="first token of a sequence: not predicted">{text(inp[j])}</span>')
        early = is_early[j]
        n_early += early
        pred = p_exit[j] if early else p_deep[j]
        tip = (f"{'early exit' if early else 'deep exit'}: layer {exit_layer if early else num_layers} of {num_layers}"
               f" | {measure} {conf[j]:.4f} (threshold {threshold:.4f})"
               f" | predicted {_decode(pred, tokenizer)!r} {'(right)' if pred == tgt[j] else '(wrong)'}")
        spans.append(f'<span class="{"early" if early else "deep"}" title="{html.escape(tip)}">{text(tgt[j])}</span>')
    share = n_early / n if n else 0.0
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Exit per token</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.8; border: 1px solid #ccc; padding: 1em; }}
.early {{ background: {EARLY_BG}; color: #000; }}
.deep {{ background: {DEEP_BG}; color: #fff; }}
.ctx {{ color: #888; }}
.swatch {{ display: inline-block; padding: 0 0.6em; margin-right: 1em; }}
</style></head><body>
<h1>Which exit predicted each token</h1>
<p>Routing on <b>{html.escape(measure)}</b> at threshold {threshold:.6g}: a token whose confidence at layer
{exit_layer} is at or above the threshold is predicted there; the others go on to layer {num_layers}.
Each token is coloured by the exit that <i>predicted</i> it; hover for its confidence.
Early exits in this passage: {n_early} of {n} ({share:.0%}).</p>
<p><span class="swatch early">early exit (layer {exit_layer})</span><span class="swatch deep">deep exit
(layer {num_layers})</span><span class="swatch ctx">context only (first token of a sequence)</span></p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""


# -- the report ---------------------------------------------------------------------------------
def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v.replace("|", "\\|") for v in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def _token_rows(entries: List[dict]) -> List[list]:
    return [[repr(e["token"]), e["id"], e["count"], e["share_of_occurrences"]] for e in entries]


def write_csv(path, rows: List[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def read_csv(path) -> List[dict]:
    """Rows of a tradeoff.csv with numbers as floats (target_share None on the calibrated row)."""
    with open(path, newline="") as f:
        return [{k: (v if k == "kind" else float(v) if v != "" else None) for k, v in r.items()}
                for r in csv.DictReader(f)]


def _report(s: dict, rows: List[dict], plotted: bool, upper_context: str) -> str:
    models = {**s["baselines"], "calibrated router (one pass)": s["calibrated"], "oracle router": s["oracle"]}
    cost_cols = [c for c in COSTS if any(c in m for m in models.values())]
    header = ["router / model", "acc", "ppl", "shallow_ratio", "compute_cost", *cost_cols]
    saved, fb, (lo, hi) = s["at_1pct_ppl"], s["frequency_buckets"], s["compute_range"]
    blocks = [
        "# Evaluation analysis",
        f"Exit at layer {s['exit_layer']} of {s['num_layers']}, routing on `{s['measure']}` at the calibrated "
        f"threshold {s['threshold']:.6g}; {s['n_tokens']} tokens. Here a token is the target a position predicts.",
    ]
    if upper_context != "full":
        blocks.append(f"**Note:** the model routes with upper_context='{upper_context}'. The one-pass rows "
                      "(curve, calibrated, oracle) assume 'full' (every token runs every layer), so they can differ "
                      "from a routed baseline measured under the model's own policy.")
    blocks += [
        "## Routers and baselines",
        _table(header, ([name, *(m.get(c) for c in header[1:])] for name, m in models.items())),
        f"Oracle router: a token exits early exactly when the early exit's top-1 equals the deep exit's, so it "
        f"keeps every deep prediction (its accuracy is the full-depth model's). It sends "
        f"**{s['oracle_shallow_ratio']:.1%}** of tokens out early; the calibrated router sends "
        f"**{s['calibrated']['shallow_ratio']:.1%}**.",
        "## Trade-off",
        f"- Area under ppl against compute_cost over [{lo:.4g}, {hi:.4g}] (trapezoids over the grid rows; lower "
        f"is better): {s['ppl_compute_auc']:.6g}, or {_fmt(s['ppl_compute_auc_per_unit'], 6)} "
        "per unit of compute (the mean ppl across the range).\n"
        f"- Compute saved at no more than 1% ppl loss against full depth (ppl {s['full_depth']['ppl']:.6g}): "
        f"**{saved['compute_saved']:.1%}** (threshold {saved['threshold']:.6g}, exit share "
        f"{saved['shallow_ratio']:.1%}, ppl {saved['ppl']:.6g}). Searched over every threshold on this split: it "
        "describes the curve and is not a router.",
        "Each row is exact for its threshold under upper_context='full' (also in tradeoff.csv); exit share 0 is "
        "the full-depth model, 1 the exit layer alone:",
        _table(CSV_COLUMNS, ([r[c] if r[c] is not None else "" for c in CSV_COLUMNS] for r in rows)),
        "![quality against compute](tradeoff.png)" if plotted else
        f"tradeoff.png was not drawn: matplotlib is not installed ({PLOT_HINT}).",
        "## Confidence measures",
        _table(["measure", "AUROC at predicting 'early and deep exit agree'", "routes"],
               ([m, v, "yes" if m == s["measure"] else ""] for m, v in s["auroc"].items())),
        f"Expected calibration error of the early exit (max_prob against its correctness, {s['ece_bins']} "
        f"equal-width bins): {s['ece_exit']:.4f}.",
        "## Exit share by token frequency",
    ]
    if fb:
        blocks += [fb["method"],
                   _table(["bucket", "vocabulary types", "training mass", "tokens here", "exit share (calibrated)",
                           "exit share (oracle)"],
                          ([b, v["n_types"], v["train_mass"], v["n_tokens"], v["exit_share"], v["oracle_exit_share"]]
                           for b, v in fb["buckets"].items()))]
    else:
        blocks.append("Not computed: no training tokens were given.")
    for kind in ("hard", "easy"):
        blocks += [f"## The 20 most common {kind} tokens (calibrated threshold)",
                   f"share: the share of that token's occurrences here that were {kind}.",
                   _table(["token", "id", "count", "share"], _token_rows(s[f"{kind}_tokens"]))]
    blocks.append("Every token of a passage, coloured by its exit: [tokens.html](tokens.html).")
    return "\n\n".join(b.rstrip("\n") for b in blocks) + "\n"


def analyze(out_dir, *, model, loader, device, threshold: float, measure: str, exit_layer: int,
            baselines: Dict[str, dict], tokenizer=None, train_tokens=None, vocab_size: int,
            html_tokens: int = 400) -> dict:
    """One pass over `loader`, then tradeoff.csv, report.md, tokens.html, analysis.json and
    (with matplotlib) tradeoff.png in `out_dir`. Returns the JSON-able summary (also analysis.json).

    `baselines`: name -> metrics with at least acc, ppl, shallow_ratio, compute_cost (compute_cost
    relative to this model's full depth), shown beside the calibrated and oracle routers.
    """
    out = Path(out_dir)
    L = model.num_layers
    upper_context = getattr(model, "upper_context", "full")
    if upper_context != "full":
        log.warning("analysis: the model routes with upper_context=%r; the one-pass curve assumes 'full'",
                    upper_context)
    measures = tuple(dict.fromkeys((measure, *CONFIDENCE_MEASURES)))
    tok = token_outputs(model, loader, device, exit_layer=exit_layer, measures=measures)
    kw = dict(exit_layer=exit_layer, num_layers=L)
    rows = tradeoff_curve(tok, measure=measure, calibrated_threshold=threshold, **kw)
    full = _with_exits(tok, torch.zeros_like(tok["target"], dtype=torch.bool), **kw)
    exit_only = _with_exits(tok, torch.ones_like(tok["target"], dtype=torch.bool), **kw)
    calibrated = routed_from_tokens(tok, threshold, measure=measure, **kw)
    oracle = oracle_router(tok, **kw)
    at_1pct = compute_saved_at(tok, measure=measure, **kw)
    agree = tok["pred_exit"] == tok["pred_deep"]
    easy = _conf(tok, measure) >= threshold
    baselines = {name: {k: m[k] for k in METRICS + COSTS if k in m} for name, m in baselines.items()}
    summary = {
        "measure": measure, "threshold": float(threshold), "exit_layer": exit_layer, "num_layers": L,
        "n_tokens": int(tok["target"].numel()),
        "full_depth": {k: full[k] for k in ("acc", "ppl")},
        "exit_only": {k: exit_only[k] for k in ("acc", "ppl")},
        "calibrated": {k: calibrated[k] for k in METRICS},
        "oracle": {k: oracle[k] for k in METRICS},
        "oracle_shallow_ratio": oracle["shallow_ratio"],
        **ppl_compute_area(rows),
        "compute_saved_at_1pct_ppl": at_1pct["compute_saved"],
        "at_1pct_ppl": at_1pct,
        "auroc": {m: auroc(_conf(tok, m), agree) for m in measures},
        "ece_exit": expected_calibration_error(tok["conf_max_prob"], tok["pred_exit"] == tok["target"], ECE_BINS),
        "ece_bins": ECE_BINS,
        "frequency_buckets": None,
        "hard_tokens": top_tokens(tok["target"], ~easy, vocab_size, tokenizer=tokenizer),
        "easy_tokens": top_tokens(tok["target"], easy, vocab_size, tokenizer=tokenizer),
        "baselines": baselines,
    }
    if train_tokens is not None:
        summary["frequency_buckets"] = {
            "method": BUCKET_METHOD,
            "buckets": exit_share_by_bucket(tok["target"], {"exit_share": easy, "oracle_exit_share": agree},
                                            token_counts(train_tokens, vocab_size)),
        }
    write_csv(out / "tradeoff.csv", rows)
    plotted = plot_tradeoff(rows, plot_points(summary), out / "tradeoff.png", title=plot_title(summary))
    atomic_write(out / "tokens.html", lambda f: f.write(tokens_html(
        tok, threshold=threshold, measure=measure, tokenizer=tokenizer, max_tokens=html_tokens, **kw)))
    atomic_write(out / "report.md", lambda f: f.write(_report(summary, rows, plotted, upper_context)))
    write_json(out / "analysis.json", summary)
    return summary
