"""Summarize a `lego-run -m` sweep over seeds: mean ± std per configuration, paired gaps to baselines.

Every job directory holds metrics.json and .hydra/overrides.yaml. A *configuration* is a job's
overrides without `seed=...`; its jobs are its seeds. For every flat number at the top level of
metrics.json (ppl, acc, flop_cost, standard_ppl, dense_ppl_<L>, train_macs_*, ...) the summary
gives the mean and sample standard deviation over seeds; for every baseline perplexity
`<name>_ppl` (phase1_ppl, no_routing_ppl, standard_ppl, ...) it gives the paired per-seed gap
`ppl - <name>_ppl` (ASHEM minus the baseline of the same run, so the same seed) and that gap in
percent of the baseline, as mean and std over seeds. Negative means ASHEM is better.

Written at the sweep root by the Hydra callback (conf/config.yaml):

    hydra:
      callbacks:
        sweep_summary:
          _target_: lego.sweep.SweepSummary

or afterwards by `python -m lego.sweep <sweep dir>` (same functions; scripts/summarize_sweep.py too).

After an Optuna search (`lego-run -m hparams_search=lr_ratio`, whose sweeper writes
optimization_results.yaml) the same callback also picks the best trial by the validation
objective (`val_ppl` or `val_loss`, the job's `objective` key) and only then reads that trial's
test numbers, so nothing is selected on test (SPEC section 6): optuna_summary.json and
optuna_summary.md at the sweep root.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.experimental.callback import Callback

from lego.sweep_tables import _columns, glance_markdown, ranking_markdown, to_markdown

log = logging.getLogger(__name__)

EXCLUDED = ("seed",)  # override keys that do not define a configuration (and are not metrics)
# The test-split numbers of metrics.json reported for an Optuna search's chosen trial.
TEST_METRICS = ("ppl", "acc", "shallow_ratio", "compute_cost", "flop_cost", "wall_cost", "phase1_ppl",
                "no_routing_ppl", "standard_ppl", "hard_ppl_phase1", "hard_ppl_ashem", "easy_ppl_ashem")
VALIDATION_METRICS = ("val_ppl", "val_loss")
# `<x>_ppl` keys that are not a model to pair ASHEM with: its own validation ppl, a saved-compute share
NOT_BASELINES = ("val_ppl", "compute_saved_at_1pct_ppl")
OPTUNA_RESULTS = "optimization_results.yaml"  # written by Hydra's Optuna sweeper at the sweep root


def _job_order(path: Path) -> Tuple[float, str]:
    """Hydra job directories start with the job number: order 2_ before 10_."""
    head = path.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else math.inf, path.name)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def read_overrides(job: Path) -> List[str]:
    """The job's command-line overrides from .hydra/overrides.yaml ([] if absent)."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def read_job_config(job: Path) -> Any:
    """The job's composed config (.hydra/config.yaml) as an OmegaConf node; None when absent."""
    path = job / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def read_objective(cfg: Any) -> str:
    """The composed config's `objective` key (`read_job_config`); `val_ppl` when absent."""
    return "val_ppl" if cfg is None else str(cfg.get("objective", "val_ppl"))


def read_full_depth(cfg: Any) -> Optional[int]:
    """The full depth of a composed config (`read_job_config`): the last of `blocks`, else `phase2.layers`; None
    when absent."""
    if cfg is None:
        return None
    from omegaconf import OmegaConf

    blocks = cfg.get("blocks")
    layers = blocks[-1] if blocks else OmegaConf.select(cfg, "phase2.layers")
    return None if layers is None else int(layers)


def answer_gaps(metrics: Dict[str, Any], full_depth: Optional[int]) -> Dict[str, float]:
    """data=chains: per hop count k, the calibrated router's answer accuracy minus the dense full-depth model's
    (`answer_gap_hops<k>`, a paired difference within one job: the moonshot's second condition)."""
    out = {}
    for key, acc in metrics.items():
        m = re.fullmatch(r"acc_hops(\d+)_ashem", key)
        dense = None if m is None else metrics.get(f"acc_hops{m.group(1)}_dense{full_depth}")
        if isinstance(dense, (int, float)) and isinstance(acc, (int, float)):
            out[f"answer_gap_hops{m.group(1)}"] = float(acc) - float(dense)
    return out


def collect_jobs(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One dict per finished job (a subdirectory holding metrics.json), in job-number order:
    `{"job", "overrides", "config", "config_overrides", "seed", "objective", "full_depth", "metrics"}` (`config`:
    the overrides but seed, space-joined; `config_overrides`: the same as a list; `objective`: see
    `read_objective`; `full_depth`: `read_full_depth`); unfinished jobs are skipped."""
    jobs = []
    for job in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir()), key=_job_order):
        metrics_path = job / "metrics.json"
        if not metrics_path.exists():
            if not job.name.startswith("."):
                log.warning("skipping %s: no metrics.json (unfinished or failed job)", job.name)
            continue
        metrics = json.loads(metrics_path.read_text())
        overrides = read_overrides(job)
        seed = metrics.get("seed")
        if seed is None:  # fall back on the override
            seed = next((o.split("=", 1)[1] for o in overrides if _override_key(o) == "seed"), None)
        config = [o for o in overrides if _override_key(o) not in EXCLUDED]
        cfg = read_job_config(job)  # read once: the objective and the full depth
        jobs.append({"job": job.name, "overrides": overrides, "seed": seed, "metrics": metrics,
                     "config": " ".join(config), "config_overrides": config, "objective": read_objective(cfg),
                     "full_depth": read_full_depth(cfg)})
    return jobs


def headline_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The flat numbers at the top level of metrics.json (booleans, nested values and `seed` left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in EXCLUDED}


def baseline_names(metrics: Dict[str, Any]) -> List[str]:
    """Names of the baselines whose perplexity `<name>_ppl` sits beside ASHEM's `ppl`."""
    if not isinstance(metrics.get("ppl"), (int, float)):
        return []
    return [k[: -len("_ppl")] for k in headline_metrics(metrics)
            if re.fullmatch(r".+_ppl", k) and k not in NOT_BASELINES]


def mean_std(values: List[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); the std of a single value is None (undefined)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(jobs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per configuration, in order of first job: `config`, `n`, `seeds` (and `_overrides`, the
    configuration as a list, which the files leave out), then for each metric
    `<m>_mean`, `<m>_std` (data=chains adds `answer_gap_hops<k>`: `answer_gaps`), and for each baseline
    `ppl_minus_<name>_{mean,std}` and
    `ppl_minus_<name>_pct_{mean,std}` (the per-seed gap in percent of the baseline)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault(job["config"], []).append(job)
    rows = []
    for config, members in groups.items():
        seeds = [j["seed"] for j in members]
        if len(set(map(str, seeds))) < len(seeds):
            log.warning("configuration %r has a seed more than once (%s): its std is not over distinct seeds",
                        config, seeds)
        values: Dict[str, List[float]] = {}
        for j in members:
            m = {**headline_metrics(j["metrics"]), **answer_gaps(j["metrics"], j.get("full_depth"))}
            for k, v in m.items():
                values.setdefault(k, []).append(v)
            for name in baseline_names(j["metrics"]):
                base = m[f"{name}_ppl"]
                gap = m["ppl"] - base  # same job, so same seed: a paired difference
                values.setdefault(f"ppl_minus_{name}", []).append(gap)
                values.setdefault(f"ppl_minus_{name}_pct", []).append(100.0 * gap / base)
        row: Dict[str, Any] = {"config": config, "_overrides": members[0]["config_overrides"], "n": len(members),
                               "seeds": " ".join("?" if s is None else str(s) for s in seeds)}
        for k, vs in values.items():
            if len(vs) < len(members):
                log.warning("configuration %r: %s is in %d of %d jobs; its mean and std are over those",
                            config, k, len(vs), len(members))
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std(vs)
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Write summary.csv and summary.md into `sweep_dir`; return the rows ([] and nothing written
    when no job finished)."""
    sweep_dir = Path(sweep_dir)
    rows = summarize(collect_jobs(sweep_dir))
    if not rows:
        return rows
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)  # floats as repr: they read back exactly
    ranking = ranking_markdown(rows)
    (sweep_dir / "summary.md").write_text(glance_markdown(rows) + (f"\n{ranking}" if ranking else "")
                                          + "\n" + to_markdown(rows))
    return rows


def plot_summary(rows: List[Dict[str, Any]], path: Path) -> bool:
    """Test ppl and acc against compute_cost, one point per configuration with std error bars
    (needs matplotlib: pip install -e '.[plots]'); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s (pip install -e '.[plots]')", path.name)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ppl", "test perplexity"), (axes[1], "acc", "test accuracy")):
        pts = [r for r in rows if r.get(f"{key}_mean") is not None and r.get("compute_cost_mean") is not None]
        ax.errorbar([r["compute_cost_mean"] for r in pts], [r[f"{key}_mean"] for r in pts],
                    yerr=[r[f"{key}_std"] or 0.0 for r in pts], fmt="o", capsize=3)
        for r in pts:
            ax.annotate(r["config"] or "(defaults)", (r["compute_cost_mean"], r[f"{key}_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("compute_cost (layers run / full depth)")
        ax.set_ylabel(f"{label} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    fig.suptitle("ASHEM sweep: quality against compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- an Optuna search: the best trial on validation, then its test numbers ---------------------------
def _matches(overrides: List[str], params: Dict[str, Any]) -> bool:
    """Whether a job's overrides set every key of `params` to its value (floats to 1e-9 relative)."""
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    for key, want in params.items():
        if key not in given:
            return False
        try:
            if not math.isclose(float(given[key]), float(want), rel_tol=1e-9, abs_tol=0.0):
                return False
        except (TypeError, ValueError):
            if str(given[key]) != str(want):
                return False
    return True


def best_trial(sweep_dir: Path) -> Dict[str, Any]:
    """The best trial by the validation objective and, separately, its test metrics.

    The trial is the job matching optimization_results.yaml's best params (the best finished job
    when that file is missing: an interrupted search). Raises FileNotFoundError when no job
    finished, ValueError when the jobs disagree on the objective or no job has the best params.
    """
    sweep_dir = Path(sweep_dir)
    trials = collect_jobs(sweep_dir)
    if not trials:
        raise FileNotFoundError(f"{sweep_dir}: no finished job (a subdirectory with metrics.json)")
    objectives = {t["objective"] for t in trials}
    if len(objectives) > 1:
        raise ValueError(f"{sweep_dir}: jobs optimize different objectives ({', '.join(sorted(objectives))})")
    objective = objectives.pop()
    value = {t["job"]: t["metrics"].get(objective) for t in trials}
    scored = [t for t in trials if isinstance(value[t["job"]], (int, float)) and not math.isnan(value[t["job"]])]
    if not scored:
        raise ValueError(f"{sweep_dir}: no job reports {objective} in metrics.json")
    best_params: Optional[Dict[str, Any]] = None
    reported: Optional[float] = None
    if (sweep_dir / OPTUNA_RESULTS).is_file():
        from omegaconf import OmegaConf

        res = OmegaConf.to_container(OmegaConf.load(sweep_dir / OPTUNA_RESULTS))
        best_params, reported = res.get("best_params") or {}, res.get("best_value")
        scored = [t for t in scored if _matches(t["overrides"], best_params)]
        if not scored:
            raise ValueError(f"{sweep_dir / OPTUNA_RESULTS}: no job has the best params {best_params}")
    best = min(scored, key=lambda t: value[t["job"]])
    m = best["metrics"]
    return {
        "sweep_dir": str(sweep_dir),
        "objective": objective,
        "n_trials": len(trials),
        "best": {"job": best["job"], "params": best_params if best_params is not None else best["overrides"],
                 objective: value[best["job"]], "optuna_best_value": reported,
                 "validation": {k: m[k] for k in VALIDATION_METRICS if k in m}},
        "best_test": {k: m[k] for k in TEST_METRICS if k in m},
        "trials": [{"job": t["job"], objective: value[t["job"]]} for t in trials],
    }


def best_trial_markdown(summary: Dict[str, Any]) -> str:
    obj, best = summary["objective"], summary["best"]
    lines = [f"Best of {summary['n_trials']} trials by {obj} (validation split): {best['job']}",
             f"  params: {best['params']}", "", f"| job | {obj} |", "|---|---|"]
    lines += [f"| {t['job']}{' (best)' if t['job'] == best['job'] else ''} | {t[obj]:.6g} |"
              for t in summary["trials"] if isinstance(t[obj], (int, float))]
    lines += ["", "Test split, the best trial only (not used to choose it):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in summary["best_test"].items() if isinstance(v, (int, float))]
    return "\n".join(lines) + "\n"


def write_best_trial(sweep_dir: Path) -> Dict[str, Any]:
    """`best_trial`, written as optuna_summary.json and optuna_summary.md into `sweep_dir`."""
    summary = best_trial(sweep_dir)
    (Path(sweep_dir) / "optuna_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (Path(sweep_dir) / "optuna_summary.md").write_text(best_trial_markdown(summary))
    return summary


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, write summary.csv and summary.md at the sweep root,
    and after an Optuna search also optuna_summary.json/.md (the best trial on validation)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            log.warning("no sweep summary: %s is not a directory", sweep_dir)
            return
        rows = write_summary(sweep_dir)
        if rows:
            log.info("sweep summary (%d configurations): %s", len(rows), sweep_dir / "summary.md")
        else:
            log.warning("no sweep summary: no job in %s finished (no metrics.json)", sweep_dir)
        if rows and (sweep_dir / OPTUNA_RESULTS).is_file():
            try:
                best = write_best_trial(sweep_dir)
            except ValueError as e:
                log.warning("no best-trial summary: %s", e)
            else:
                log.info("best trial by %s: %s (%s)", best["objective"], best["best"]["job"],
                         sweep_dir / "optuna_summary.md")


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m lego.sweep <sweep dir>`: what the callback writes, plus summary.png (with matplotlib)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(prog="python -m lego.sweep", description=__doc__.splitlines()[0])
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
    if (args.sweep_dir / OPTUNA_RESULTS).is_file():
        try:
            print(best_trial_markdown(write_best_trial(args.sweep_dir)), end="")
        except ValueError as e:
            print(f"summarize_sweep: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
