"""The tables of a sweep's summary.md (lego.sweep writes them): the glance table, the ranking against the dense
frontier with its moonshot column, and every number as `mean ± std` over seeds."""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List

def _columns(rows: List[Dict[str, Any]]) -> List[str]:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not k.startswith("_")]
    return cols


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def shared_overrides(rows: List[Dict[str, Any]]) -> List[str]:
    """Overrides that every configuration has (listed once above a table); none for a single configuration."""
    return [o for o in rows[0]["_overrides"] if all(o in r["_overrides"] for r in rows)] if len(rows) > 1 else []


def config_label(row: Dict[str, Any], shared: List[str]) -> str:
    return " ".join(o for o in row["_overrides"] if o not in shared) or "(defaults)"


def mean_std_cell(row: Dict[str, Any], metric: str) -> str:
    """`mean ± std` of a metric in a summary row (the mean alone when n = 1, '' when absent)."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    return _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")


def to_markdown(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table: configuration, n, seeds, then `mean ± std` per metric (mean alone when n = 1).

    With several configurations, overrides that all of them share are listed once above the table
    and the config column shows only what differs.
    """
    names = [c[: -len("_mean")] for c in _columns(rows) if c.endswith("_mean")]
    shared = shared_overrides(rows)
    lines = ["## Every number: mean ± sample std over seeds", "",
             ("ppl_minus_<name>: routed ppl minus the baseline's <name>_ppl of the same run (same seed), "
              "negative = ASHEM better; _pct: in percent of the baseline."), ""]
    if shared:
        lines += ["Overrides shared by every configuration: `" + " ".join(shared) + "`", ""]
    lines += ["| config | n | seeds | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for r in rows:
        cells = [config_label(r, shared), str(r["n"]), r["seeds"], *(mean_std_cell(r, k) for k in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The table summary.md opens with: what a person reads at a glance.
GLANCE = (("ppl", "routed test ppl"), ("flop_cost", "inference cost"), ("train_macs_total", "training MACs"),
          ("gap_at_inference_cost_pct", "gap to the dense frontier at equal inference cost %"),
          ("gap_at_training_compute_pct", "gap to the dense full-depth model at equal training compute %"))


def verdict_word(row: Dict[str, Any]) -> str:
    """Who wins at equal inference cost, over the seeds: 'dense' or 'ASHEM' when the mean gap is larger than its
    standard deviation, else 'tie (within the seed spread)'; '' without a dense frontier."""
    mean, std = row.get("gap_at_inference_cost_pct_mean"), row.get("gap_at_inference_cost_pct_std")
    if mean is None:
        return ""
    if std is not None and abs(mean) <= std:
        return "tie (within the seed spread)"
    return "dense" if mean > 0 else "ASHEM"


def converged_cell(row: Dict[str, Any]) -> str:
    """Per trained model, the share of seeds that converged by the recorded rule (lego.training.convergence)."""
    names = [k[len("converged_"):-len("_mean")] for k in row if k.startswith("converged_") and k.endswith("_mean")]
    return ", ".join(f"{name} {row[f'converged_{name}_mean'] * row['n']:.0f}/{row['n']}" for name in names)


def glance_markdown(rows: List[Dict[str, Any]]) -> str:
    """The short table summary.md opens with: configuration, n, routed ppl, cost, training MACs, the two gaps
    (+ = routed worse), who wins at equal inference cost, and how many seeds' models converged."""
    shared = shared_overrides(rows)
    lines = ["# Sweep summary", "",
             "Mean ± sample std over seeds. Gaps: routed ppl over the dense model's, in percent (+ = the dense "
             "model is better); the dense frontier is chosen on validation and reported on test.", "",
             "| config | n | " + " | ".join(t for _, t in GLANCE) + " | wins at equal inference cost | converged |",
             "|" + "---|" * (4 + len(GLANCE))]
    for r in rows:
        cells = [config_label(r, shared), str(r["n"]), *(mean_std_cell(r, k) for k, _ in GLANCE), verdict_word(r),
                 converged_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The ranking's columns: what the study of variants compares (issue "Closing the gap"), then the gaps.
RANKED = (("ppl", "routed ppl"), ("hard_ppl_ashem", "hard-token ppl"), ("easy_ppl_ashem", "easy-token ppl"),
          ("flop_cost", "inference cost"), ("train_macs_total", "training MACs"),
          ("gap_at_inference_cost_pct", "gap at equal inference cost %"),
          ("gap_at_training_compute_pct", "gap at equal training compute %"),
          ("gap_to_best_dense_pct", "gap to best dense %"))
# within 2% of the dense full-depth model at <= 0.75 of its inference cost; on data=chains also within 2 points of
# its accuracy on the answers of every hop count
MOONSHOT = {"gap_pct": 2.0, "cost": 0.75, "answer_points": 0.02}


def moonshot(row: Dict[str, Any]) -> str:
    """Whether a configuration's means reach the moonshot: routed ppl within 2% of the dense full-depth model
    trained on the same training MACs, at no more than 0.75 of its inference cost, and (data=chains) its accuracy
    on the answers of every hop count no more than 2 points below that model's (`answer_gap_hops<k>` means). 'yes', 'no', '' (no such
    numbers), or 'hollow' when reached but a shallower dense model beats the full-depth one at the same
    training MACs: depth does not pay in that setting, so nearing the deep model proves nothing."""
    gap, cost = row.get("gap_at_training_compute_pct_mean"), row.get("flop_cost_mean")
    if gap is None or cost is None:
        return ""
    answers = [v for k, v in row.items() if re.fullmatch(r"answer_gap_hops\d+_mean", k) and v is not None]
    if not (gap <= MOONSHOT["gap_pct"] and cost <= MOONSHOT["cost"]
            and all(a >= -MOONSHOT["answer_points"] for a in answers)):
        return "no"
    best = row.get("gap_to_best_dense_pct_mean")
    return "hollow" if best is not None and best > gap + 1e-9 else "yes"


def ranking_markdown(rows: List[Dict[str, Any]]) -> str:
    """The configurations ranked by the gap to the dense frontier at equal inference cost (smallest first),
    with their rank at equal training compute; '' when the runs trained no dense frontier."""
    ranked = [r for r in rows if r.get("gap_at_inference_cost_pct_mean") is not None]
    if not ranked:
        return ""
    ranked.sort(key=lambda r: r["gap_at_inference_cost_pct_mean"])
    by_training = sorted(ranked, key=lambda r: r.get("gap_at_training_compute_pct_mean", math.inf))
    shared = shared_overrides(rows)
    lines = ["## Ranked by the gap to the dense frontier", "",
             ("Gap: routed ppl over the dense frontier's, in percent (+ = routed worse), at the routed model's "
              "realized inference cost (flop_cost, a fraction of the dense full-depth model's forward MACs) and "
              "against the dense full-depth model trained on the pipeline's training MACs. Moonshot: within "
              f"{MOONSHOT['gap_pct']:g}% of that model at <= {MOONSHOT['cost']:g} of its inference cost; 'hollow': "
              "reached, but a shallower dense model beats the full-depth one at the same training MACs (depth "
              "does not pay here, so the gap at equal inference cost is the one that counts)."), "",
             "| rank | config | n | " + " | ".join(t for _, t in RANKED) + " | rank at training compute | moonshot |",
             "|" + "---|" * (5 + len(RANKED))]
    for i, r in enumerate(ranked, 1):
        cells = [str(i), config_label(r, shared), str(r["n"]), *(mean_std_cell(r, k) for k, _ in RANKED),
                 str(by_training.index(r) + 1), moonshot(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
