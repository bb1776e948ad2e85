"""The pictures of the evaluation analysis: tradeoff.png (quality against compute) and tokens.html (which
exit predicted each token). Drawing only: every number comes from `lego.analysis` via `lego.report.analyze`;
`scripts/plot_tradeoff.py EVAL_DIR` re-draws a finished run's picture from its CSV and analysis.json."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Dict, List

import torch

from lego.analysis import PLOT_HINT, _as_list, _conf, _decode
from lego.artifacts import atomic_write
from lego.cascade import exit_index

log = logging.getLogger(__name__)


# -- pictures -----------------------------------------------------------------------------------
def plot_points(summary: dict) -> Dict[str, dict]:
    """The points `analyze` marks on the curve: every baseline and the oracle router."""
    return {**summary["baselines"], "oracle router": summary["oracle"]}


def plot_title(summary: dict) -> str:
    exits = _as_list(summary["exit_layer"])
    where = f"Exit at layer {exits[0]}" if len(exits) == 1 else f"Exits at layers {', '.join(map(str, exits))}"
    return f"{where} of {summary['num_layers']}, routing on {summary['measure']}"


def plot_tradeoff(rows: List[dict], points: Dict[str, dict], path, *, title: str = "") -> bool:
    """Three panels of perplexity: against the specification's compute_cost (layers run), against the
    realized inference cost (flop_cost: what the upper-context policy really runs; dense models at
    their own cost, the dense frontier drawn as a line through them), and against training compute
    (multiply-adds) for every point that has it. The threshold curve, the calibrated row and every
    point in `points` (name -> metrics) are marked and named in the legend. False without matplotlib."""
    path = Path(path)
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched
    except ImportError:
        log.info("matplotlib is not installed: no %s (%s)", path.name, PLOT_HINT)
        return False
    grid = sorted((r for r in rows if r["kind"] == "grid"), key=lambda r: r["compute_cost"])
    calibrated = [r for r in rows if r["kind"] == "calibrated"]
    cascade = any(k.startswith("share_") for k in rows[0])  # a cascade's rows give each exit's share
    full_ppl = next(r["ppl"] for r in rows if r["kind"] == "grid" and r["target_share"] == 0)
    frontier = sorted((m["inference_cost"], m["ppl"]) for m in points.values() if m.get("inference_cost") is not None)
    fig = Figure(figsize=(15, 4.6))
    axes = fig.subplots(1, 3)
    markers = "s^vDPXph<>"
    panels = ((axes[0], "compute_cost", "compute_cost (layers run / full depth; the specification's)"),
              (axes[1], "flop_cost", "realized inference cost (multiply-adds / dense full depth)"),
              (axes[2], "train_macs", "training compute (multiply-adds)"))
    for ax, xkey, xlabel in panels:
        curve = [r for r in grid if r.get(xkey) is not None]
        if curve:
            ax.plot([r[xkey] for r in curve], [r["ppl"] for r in curve], "-o", color="tab:blue", ms=3, lw=1.2,
                    label=f"threshold sweep (exit share {'at every exit ' if cascade else ''}0 to 1 by "
                          f"{1 / (len(grid) - 1):.2g}, chosen on validation)")
        if xkey == "flop_cost" and len(frontier) > 1:
            ax.plot(*zip(*frontier), "--", color="black", lw=1.4, label="dense frontier (same training budget)")
        for j, (name, m) in enumerate(points.items()):
            x = m.get("inference_cost", m.get("flop_cost")) if xkey == "flop_cost" else m.get(xkey)
            if x is None or m.get("ppl") is None:
                continue
            ax.plot(x, m["ppl"], markers[j % len(markers)], ms=8, mfc="none", mew=1.6, color=f"C{(j + 1) % 10}",
                    label=name)
        for r in calibrated:
            if r.get(xkey) is not None:
                ax.plot(r[xkey], r["ppl"], "*", ms=15, color="crimson", mec="black", mew=0.6, zorder=5,
                        label=f"calibrated threshold {r['threshold']:.4g} (exit share {r['shallow_ratio']:.0%})")
        if xkey != "train_macs":
            ax.axhline(full_ppl * 1.01, color="gray", ls=":", lw=1, label="full depth ppl + 1%")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("test perplexity")
        ax.grid(alpha=0.3)
    seen, handles, labels = set(), [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title or "Quality against compute")
    fig.tight_layout(rect=(0, 0, 0.76, 1))
    atomic_write(path, fig.savefig, mode="wb")
    return True


EARLY_BG, DEEP_BG = "#c6dbef", "#08306b"
MID_COLOURS = (("#6baed6", "#000"), ("#2171b5", "#fff"), ("#4292c6", "#fff"))  # a cascade's exits between


def tokens_html(tok: Dict[str, torch.Tensor], *, threshold, measure: str, exit_layer, num_layers: int,
                tokenizer=None, max_tokens: int = 400) -> str:
    """A self-contained page: the first `max_tokens` predicted tokens in loader order, each coloured by
    the exit that predicted it at `threshold` (one per exit of a cascade, `exit_layer` then lists
    them), its confidence and exit on hover."""
    exits, thresholds = _as_list(exit_layer), [float(t) for t in _as_list(threshold)]
    K = len(exits)
    n = min(max_tokens, tok["target"].numel())
    conf_at = _conf(tok, measure, every_exit=True)[:n]
    stop = exit_index(conf_at, thresholds).tolist()  # the tensor comparison routing makes, not a float64 one
    inp, tgt, pos = (tok[f][:n].tolist() for f in ("input", "target", "position"))
    pred_at, conf_at = tok["pred_at"][:n].tolist(), conf_at.tolist()
    layers = [*exits, num_layers]
    # class, legend name and colours of each exit (the last layer last)
    styles = [("early", "early exit", EARLY_BG, "#000"),
              *((f"exit{lay}", f"exit {j + 1}", *MID_COLOURS[(j - 1) % len(MID_COLOURS)])
                for j, lay in enumerate(exits) if j > 0), ("deep", "deep exit", DEEP_BG, "#fff")]

    def text(i: int) -> str:
        return html.escape(_decode(i, tokenizer) if tokenizer is not None else f"{i} ")

    spans, per_exit = [], [0] * (K + 1)
    for j in range(n):
        if pos[j] == 0:  # a row's first token: context, predicted by nothing
            spans.append(f'<span class="ctx" title="first token of a sequence: not predicted">{text(inp[j])}</span>')
        k = stop[j]
        per_exit[k] += 1
        pred = pred_at[j][k]
        confs = (f"{conf_at[j][0]:.4f} (threshold {thresholds[0]:.4f})" if K == 1 else
                 f"{', '.join(f'{c:.4f}' for c in conf_at[j])} at layers {', '.join(map(str, exits))} "
                 f"(thresholds {', '.join(f'{t:.4f}' for t in thresholds)})")
        tip = (f"{styles[k][1]}: layer {layers[k]} of {num_layers} | {measure} {confs}"
               f" | predicted {_decode(pred, tokenizer)!r} {'(right)' if pred == tgt[j] else '(wrong)'}")
        spans.append(f'<span class="{styles[k][0]}" title="{html.escape(tip)}">{text(tgt[j])}</span>')
    n_early = n - per_exit[K]
    share = n_early / n if n else 0.0
    css = "\n".join(f".{c} {{ background: {bg}; color: {fg}; }}" for c, _, bg, fg in styles)
    if K == 1:
        rule = (f"Routing on <b>{html.escape(measure)}</b> at threshold {thresholds[0]:.6g}: a token whose confidence "
                f"at layer\n{exits[0]} is at or above the threshold is predicted there; the others go on to layer "
                f"{num_layers}.")
        legend = (f'<span class="swatch early">early exit (layer {exits[0]})</span><span class="swatch deep">deep exit'
                  f'\n(layer {num_layers})</span>')
    else:
        rule = (f"Routing on <b>{html.escape(measure)}</b> at thresholds "
                f"{', '.join(f'{t:.6g} (layer {e})' for e, t in zip(exits, thresholds))}: a token is predicted at the "
                f"first exit where its confidence\nis at or above that exit's threshold; the others go on to layer "
                f"{num_layers}.")
        legend = "".join(f'<span class="swatch {c}">{name} (layer {lay}): {cnt}</span>'
                         for (c, name, _, _), lay, cnt in zip(styles, layers, per_exit))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Exit per token</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.8; border: 1px solid #ccc; padding: 1em; }}
{css}
.ctx {{ color: #888; }}
.swatch {{ display: inline-block; padding: 0 0.6em; margin-right: 1em; }}
</style></head><body>
<h1>Which exit predicted each token</h1>
<p>{rule}
Each token is coloured by the exit that <i>predicted</i> it; hover for its confidence.
Early exits in this passage: {n_early} of {n} ({share:.0%}).</p>
<p>{legend}<span class="swatch ctx">context only (first token of a sequence)</span></p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
