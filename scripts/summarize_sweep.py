"""Summarize a `lego-run -m` sweep: one row per configuration, mean ± std over its seeds.

    python scripts/summarize_sweep.py outputs/sweeps/2026-11-24/10-00-00

Writes summary.csv, summary.md and (with matplotlib: pip install -e '.[plots]') summary.png
into the sweep directory, and prints the Markdown table. The work is lego.sweep's, which the
`lego.sweep.SweepSummary` Hydra callback also runs at the end of every multirun.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lego.sweep import plot_summary, to_markdown, write_summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    args = ap.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"summarize_sweep: error: sweep_dir {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    rows = write_summary(args.sweep_dir)
    if not rows:
        print(f"summarize_sweep: error: no finished job (subdirectory with metrics.json) in {args.sweep_dir}",
              file=sys.stderr)
        return 2
    plot_summary(rows, args.sweep_dir / "summary.png")
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
