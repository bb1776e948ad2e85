"""Copy the small summary files of a finished run or sweep into outputs/reference/<name>/ (for git).

    python scripts/keep_reference.py outputs/runs/2026-12-01/10-00-00 quick
    python scripts/keep_reference.py outputs/sweeps/matched matched

Keeps what a number in the README can be checked against: the summaries, results, histories,
reports and configs; never checkpoints or token caches. A sweep keeps its summary.csv/.md and
each job's files under jobs/<job dir>/.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

KEEP = ("metrics.json", "config_resolved.yaml", "run.json", ".hydra/overrides.yaml", "hard_examples/threshold.json",
        "eval/metrics.json", "eval/analysis.json", "eval/report.md", "eval/tradeoff.csv", "eval/tradeoff.png",
        "generate/metrics.json", "generate/samples.md", "generate/draft_threshold.json", "*/result.json",
        "*/history.jsonl")
SWEEP_FILES = ("summary.csv", "summary.md", "multirun.yaml")


def keep_run(run_dir: Path, out: Path) -> int:
    n = 0
    for pattern in KEEP:
        for src in sorted(run_dir.glob(pattern)):
            dst = out / src.relative_to(run_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a run directory or a sweep directory")
    ap.add_argument("name", help="outputs/reference/<name>/")
    ap.add_argument("--root", type=Path, default=Path("outputs/reference"))
    args = ap.parse_args()
    out = args.root / args.name
    if out.exists():
        shutil.rmtree(out)
    jobs = sorted(p.parent for p in args.source.glob("*/metrics.json"))
    if (args.source / "metrics.json").exists():
        print(f"{keep_run(args.source, out)} files -> {out}")
        return
    for f in SWEEP_FILES:
        if (args.source / f).exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(args.source / f, out / f)
    for job in jobs:
        keep_run(job, out / "jobs" / job.name)
    print(f"{len(jobs)} jobs -> {out}")


if __name__ == "__main__":
    main()
