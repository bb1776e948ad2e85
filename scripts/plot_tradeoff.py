"""Re-draw a run's quality-against-compute picture from its eval directory, without the model.

    python scripts/plot_tradeoff.py outputs/runs/my-run/eval
    python scripts/plot_tradeoff.py outputs/runs/my-run/eval --out /tmp/tradeoff.png

Reads tradeoff.csv and analysis.json (both written by `lego.analysis.analyze`) and writes
tradeoff.png (needs matplotlib: pip install -e '.[plots]').
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lego.pictures import plot_points, plot_title, plot_tradeoff
from lego.report import read_csv


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir", type=Path, help="a run's eval directory (holds tradeoff.csv and analysis.json)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the PNG (default: EVAL_DIR/tradeoff.png)")
    args = ap.parse_args(argv)
    missing = [n for n in ("tradeoff.csv", "analysis.json") if not (args.eval_dir / n).is_file()]
    if missing:
        print(f"plot_tradeoff: error: eval_dir {args.eval_dir} has no {' or '.join(missing)}", file=sys.stderr)
        return 2
    summary = json.loads((args.eval_dir / "analysis.json").read_text())
    out = args.out or args.eval_dir / "tradeoff.png"
    if not plot_tradeoff(read_csv(args.eval_dir / "tradeoff.csv"), plot_points(summary), out,
                         title=plot_title(summary)):
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
