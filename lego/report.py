"""Writers for the evaluation analysis: tradeoff.csv, report.md and analysis.json (`analyze`), with the
pictures of `lego.pictures` (tradeoff.png, tokens.html). Formatting only: every number comes from
`lego.analysis`. `scripts/plot_tradeoff.py EVAL_DIR` re-plots a finished run from its CSV and analysis.json.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from lego.analysis import (BUCKET_METHOD, COSTS, CSV_COLUMNS, ECE_BINS, METRICS, PLOT_HINT, _as_list, _conf,
                           auroc, compute_saved_at, exit_share_by_bucket, expected_calibration_error, oracle_router,
                           ppl_compute_area, routed_from_tokens, token_outputs, top_tokens, tradeoff_curve, with_stops)
from lego.artifacts import atomic_write, write_json
from lego.cascade import exit_index, first_agreeing
from lego.config import CONFIDENCE_MEASURES
from lego.data import token_counts
from lego.pictures import plot_points, plot_title, plot_tradeoff, tokens_html

log = logging.getLogger(__name__)


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
    columns = list(dict.fromkeys(k for row in [dict.fromkeys(CSV_COLUMNS), *rows] for k in row))  # + a cascade's
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
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
    on = s.get("operating_points_chosen_on", "this split")
    thresholds_used = ", ".join(f"{t:.6g}" for t in saved.get("thresholds", [saved["threshold"]]))
    thresholds_used = f"threshold{'s' if 'thresholds' in saved else ''} {thresholds_used}"
    searched = "every cut point" if "thresholds" not in saved else "the shared exit shares 0 to 1 by 0.01"
    if "exits" not in s:
        oracle_rule = "a token exits early exactly when the early exit's top-1 equals the deep exit's"
        curve_rule = (f"Each row is exact for its threshold under upper_context='full' (also in tradeoff.csv); the "
                      f"grid's thresholds are the exit shares 0 to 1 on {on}; exit share 0 is the full-depth model, 1 "
                      "the exit layer alone; flop_cost is what the model's upper-context policy runs:")
    else:
        oracle_rule = "a token stops at the first exit whose top-1 equals the last layer's"
        curve_rule = (f"Each row is exact for its thresholds under upper_context='full' (also in tradeoff.csv, with "
                      "each exit's threshold and share); a grid row's target share s sends share s of the tokens "
                      f"reaching each exit out there, with thresholds chosen on {on}; share 0 is the full-depth "
                      "model, 1 the first exit alone; flop_cost is what the model's upper-context policy runs:")
    blocks = [
        "# Evaluation analysis",
        *([f"**Verdict.** {s['verdict']}"] if s.get("verdict") else []),
        f"Exit at layer {s['exit_layer']} of {s['num_layers']}, routing on `{s['measure']}` at the calibrated "
        f"threshold {s['threshold']:.6g}; {s['n_tokens']} tokens. Here a token is the target a position predicts."
        if "exits" not in s else
        f"Exits at layers {', '.join(map(str, s['exit_layer']))} of {s['num_layers']}, routing on `{s['measure']}` at "
        f"the calibrated thresholds {', '.join(f'{t:.6g}' for t in s['thresholds'])}: a token is predicted at the "
        f"first exit where its confidence is at or above that exit's threshold; {s['n_tokens']} tokens. Here a token "
        "is the target a position predicts.",
    ]
    if "exits" in s:
        blocks.append("## Per exit")
        for name, title in (("calibrated", "Calibrated router"), ("oracle", "Oracle router")):
            blocks += [f"{title}: the share of all tokens predicted at each exit (the last layer last), and their "
                       "accuracy and perplexity.",
                       _table(["exit layer", "threshold", "share", "tokens", "acc", "ppl"],
                              ([e["layer"], e["threshold"], e["share"], e["n_tokens"], e["acc"], e["ppl"]]
                               for e in s["exits"][name]))]
    if upper_context != "full":
        blocks.append(f"**Note:** the model routes with upper_context='{upper_context}'. The one-pass rows "
                      "(curve, calibrated, oracle) assume 'full' (every token runs every layer), so they can differ "
                      "from a routed baseline measured under the model's own policy.")
    blocks += [
        "## Routers and baselines",
        _table(header, ([name, *(m.get(c) for c in header[1:])] for name, m in models.items())),
        f"Oracle router: {oracle_rule}, so it keeps every deep prediction (its accuracy is the full-depth model's). "
        "It sends "
        f"**{s['oracle_shallow_ratio']:.1%}** of tokens out early; the calibrated router sends "
        f"**{s['calibrated']['shallow_ratio']:.1%}**.",
        "## Trade-off",
        f"- Area under ppl against compute_cost over [{lo:.4g}, {hi:.4g}] (trapezoids over the grid rows; lower "
        f"is better): {s['ppl_compute_auc']:.6g}, or {_fmt(s['ppl_compute_auc_per_unit'], 6)} "
        "per unit of compute (the mean ppl across the range).\n"
        f"- Compute saved at no more than 1% ppl loss against full depth (ppl {s['full_depth']['ppl']:.6g}): "
        f"**{saved['compute_saved']:.1%}** here ({thresholds_used}, exit share "
        f"{saved['shallow_ratio']:.1%}, ppl {saved['ppl']:.6g}). The threshold was chosen on "
        f"**{saved.get('chosen_on', 'this split')}** (searched over {searched} there, where it saves "
        f"{saved.get('chosen', saved)['compute_saved']:.1%}) and is reported on this split.",
        curve_rule,
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


def analyze(out_dir, *, model, loader, device, threshold, measure: str, exit_layer,
            baselines: Dict[str, dict], upper_context: str = "full", tokenizer=None, train_tokens=None, vocab_size: int,
            html_tokens: int = 400, choose_loader=None,
            realized_cost: Optional[Callable[[List[float]], float]] = None, verdict: Optional[str] = None) -> dict:
    """One pass over `loader`, then tradeoff.csv, report.md, tokens.html, analysis.json and
    (with matplotlib) tradeoff.png in `out_dir`. Returns the JSON-able summary (also analysis.json).

    A cascade passes `exit_layer` as the list of its exit layers and `threshold` as one per exit.
    `baselines`: name -> metrics with at least acc, ppl, shallow_ratio, compute_cost (compute_cost
    relative to this model's full depth; flop_cost, inference_cost and train_macs when known), shown
    beside the calibrated and oracle routers. Operating points (the grid's thresholds, compute saved
    at 1% ppl loss) are chosen on `choose_loader` (the validation split) and reported on `loader`.
    `realized_cost(shares)` is the flop_cost of routing with these shares of all tokens predicted at
    each exit under `upper_context`, the policy the model routes with (a column of the curve and the x axis of
    the realized-cost panel; the one-pass curve itself is exact for 'full').
    """
    out = Path(out_dir)
    L = model.num_layers
    exits = _as_list(exit_layer)
    cascade = len(exits) > 1
    if upper_context != "full":
        log.warning("analysis: the model routes with upper_context=%r; the one-pass curve assumes 'full'",
                    upper_context)
    measures = tuple(dict.fromkeys((measure, *CONFIDENCE_MEASURES)))
    tok = token_outputs(model, loader, device, exit_layer=exit_layer, measures=measures)
    choose = None if choose_loader is None else token_outputs(model, choose_loader, device, exit_layer=exit_layer,
                                                              measures=(measure,))
    kw = dict(exit_layer=exit_layer, num_layers=L)
    rows = tradeoff_curve(tok, measure=measure, calibrated_threshold=threshold, choose=choose, **kw)
    for row in rows:
        shares = [row[f"share_{e}"] for e in exits] if cascade else [row["shallow_ratio"]]
        row["flop_cost"] = realized_cost(shares) if realized_cost is not None else None
    full = with_stops(tok, torch.full_like(tok["target"], len(exits)), **kw)
    exit_only = with_stops(tok, torch.zeros_like(tok["target"]), **kw)
    calibrated = routed_from_tokens(tok, threshold, measure=measure, **kw)
    oracle = oracle_router(tok, **kw)
    at_1pct = compute_saved_at(tok, measure=measure, choose=choose, **kw)
    agree = tok["pred_exit"] == tok["pred_deep"]  # the first exit's diagnostics: does it agree with the last layer
    oracle_early = first_agreeing(tok["pred_at"]) < len(exits)
    easy = exit_index(_conf(tok, measure, every_exit=True), _as_list(threshold)) < len(exits)  # stops before the last
    baselines = {name: {k: m[k] for k in METRICS + COSTS + ("inference_cost", "train_macs") if k in m}
                 for name, m in baselines.items()}
    summary = {
        "measure": measure, "threshold": float(_as_list(threshold)[0]), "exit_layer": exit_layer, "num_layers": L,
        **({"thresholds": [float(t) for t in threshold]} if cascade else {}),
        "operating_points_chosen_on": "validation" if choose is not None else "the evaluated split",
        "verdict": verdict,
        "n_tokens": int(tok["target"].numel()),
        "full_depth": {k: full[k] for k in ("acc", "ppl")},
        "exit_only": {k: exit_only[k] for k in ("acc", "ppl")},
        "calibrated": {k: calibrated[k] for k in METRICS},
        "oracle": {k: oracle[k] for k in METRICS},
        **({"exits": {"calibrated": calibrated["exits"], "oracle": oracle["exits"]}} if cascade else {}),
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
            "buckets": exit_share_by_bucket(tok["target"], {"exit_share": easy, "oracle_exit_share": oracle_early},
                                            token_counts(train_tokens, vocab_size)),
        }
    write_csv(out / "tradeoff.csv", rows)
    plotted = plot_tradeoff(rows, plot_points(summary), out / "tradeoff.png", title=plot_title(summary))
    atomic_write(out / "tokens.html", lambda f: f.write(tokens_html(
        tok, threshold=threshold, measure=measure, tokenizer=tokenizer, max_tokens=html_tokens, **kw)))
    atomic_write(out / "report.md", lambda f: f.write(_report(summary, rows, plotted, upper_context)))
    write_json(out / "analysis.json", summary)
    return summary
