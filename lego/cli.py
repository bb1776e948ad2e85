"""`lego-run`: compose the config with Hydra, then hand it to `lego.run.run`.

    lego-run                                      # the default run (offline Shakespeare, tiny model)
    lego-run hard_example_ratio=0.3 model=small   # override any key
    lego-run -m hard_example_ratio=0.3,0.5,0.7    # a sweep; phase 1 is trained once
    lego-run --help                               # groups, options and the composed config

Bad input ends with exit status 2 and one line naming the key, a diverged loss with exit status 1
and one line naming the stage, Ctrl-C with 130; the run directory is printed even when a stage
fails, and rerunning the same command with hydra.run.dir=<run dir> resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lego import distributed
from lego.artifacts import LockBusy, RunDirTaken, StageError
from lego.config import ASHEMConfig, ConfigError, register_configs, rewrite_alias_overrides
from lego.progress import progress_logging
from lego.run import run
from lego.training import TrainingDiverged

log = logging.getLogger("lego")

# The config groups ship inside the package (lego/conf/; the checkout's top-level conf/ is a link to
# it), so an installed console script finds them from any directory, editable install or not.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")

register_configs()

SWEPT_ENV = "LEGO_SWEPT_KEYS"
ARGV_ENV = "LEGO_ARGV"  # the command line as typed, JSON; launcher workers see it too


def typed_argv() -> list:
    """The command line `main()` saw before rewriting it (for run.json's provenance); sys.argv
    when lego-run was not started through `main()`."""
    raw = os.environ.get(ARGV_ENV)
    return json.loads(raw) if raw else list(sys.argv)


def swept_keys(args) -> list:
    """Keys that a multirun sweeps over (`k=a,b`, `k=range(...)`, ...), in command-line order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports bad syntax itself, with a better message
        return []
    return [o.get_key_element() for o in parsed if o.is_sweep_override()]


def job_dirname(num, task_overrides, *, _root_=None) -> str:
    """Sweep job directory: `<num>_<swept key=value,...>`, short enough for any file system.

    Only the swept keys name the job (the fixed overrides are in .hydra/overrides.yaml): those
    swept on the command line, and the search space of a sweeper's `hydra.sweeper.params`
    (Optuna's, from an hparams_search preset); without that information, all overrides are
    used, cut to 120 characters plus a hash.
    """
    import hashlib

    items = [str(o) for o in task_overrides]
    searched = OmegaConf.select(_root_, "hydra.sweeper.params", default=None) if _root_ is not None else None
    swept = [*os.environ.get(SWEPT_ENV, "").split("\n"), *map(str, searched or {})]
    keys = {k.lstrip("+~") for k in swept if k}  # +variant=a,b sweeps the key variant
    chosen = [o for o in items if o.split("=", 1)[0].lstrip("+~") in keys] if keys else items
    name = ",".join(chosen).replace("/", "_")
    if len(name) > 120:
        name = f"{name[:100]}..{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return f"{num}_{name}" if name else str(num)


OmegaConf.register_new_resolver("lego_job_dir", job_dirname, replace=True)

# conf/hydra/launcher/joblib.yaml keeps the plugin's name so that `hydra/launcher=joblib` picks our
# settings; Hydra then checks it against the plugin's schema of that name and warns that this
# matching is deprecated, in the parent and again in each worker (which imports this module).
warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/joblib' is validated against ConfigStore schema")


def to_config(cfg: DictConfig) -> ASHEMConfig:
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ASHEMConfig)
    return obj


@contextlib.contextmanager
def own_gpu():
    """Under hydra/launcher=joblib with several GPUs, this job's own one (the current CUDA device, which
    device=auto|cuda uses) for as long as it runs; a no-op otherwise.

    torch.cuda.set_device, not CUDA_VISIBLE_DEVICES: joblib reuses its worker processes, and a worker
    that has already started CUDA for an earlier job ignores a changed CUDA_VISIBLE_DEVICES.
    """
    hc = HydraConfig.get()
    joblib = hc.mode == RunMode.MULTIRUN and "joblib" in str(hc.launcher.get("_target_", ""))
    if not joblib or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        yield
        return
    with distributed.job_slot(Path(hc.sweep.dir) / ".lego" / "gpu_slots") as slot:
        gpu = distributed.gpu_for_slot(slot, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        log.info("sweep job %s: slot %d, cuda:%d", hc.job.num, slot, gpu)
        yield


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    distributed.setup()  # the tasks of a Slurm job that a launcher (submitit) started; joined already under torchrun
    distributed.quiet_logging()  # under torchrun, ranks above 0 log warnings only
    try:
        distributed.agree_run_dir(run_dir)
        config = to_config(cfg)
        keep_hydra_record(run_dir)
        with progress_logging(), own_gpu():  # Hydra's console handler, set up by now, prints above progress bars
            summary = run(config, run_dir, argv=typed_argv())
    except (ConfigError, StageError, LockBusy, TrainingDiverged) as e:
        if isinstance(e, RunDirTaken):
            keep_hydra_record(run_dir, restore=True)
        # Bad input (exit 2) or a diverged loss (exit 1): one line naming the key or the stage, no
        # traceback (Hydra would print one). Any other exception is a bug and keeps its traceback.
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        logging.getLogger("lego").debug("usage error", exc_info=True)  # full trace in the run's log file only
        print(f"lego-run: error: {line}\nrun dir: {run_dir}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingDiverged) else 2)
    except KeyboardInterrupt:
        hc = HydraConfig.get()
        exit_interrupted(f"hydra.sweep.dir={hc.sweep.dir}" if hc.mode == RunMode.MULTIRUN
                         else f"hydra.run.dir={run_dir}")
    except Exception:
        log.exception("lego-run failed; run dir: %s", run_dir)
        raise
    print(f"run dir: {run_dir}")
    return summary.get(config.objective, float("nan"))  # validation only: a sweeper never selects on test


def keep_hydra_record(run_dir: Path, *, restore: bool = False) -> None:
    """Keep the run's first `.hydra/` record in `.lego/hydra/`; with `restore`, put it back.

    Hydra rewrites `.hydra/config.yaml` and `overrides.yaml` before the task starts, so a rerun
    that we then refuse (another config in this run directory) would leave the directory
    describing a run it does not hold.
    """
    output_subdir = HydraConfig.get().output_subdir
    if output_subdir is None or not distributed.is_main():
        return
    live, kept = run_dir / output_subdir, run_dir / ".lego" / "hydra"
    src, dst = (kept, live) if restore else (live, kept)
    if not src.is_dir() or (not restore and (run_dir / "run.json").exists()):
        return  # nothing to restore, or the record of the run's first invocation is already kept
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.yaml"):
        shutil.copy2(f, dst / f.name)


def exit_interrupted(resume_override: str) -> NoReturn:
    """Ctrl-C: exit status 130 and the override that resumes (finished stages and epochs are on disk)."""
    print(f"lego-run: interrupted; finished stages and the last epoch checkpoint are kept; "
          f"rerun the same command with {resume_override} to resume", file=sys.stderr)
    sys.exit(130)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`lego-run <argv>` (default: this process's command line): the exit status (0 done, 1 a
    diverged loss or Hydra's own error, 2 bad input, 130 Ctrl-C); the console script passes it
    to sys.exit. Tests call it in-process; it puts back sys.argv and the environment it set."""
    typed = list(sys.argv) if argv is None else ["lego-run", *argv]
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in (ARGV_ENV, SWEPT_ENV)}
    os.environ[ARGV_ENV] = json.dumps(typed)  # before any rewriting: the command as typed
    try:
        distributed.setup()  # under torchrun with several processes; no-op otherwise
        sys.argv = [typed[0], *distributed.hydra_args(rewrite_alias_overrides(typed[1:]))]
        os.environ[SWEPT_ENV] = "\n".join(swept_keys(sys.argv[1:]))  # read by job_dirname, also in launcher workers
        try:
            hydra_main()
        except KeyboardInterrupt:  # before a run directory exists, e.g. while composing
            exit_interrupted("hydra.run.dir=<run dir>")
    except SystemExit as e:  # ours (2, 1, 130) and Hydra's (1 for its own errors, 0 after --help)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        distributed.teardown()
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return 0


if __name__ == "__main__":
    sys.exit(main())
