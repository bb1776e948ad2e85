"""Accuracy against hops from a committed sweep summary (data=chains): one line per model, the routed model's exit
share per hop as bars, mean and std over seeds.

    python scripts/plot_chains.py outputs/reference/lego_study_chains/summary.csv --config +variant=spec \\
        --out outputs/reference/lego_study_chains/accuracy_by_hops.png

Reads the flat by-label numbers every chains run writes to metrics.json (`acc_hops<k>_<model>`,
`exit_share_hops<k>_ashem`; `lego.label_report.headline`), averaged by the sweep summary. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

NAMES = {"dense": "dense {d} layers", "phase1": "phase-1 model (Block 1 alone)", "no_routing": "ASHEM, no routing",
         "ashem": "ASHEM routed (calibrated max-prob)", "learned": "ASHEM routed (learned router)"}


def label(key: str) -> str:
    m = re.fullmatch(r"dense(\d+)", key)
    return NAMES["dense"].format(d=m.group(1)) if m else NAMES.get(key, key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", type=Path)
    ap.add_argument("--config", default=None, help="the summary row's config (default: the first row)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows = list(csv.DictReader(a.summary.open()))
    row = next((r for r in rows if a.config is None or r["config"] == a.config), None)
    if row is None:
        ap.error(f"--config {a.config!r} is not a row of {a.summary}; its configs: "
                 + "; ".join(repr(r["config"]) for r in rows))
    acc = {}
    for col in row:
        m = re.fullmatch(r"acc_hops(\d+)_(\w+?)_mean", col)
        if m and row[col]:
            acc.setdefault(m.group(2), {})[int(m.group(1))] = (float(row[col]),
                                                               float(row[col[:-5] + "_std"] or 0))
    hops = sorted({k for v in acc.values() for k in v})
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    share = [float(row.get(f"exit_share_hops{k}_ashem_mean") or "nan") for k in hops]
    ax.bar(hops, share, 0.5, color="0.85", label="routed: share of answers predicted at the exit")
    for j, key in enumerate(sorted(acc, key=lambda k: (not k.startswith("dense"), k))):
        mean = [acc[key].get(k, (float("nan"), 0))[0] for k in hops]
        std = [acc[key].get(k, (0, 0))[1] for k in hops]
        ax.errorbar(hops, mean, yerr=std, fmt="-o", ms=4, capsize=3, color=f"C{j % 10}", label=label(key))
    ax.set_xlabel("hops the answer needs")
    ax.set_ylabel("test accuracy on answers")
    ax.set_xticks(hops)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{row['config'] or 'chains'} (n={row['n']} seeds)", fontsize=9)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
