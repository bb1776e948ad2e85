"""After an Optuna sweep: the best trial by the validation objective, then its test numbers.

    lego-run -m hparams_search=lr_ratio
    python -m lego.sweep_summary outputs/sweeps/2026-11-24/10-00-00

Hydra's Optuna sweeper writes `optimization_results.yaml` (best params and value) into the
sweep directory; each trial is a job directory with `.hydra/overrides.yaml` and `metrics.json`.
The best trial is chosen on the objective (`val_ppl` or `val_loss`: the routed model on the
validation split) and only then are its test metrics read, so nothing is selected on test
(SPEC section 6). Writes `optuna_summary.json` into the sweep directory and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

# The test-split numbers of metrics.json reported for the chosen trial.
TEST_METRICS = ("ppl", "acc", "shallow_ratio", "compute_cost", "flop_cost", "wall_cost", "phase1_ppl",
                "no_routing_ppl", "standard_ppl", "hard_ppl_phase1", "hard_ppl_ashem")
VALIDATION_METRICS = ("val_ppl", "val_loss")


def read_trials(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Every finished job of the sweep: `{job, overrides, objective, value, metrics}` in job-number order.

    `objective` is the job's composed `objective` key (`val_ppl` when absent) and `value` its
    number in the job's metrics.json. Jobs without metrics.json (failed, unfinished) are left out.
    """
    trials = []
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / "metrics.json").is_file()]
    for job in sorted(jobs, key=lambda p: (_job_num(p), p.name)):
        metrics = json.loads((job / "metrics.json").read_text())
        hydra_dir = job / ".hydra"
        overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")] \
            if (hydra_dir / "overrides.yaml").is_file() else []
        objective = "val_ppl"
        if (hydra_dir / "config.yaml").is_file():
            objective = str(OmegaConf.load(hydra_dir / "config.yaml").get("objective", objective))
        trials.append({"job": job.name, "overrides": overrides, "objective": objective,
                       "value": metrics.get(objective), "metrics": metrics})
    return trials


def _job_num(job: Path) -> int:
    head = job.name.split("_", 1)[0]
    return int(head) if head.isdigit() else sys.maxsize


def _matches(overrides: List[str], params: Dict[str, Any]) -> bool:
    """Whether a job's overrides set every key of `params` to its value (floats to 1e-9 relative)."""
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    for key, want in params.items():
        if key not in given:
            return False
        got = given[key]
        try:
            if not math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=0.0):
                return False
        except (TypeError, ValueError):
            if str(got) != str(want):
                return False
    return True


def summarize(sweep_dir: Path) -> Dict[str, Any]:
    """The best trial by the validation objective and, separately, its test metrics.

    Raises FileNotFoundError when the sweep has no finished job, ValueError when the jobs
    disagree on the objective or `optimization_results.yaml` names a trial no job matches.
    Without `optimization_results.yaml` (an interrupted sweep) the best finished job is taken.
    """
    sweep_dir = Path(sweep_dir)
    trials = read_trials(sweep_dir)
    if not trials:
        raise FileNotFoundError(f"{sweep_dir}: no finished job (a subdirectory with metrics.json)")
    objectives = {t["objective"] for t in trials}
    if len(objectives) > 1:
        raise ValueError(f"{sweep_dir}: jobs optimize different objectives ({', '.join(sorted(objectives))})")
    objective = objectives.pop()
    scored = [t for t in trials if isinstance(t["value"], (int, float)) and not math.isnan(t["value"])]
    if not scored:
        raise ValueError(f"{sweep_dir}: no job reports {objective} in metrics.json")
    results_path = sweep_dir / "optimization_results.yaml"
    best_params: Optional[Dict[str, Any]] = None
    reported: Optional[float] = None
    if results_path.is_file():
        res = OmegaConf.to_container(OmegaConf.load(results_path))
        best_params, reported = res.get("best_params") or {}, res.get("best_value")
        candidates = [t for t in scored if _matches(t["overrides"], best_params)]
        if not candidates:
            raise ValueError(f"{results_path}: no job has the best params {best_params}")
        best = min(candidates, key=lambda t: t["value"])
    else:
        best = min(scored, key=lambda t: t["value"])
    m = best["metrics"]
    return {
        "sweep_dir": str(sweep_dir),
        "objective": objective,
        "n_trials": len(trials),
        "best": {"job": best["job"], "params": best_params if best_params is not None else best["overrides"],
                 objective: best["value"], "optuna_best_value": reported,
                 "validation": {k: m[k] for k in VALIDATION_METRICS if k in m}},
        "best_test": {k: m[k] for k in TEST_METRICS if k in m},
        "trials": [{"job": t["job"], objective: t["value"]} for t in trials],
    }


def to_markdown(summary: Dict[str, Any]) -> str:
    obj, best = summary["objective"], summary["best"]
    lines = [f"Best of {summary['n_trials']} trials by {obj} (validation split): {best['job']}",
             f"  params: {best['params']}", "", f"| job | {obj} |", "|---|---|"]
    lines += [f"| {t['job']}{' (best)' if t['job'] == best['job'] else ''} | {t[obj]:.6g} |"
              for t in summary["trials"] if isinstance(t[obj], (int, float))]
    lines += ["", "Test split, the best trial only (not used to choose it):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in summary["best_test"].items() if isinstance(v, (int, float))]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lego.sweep_summary", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    args = ap.parse_args(argv)
    try:
        summary = summarize(args.sweep_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"sweep_summary: error: {e}", file=sys.stderr)
        return 2
    (args.sweep_dir / "optuna_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(to_markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
