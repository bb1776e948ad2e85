"""Summarize a `lego-run -m` sweep: one row per job with its overrides and test metrics.

    python scripts/summarize_sweep.py outputs/sweeps/2026-11-24/10-00-00

Writes summary.csv, summary.md and (with matplotlib: pip install -e '.[plots]') summary.png
into the sweep directory, and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("summarize_sweep")

METRICS = ["ppl", "acc", "shallow_ratio", "compute_cost", "flop_cost", "wall_cost", "threshold", "phase1_ppl",
           "no_routing_ppl", "standard_ppl", "hard_ppl_phase1", "hard_ppl_ashem"]


def read_overrides(job: Path) -> list:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def collect(sweep_dir: Path) -> list:
    """One dict per finished job (a subdirectory holding metrics.json), in job-number order."""
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        metrics_path = job / "metrics.json"
        if not metrics_path.exists():
            log.warning("skipping %s: no metrics.json (unfinished or failed job)", job.name)
            continue
        m = json.loads(metrics_path.read_text())
        row = {"job": job.name, "overrides": " ".join(read_overrides(job))}
        row.update({k: m.get(k) for k in METRICS})
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def to_markdown(rows: list) -> str:
    cols = ["job", *[k for k in METRICS if any(r.get(k) is not None for r in rows)]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no summary.png (pip install -e '.[plots]')")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ppl", "test perplexity"), (axes[1], "acc", "test accuracy")):
        xs = [r["compute_cost"] for r in rows if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        ax.plot(xs, ys, "o")
        for r in rows:
            if r.get(key) is not None:
                ax.annotate(r["job"].split("_", 1)[-1], (r["compute_cost"], r[key]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("compute_cost (layers run / full depth)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("ASHEM sweep: quality against compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    args = ap.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"summarize_sweep: error: sweep_dir {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    rows = collect(args.sweep_dir)
    if not rows:
        print(f"summarize_sweep: error: no finished job (subdirectory with metrics.json) in {args.sweep_dir}",
              file=sys.stderr)
        return 2
    with open(args.sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "overrides", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    md = to_markdown(rows)
    (args.sweep_dir / "summary.md").write_text(md)
    plot(rows, args.sweep_dir / "summary.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
