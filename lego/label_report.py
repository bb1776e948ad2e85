"""Writers for the by-label evaluation (`lego.labels`): a report.md section and by_label.png.

Formatting only: every number comes from the summary `lego.stages.by_label.stage_by_label` builds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

from lego.analysis import PLOT_HINT
from lego.artifacts import atomic_write
from lego.report import _fmt, _table

log = logging.getLogger(__name__)

MARKER = "## Routing by label"  # the section's heading; a rewrite replaces everything from it on


def _hops(table: Dict[str, dict]) -> List[int]:
    return sorted(int(k.split()[0]) for k in table if k.endswith(" hops") or k.endswith(" hop"))


def model_tables(s: dict) -> Dict[str, Dict[str, dict]]:
    """Every model's per-label table, the routers' included (name -> table)."""
    tables = dict(s["models"])
    for name, r in s["routers"].items():
        if "by_label" in r:
            tables[f"{name} router"] = r["by_label"]
    return tables


def short_name(name: str) -> str:
    """A model's or router's name in flat keys: phase1, no_routing, dense<d>, ashem (the calibrated router), learned,
    oracle."""
    if name.startswith("dense "):
        return "dense" + name.split()[1].split("-")[0]
    return {"ashem, no routing": "no_routing", "calibrated": "ashem", "oracle by label": "oracle"}.get(
        name, "phase1" if name.startswith("phase-1") else name.replace(" ", "_"))


def answer_acc(table: Dict[str, dict], least: int = 1, most: Optional[int] = None) -> Optional[float]:
    """Accuracy on the answers of `least`..`most` hops together (None when there are none)."""
    rows = [table[f"{k} hops"] for k in _hops(table) if k >= least and (most is None or k <= most)]
    n = sum(r["n_tokens"] for r in rows)
    return sum(r["correct"] for r in rows) / n if n else None


def headline(s: dict) -> Dict[str, float]:
    """The flat numbers of a by-label summary for metrics.json and a sweep's summary: per model and router
    `acc_2plus_<name>` (answers of 2+ hops) and `acc_hops<k>_<name>`, for routers `exit_share_hops<k>_<name>`; per router its 2+-hop answers sent up
    (`sent_up_2plus_<router>`), the unpredictable share of what it sends up, and for the learned and oracle
    routers their ppl and flop cost (`ppl_router_<router>`, `flop_cost_router_<router>`)."""
    out: Dict[str, float] = {}
    for name, table in [*s["models"].items(), *((n, r["by_label"]) for n, r in s["routers"].items()
                                                if "by_label" in r)]:
        key = short_name(name)
        if answer_acc(table, 2) is not None:
            out[f"acc_2plus_{key}"] = answer_acc(table, 2)
        out.update({f"acc_hops{k}_{key}": table[f"{k} hops"]["acc"] for k in _hops(table)})
        out.update({f"exit_share_hops{k}_{key}": table[f"{k} hops"]["exit_share"] for k in _hops(table)
                    if "exit_share" in table[f"{k} hops"]})
    for name, r in s["routers"].items():
        key = short_name(name)
        truth = r.get("truth", {})
        for field, flat in (("sent_up_2plus_hops", "sent_up_2plus"), ("unpredictable_share_of_sent_up",
                                                                        "unpredictable_sent_up")):
            if field in truth:
                out[f"{flat}_{key}"] = truth[field]
        if key != "ashem":
            out.update({f"ppl_router_{key}": r["ppl"], f"flop_cost_router_{key}": r.get("flop_cost"),
                        f"shallow_ratio_router_{key}": r["shallow_ratio"]})
    return {k: v for k, v in out.items() if v is not None}


def section(s: dict, plotted: bool) -> str:
    """The report.md section: accuracy and ppl per label per model, exit share per label per router, and
    routing against the truth."""
    tables = model_tables(s)
    blocks = [MARKER, (f"Per label on the {s['split']} split ({s['n_tokens']} tokens): a token's label says what "
                       "predicting it needs: `k hops` an answer that needs k lookups, `unpredictable` a freshly drawn "
                       "name or value, `format` the program's punctuation, `text` a line of natural text. "
                       if "label_counts" in s else
                       f"The {s['split']} split ({s['n_tokens']} tokens) carries no labels (only data=chains does): "
                       "the routers' overall numbers alone. ") +
              "The calibrated and learned routers' rows come from the routed pass itself (upper_context="
              f"'{s.get('upper_context', 'full')}', as `Trainer.evaluate` runs it); the oracle by label is applied to "
              "one unrouted pass (exact for upper_context='full'); each table's `all` row is the sum of its rows."]
    if tables:
        labels = list(next(iter(tables.values())))
        for metric in ("acc", "ppl"):
            blocks += [f"### {'Accuracy' if metric == 'acc' else 'Perplexity'} by label",
                       _table(["model", *labels], ([name, *(t.get(k, {}).get(metric) for k in labels)]
                                                    for name, t in tables.items()))]
    routers = s["routers"]
    if routers:
        blocks += ["### Routers",
                   _table(["router", "acc", "ppl", "shallow_ratio", "compute_cost", "flop_cost",
                           "2+ hop answers sent up", "sent-up tokens unpredictable"],
                          ([name, r["acc"], r["ppl"], r["shallow_ratio"], r["compute_cost"], r.get("flop_cost"),
                            r.get("truth", {}).get("sent_up_2plus_hops"),
                            r.get("truth", {}).get("unpredictable_share_of_sent_up")] for name, r in routers.items()))]
        with_labels = {n: r for n, r in routers.items() if "by_label" in r}
        if with_labels:
            labels = list(next(iter(with_labels.values()))["by_label"])
            blocks += ["Exit share per label (the share of each label's tokens predicted at the exit):",
                       _table(["router", *labels], ([n, *(r["by_label"][k].get("exit_share") for k in labels)]
                                                    for n, r in with_labels.items()))]
        if "oracle by label" in routers:
            o = routers["oracle by label"]
            blocks.append(f"Oracle by label: Block 1 solves answers of up to **{o['solved_hops']}** hops on validation "
                          f"(its accuracy within {_fmt(o['tolerance'])} of the last layer's at every hop count up to "
                          "there); it sends up exactly the answers deeper than that, and lets every other token exit.")
        if "learned" in routers:
            r = routers["learned"]
            blocks.append(f"Learned router: a logistic probe on the exit's hidden state, fit on validation to predict "
                          f"whether the last layer's NLL of the target is lower than the exit's; threshold "
                          f"{r['threshold']:.6g} sends up the share {_fmt(r['hard_ratio'])} of validation tokens "
                          f"(validation exit share {_fmt(r['validation_shallow_ratio'])}).")
            live = r.get("live", {})
            if "ppl" in live:
                blocks.append(f"In routed evaluation (upper_context='{live['upper_context']}', `Trainer.evaluate`), the "
                              f"learned router gives ppl {_fmt(live['ppl'])}, accuracy {_fmt(live['acc'])} at exit "
                              f"share {_fmt(live['shallow_ratio'])} (flop cost {_fmt(live.get('flop_cost'))}); "
                              "eval/learned_router.pt holds it, and stage generate decodes with it.")
            elif live:
                blocks.append(f"Routed evaluation of the learned router: {live['skipped']}.")
    if s["models"]:
        blocks.append("![accuracy by hops](by_label.png)" if plotted else
                      f"by_label.png was not drawn: "
                      f"{'matplotlib is not installed (' + PLOT_HINT + ')' if plotted is None else 'no answers'}.")
    return "\n\n".join(blocks) + "\n"


def write_section(path: Path, text: str) -> None:
    """Append `text` to report.md (or start it), replacing a by-label section an earlier run appended."""
    old = path.read_text() if path.is_file() else "# Evaluation\n\n"
    old = old.split(MARKER)[0].rstrip("\n") + "\n\n"
    atomic_write(path, lambda f: f.write(old + text))


def plot(s: dict, path: Path, curve: Optional[List[dict]] = None):
    """Accuracy against hops, one line per model, and each router's exit share per hop as bars; a third
    panel places the routers and the models that have a cost on ppl against compute_cost, over the threshold
    sweep `curve` (tradeoff.csv's rows) when given. True when drawn, None without matplotlib, False when no
    token is an answer."""
    tables = model_tables(s)
    hops = _hops(next(iter(tables.values()))) if tables else []
    if not hops:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: no %s (%s)", path.name, PLOT_HINT)
        return None
    fig = Figure(figsize=(15, 4.4))
    ax_acc, ax_share, ax_cost = fig.subplots(1, 3)
    for j, (name, t) in enumerate(tables.items()):
        ax_acc.plot(hops, [t[f"{k} hops"]["acc"] for k in hops], "-o", ms=4, color=f"C{j % 10}", label=name)
    ax_acc.set_xlabel("hops the answer needs")
    ax_acc.set_ylabel(f"accuracy on answers ({s['split']})")
    ax_acc.set_xticks(hops)
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(fontsize=7)
    routers = {n: r for n, r in s["routers"].items() if "by_label" in r}
    width = 0.8 / max(len(routers), 1)
    for j, (name, r) in enumerate(routers.items()):
        xs = [k - 0.4 + width * (j + 0.5) for k in hops]
        ax_share.bar(xs, [r["by_label"][f"{k} hops"]["exit_share"] for k in hops], width, label=name)
    ax_share.set_xlabel("hops the answer needs")
    ax_share.set_ylabel("share of answers predicted at the exit")
    ax_share.set_xticks(hops)
    ax_share.set_ylim(0, 1.3)
    ax_share.legend(fontsize=7, loc="upper center", ncol=3)
    grid = sorted((r["compute_cost"], r["ppl"]) for r in curve or () if r["kind"] == "grid")
    if grid:
        ax_cost.plot(*zip(*grid), "-", color="tab:blue", lw=1, alpha=0.6, label="threshold sweep (tradeoff.csv)")
    for j, (name, m) in enumerate({**s.get("points", {}), **s["routers"]}.items()):
        if m.get("compute_cost") is not None:
            ax_cost.plot(m["compute_cost"], m["ppl"], "s^vDPXph<>"[j % 10], ms=8, mfc="none", mew=1.6,
                         color=f"C{j % 10}", label=name)
    ax_cost.set_xlabel("compute_cost (layers run / full depth)")
    ax_cost.set_ylabel(f"{s['split']} perplexity")
    ax_cost.legend(fontsize=7)
    for ax in (ax_acc, ax_share, ax_cost):
        ax.grid(alpha=0.3)
    fig.suptitle(f"By label: exit at layer {s['exit_layer']} of {s['num_layers']}")
    fig.tight_layout()
    atomic_write(path, fig.savefig, mode="wb")
    return True
