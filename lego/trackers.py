"""Experiment trackers: where a run's curves go besides its run directory's own files.

One small `Tracker` protocol and one backend per tool, chosen by the `logger` config group:

    lego-run logger=csv                      # default: <run_dir>/metrics/<training>.csv
    lego-run logger=tensorboard              # <run_dir>/tensorboard/; tensorboard --logdir outputs
    lego-run logger=wandb                    # offline run under <run_dir>/wandb/; wandb sync it later
    lego-run logger=mlflow                   # <run_dir>/mlruns; mlflow ui --backend-store-uri <that>
    lego-run logger=many logger.kinds=[csv,tensorboard,wandb]

Every backend takes the same calls (what the training loops send):
    tracker.log_hparams(config_dict)                                    # once, at the start
    tracker.log_metrics({"loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": ...},
                        step, prefix="phase1")                           # every log_every optimizer steps
    tracker.log_metrics({"val_loss": ..., "val_ppl": ...}, step, prefix="phase1")  # each validation
    tracker.log_summary(metrics)                                        # headline numbers, at the end
    tracker.log_artifact(path)                                          # e.g. a trade-off csv/png
    tracker.close()
Only rank 0 writes: `make_tracker(..., enabled=distributed.is_main())` hands other ranks a no-op.
Nothing here touches the network unless `wandb_mode="online"` or an http `mlflow_uri` says so.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

from lego.artifacts import atomic_write, write_json
from lego.config import TRACKER_KINDS, WANDB_MODES, ConfigError, LoggerConfig, check_tracker_kinds

log = logging.getLogger(__name__)

KINDS = TRACKER_KINDS
# import name and the `lego[...]` extra that installs each optional backend
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow")}


@runtime_checkable
class Tracker(Protocol):
    """What every backend accepts. Metric values are plain floats; `step` is the training's optimizer step."""

    def log_hparams(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str) -> None: ...

    def log_summary(self, metrics: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: Union[str, Path]) -> None: ...

    def close(self) -> None: ...


def _require(kind: str):
    """Import the optional package behind `kind`, or fail with the one line that says how to get it."""
    module, extra = _PACKAGES[kind]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"logger={kind} needs the {module} package: pip install 'lego[{extra}]'") from None


def flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"phase1": {"lr": 1e-3}} -> {"phase1.lr": 1e-3}; lists and None become strings."""
    out: Dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def _numbers(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """The entries that are numbers (a summary also holds names and paths), as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class NullTracker:
    """`logger=none`, and every rank but 0."""

    def log_hparams(self, config: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str) -> None:
        pass

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: Union[str, Path]) -> None:
        pass

    def close(self) -> None:
        pass


def _step(row: Mapping[str, Optional[str]]) -> Optional[int]:
    """The step of a csv row, None for a line a killed process left half-written."""
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


class CsvTracker:
    """One wide csv per training (phase1, phase2, dense4, ...), `<run_dir>/metrics/<prefix>.csv`: a `step` column,
    then one column per metric name in first-seen order; a row leaves blank what it did not log.

    Rows are appended and flushed as they come, so a killed run leaves a valid file. A resumed run
    re-logs the steps after its last checkpoint: the first row this tracker writes to a file drops
    the rows at or past its step. A metric name new to the file rewrites it once with the wider
    header (atomically). Hyperparameters are not repeated here: the run dir has config_resolved.yaml.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "metrics"
        self._header: Dict[str, List[str]] = {}  # prefix -> columns of its file, as on disk
        self._files: Dict[str, Any] = {}

    def path(self, prefix: str) -> Path:
        return self.dir / f"{prefix}.csv"

    def log_hparams(self, config: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str) -> None:
        row = {"step": str(int(step)), **{k: repr(float(v)) for k, v in metrics.items()}}  # repr: exact round trip
        if prefix not in self._header:  # first row for this training in this process
            self._rewrite(prefix, keep=lambda r: _step(r) is not None and _step(r) < int(step), extra=list(row))
        elif any(k not in self._header[prefix] for k in row):
            self._rewrite(prefix, keep=lambda r: _step(r) is not None, extra=list(row))
        f = self._files[prefix]
        csv.DictWriter(f, self._header[prefix], restval="").writerow(row)
        f.flush()

    def _rewrite(self, prefix: str, keep, extra: List[str]) -> None:
        """(Re)write the file with the rows `keep` accepts and the header widened by `extra`, then
        reopen it for appending."""
        path = self.path(prefix)
        if prefix in self._files:
            self._files.pop(prefix).close()
        header, rows = ["step"], []
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or ["step"])
                rows = [r for r in reader if keep(r)]
        header += [k for k in extra if k not in header]

        def write(f) -> None:
            w = csv.DictWriter(f, header, restval="")
            w.writeheader()
            w.writerows(rows)

        atomic_write(path, write)
        self._header[prefix] = header
        self._files[prefix] = open(path, "a", newline="")

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        write_json(self.dir / "summary.json", dict(metrics))

    def log_artifact(self, path: Union[str, Path]) -> None:
        pass  # the file already lives in the run dir

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class TensorBoardTracker:
    """Scalars `<prefix>/<name>` in `<run_dir>/tensorboard/`; the config as text and, with the
    summary, in the HParams tab."""

    def __init__(self, run_dir: Path):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._hparams: Dict[str, Any] = {}

    def log_hparams(self, config: Mapping[str, Any]) -> None:
        self._hparams = flatten(config)
        self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=2, default=str) + "\n```")

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        nums = {f"summary/{k}": v for k, v in _numbers(metrics).items()}
        self.writer.add_hparams(self._hparams, nums, run_name=".")  # "." = this run's own directory
        self.writer.flush()

    def log_artifact(self, path: Union[str, Path]) -> None:
        log.debug("tensorboard keeps no files; %s stays in the run dir", path)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in `<run_dir>/wandb/`, offline unless `mode="online"`. Each training's metrics are
    plotted against that training's own step (`<prefix>/step`), since steps restart per training."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, mode: str):
        wandb = _require("wandb")
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode=mode,
                              settings=wandb.Settings(silent=True, console="off"))
        self._prefixes: set = set()

    def log_hparams(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str) -> None:
        if prefix not in self._prefixes:
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self._prefixes.add(prefix)
        self.run.log({f"{prefix}/step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}})

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(metrics))

    def log_artifact(self, path: Union[str, Path]) -> None:
        path = Path(path)
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """One mlflow run per `lego-run` invocation, in experiment `project`, at `uri` (default: a file
    store `<run_dir>/mlruns`). Metrics are `<prefix>/<name>` at the training's step."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, uri: Optional[str]):
        _require("mlflow")
        from mlflow.tracking import MlflowClient

        if uri is None:
            # MLflow 3 refuses its file store unless asked (it wants a database server or sqlite,
            # which mlflow-skinny cannot run); a run dir's own store is exactly the case it allows.
            # An explicit MLFLOW_ALLOW_FILE_STORE=false in the environment still wins.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri or (Path(run_dir) / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_hparams(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # mlflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", float(v), now, int(step))
                                                    for k, v in metrics.items()])

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        self.log_metrics(_numbers(metrics), 0, "summary")

    def log_artifact(self, path: Union[str, Path]) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class MultiTracker:
    """`logger=many`: every call goes to each tracker in turn."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def log_hparams(self, config: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_hparams(config)

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step, prefix)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_summary(metrics)

    def log_artifact(self, path: Union[str, Path]) -> None:
        for t in self.trackers:
            t.log_artifact(path)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def make_tracker(kind: Union[str, Sequence[str]], run_dir: Path, *, project: str, run_name: str,
                 wandb_mode: str = "offline", mlflow_uri: Optional[str] = None,
                 enabled: bool = True) -> Tracker:
    """The tracker for `kind` (one of KINDS, or a list of them) writing under `run_dir`.

    `enabled=False` (every rank but 0) gives a NullTracker without importing anything. A missing
    optional package fails here, before any training, with one line naming the extra to install.
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    check_tracker_kinds(kinds)
    if wandb_mode not in WANDB_MODES:
        raise ConfigError(f"logger.wandb_mode={wandb_mode!r} is not allowed; choose one of {', '.join(WANDB_MODES)}")
    if not enabled or kinds == ["none"]:
        return NullTracker()
    for k in kinds:  # all missing packages are reported before any backend creates files
        if k in _PACKAGES:
            _require(k)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    made: List[Tracker] = []
    for k in dict.fromkeys(kinds):  # a kind named twice is one tracker
        if k == "csv":
            made.append(CsvTracker(run_dir))
        elif k == "tensorboard":
            made.append(TensorBoardTracker(run_dir))
        elif k == "wandb":
            made.append(WandbTracker(run_dir, project=project, run_name=run_name, mode=wandb_mode))
        elif k == "mlflow":
            made.append(MlflowTracker(run_dir, project=project, run_name=run_name, uri=mlflow_uri))
    return made[0] if len(made) == 1 else MultiTracker(made)


def tracker_from_config(cfg: LoggerConfig, run_dir: Path, *, run_name: str, enabled: bool = True) -> Tracker:
    """`make_tracker` with the fields of a `LoggerConfig` (what `lego-run` calls)."""
    return make_tracker(list(cfg.kinds), run_dir, project=cfg.project, run_name=run_name,
                        wandb_mode=cfg.wandb_mode, mlflow_uri=cfg.mlflow_uri, enabled=enabled)
