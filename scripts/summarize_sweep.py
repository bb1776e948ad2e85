"""Summarize a `lego-run -m` sweep: one row per configuration, mean ± std over its seeds.

    python scripts/summarize_sweep.py outputs/sweeps/2026-11-24/10-00-00   # = python -m lego.sweep <dir>

Writes summary.csv, summary.md and (with matplotlib: pip install -e '.[plots]') summary.png
into the sweep directory, and prints the Markdown table; after an Optuna search also
optuna_summary.json/.md (the best trial on validation, then its test numbers). The work is
lego.sweep's, which the `lego.sweep.SweepSummary` Hydra callback also runs after every multirun.
"""

from __future__ import annotations

import sys

from lego.sweep import main

if __name__ == "__main__":
    sys.exit(main())
