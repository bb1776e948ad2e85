"""lego.trackers: each backend's files read back with that tool's own reader; config group files load."""

import csv
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lego.trackers import (
    KINDS,
    CsvTracker,
    LoggerConfig,
    MultiTracker,
    NullTracker,
    Tracker,
    make_tracker,
    tracker_from_config,
)

CONF = Path(__file__).resolve().parent.parent / "conf" / "logger"


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_rows_read_back_exactly(tmp_path):
    t = make_tracker("csv", tmp_path, project="p", run_name="r")
    assert isinstance(t, CsvTracker) and isinstance(t, Tracker)
    t.log_metrics({"loss": 0.1 + 0.2, "lr": 3e-4}, 1, prefix="phase1")
    t.log_metrics({"loss": 1 / 3, "lr": 2.5e-4}, 2, prefix="phase1")
    t.log_metrics({"val_loss": 2.0, "val_ppl": 7.38905609893065}, 2, prefix="phase1")  # new columns
    t.log_metrics({"loss": 5.0}, 1, prefix="phase2")
    t.log_summary({"ppl": 12.5, "tag": "x"})
    t.close()
    text = (tmp_path / "metrics" / "phase1.csv").read_text()
    assert text.splitlines()[0] == "step,loss,lr,val_loss,val_ppl" and text.count("step") == 1
    rows = _rows(tmp_path / "metrics" / "phase1.csv")
    assert [r["step"] for r in rows] == ["1", "2", "2"]
    assert float(rows[0]["loss"]) == 0.1 + 0.2 and float(rows[1]["loss"]) == 1 / 3  # bit-exact round trip
    assert float(rows[1]["lr"]) == 2.5e-4 and rows[1]["val_loss"] == ""
    assert rows[2]["loss"] == "" and float(rows[2]["val_ppl"]) == 7.38905609893065
    assert _rows(tmp_path / "metrics" / "phase2.csv") == [{"step": "1", "loss": "5.0"}]
    assert json.loads((tmp_path / "metrics" / "summary.json").read_text()) == {"ppl": 12.5, "tag": "x"}


def test_csv_resume_appends_and_drops_the_replayed_steps(tmp_path):
    first = make_tracker("csv", tmp_path, project="p", run_name="r")
    for step in (1, 2, 3, 4):
        first.log_metrics({"loss": float(step)}, step, prefix="phase1")
    first.close()  # killed after step 4; the checkpoint is from step 2
    again = make_tracker("csv", tmp_path, project="p", run_name="r")
    again.log_metrics({"loss": 30.0}, 3, prefix="phase1")
    again.log_metrics({"loss": 40.0, "grad_norm": 0.5}, 4, prefix="phase1")
    again.close()
    text = (tmp_path / "metrics" / "phase1.csv").read_text()
    assert text.count("step") == 1
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(tmp_path / "metrics" / "phase1.csv")] == [
        ("1", "1.0", ""), ("2", "2.0", ""), ("3", "30.0", ""), ("4", "40.0", "0.5")]


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = make_tracker("tensorboard", tmp_path, project="p", run_name="r")
    t.log_hparams({"phase1": {"lr": 1e-3}, "stages": ["phase1"]})
    for step, loss in [(1, 4.0), (2, 3.5), (5, 3.0)]:
        t.log_metrics({"loss": loss, "lr": 1e-3}, step, prefix="phase1")
    t.log_metrics({"val_ppl": 20.0}, 5, prefix="phase1")
    t.log_summary({"ppl": 19.0})
    t.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"phase1/loss", "phase1/lr", "phase1/val_ppl"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("phase1/loss")] == [(1, 4.0), (2, 3.5), (5, 3.0)]
    assert [(e.step, e.value) for e in acc.Scalars("phase1/val_ppl")] == [(5, 20.0)]


def test_wandb_offline_leaves_an_offline_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    t = make_tracker("wandb", tmp_path, project="lego-test", run_name="r")  # offline by default
    t.log_hparams({"seed": 1})
    t.log_metrics({"loss": 2.0}, 1, prefix="phase1")
    t.log_metrics({"loss": 1.0}, 1, prefix="phase2")  # steps restart per stage
    t.log_summary({"ppl": 3.0})
    t.close()
    wandb.teardown()  # the wandb-core service finishes writing the run file when it shuts down
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    data = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
    assert b"phase1/loss" in data and b"phase2/step" in data


def test_mlflow_local_store_has_the_metric(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    t = make_tracker("mlflow", tmp_path, project="lego-test", run_name="r")
    t.log_hparams({"phase1": {"lr": 1e-3}})
    t.log_metrics({"loss": 4.0}, 1, prefix="phase1")
    t.log_metrics({"loss": 3.0}, 2, prefix="phase1")
    t.log_summary({"ppl": 9.0, "note": "not a number"})
    (tmp_path / "tradeoff.csv").write_text("cost,ppl\n0.5,9\n")
    t.log_artifact(tmp_path / "tradeoff.csv")
    t.close()
    assert (tmp_path / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params["phase1.lr"] == "0.001"
    assert [(m.step, m.value) for m in client.get_metric_history(t.run_id, "phase1/loss")] == [(1, 4.0), (2, 3.0)]
    assert run.data.metrics["summary/ppl"] == 9.0
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["tradeoff.csv"]


@pytest.mark.parametrize("kind,module", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ValueError) as e:
        make_tracker(["csv", kind], tmp_path / "run", project="p", run_name="r")
    assert str(e.value) == f"logger={kind} needs the {module} package: pip install 'lego[{kind}]'"
    assert not (tmp_path / "run").exists()  # refused before any backend wrote anything


def test_disabled_and_none_write_nothing(tmp_path):
    for t in (make_tracker("csv", tmp_path / "a", project="p", run_name="r", enabled=False),
              make_tracker(["none"], tmp_path / "b", project="p", run_name="r")):
        assert isinstance(t, NullTracker)
        t.log_metrics({"loss": 1.0}, 1, prefix="phase1")
        t.log_summary({"ppl": 1.0})
        t.close()
    assert list(tmp_path.iterdir()) == []


def test_many_writes_to_each(tmp_path):
    pytest.importorskip("tensorboard")
    t = make_tracker(["csv", "tensorboard", "csv"], tmp_path, project="p", run_name="r")
    assert isinstance(t, MultiTracker) and len(t.trackers) == 2
    t.log_metrics({"loss": 1.5}, 1, prefix="baseline")
    t.close()
    assert _rows(tmp_path / "metrics" / "baseline.csv") == [{"step": "1", "loss": "1.5"}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("bad,key", [
    ({"kinds": ["csv", "neptune"]}, "logger.kinds: 'neptune' is not allowed; choose from " + ", ".join(KINDS)),
    ({"kinds": ["none", "csv"]}, "'none' cannot be combined"),
    ({"wandb_mode": "live"}, "logger.wandb_mode='live' is not allowed; choose one of offline, online, disabled"),
    ({"log_every": 0}, "logger.log_every=0"),
])
def test_bad_logger_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=None) as e:
        LoggerConfig(**bad)
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_logger_option_loads_and_says_how_to_run_it(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"lego-run logger={path.stem}" in first
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoggerConfig), OmegaConf.load(path)))
    assert isinstance(cfg, LoggerConfig)
    if path.stem in ("csv", "none"):  # the ones that need no optional package
        t = tracker_from_config(cfg, tmp_path, run_name="r")
        assert isinstance(t, CsvTracker if path.stem == "csv" else NullTracker)
        t.close()


def test_logger_group_has_every_option():
    assert {p.stem for p in CONF.glob("*.yaml")} == {"csv", "tensorboard", "wandb", "mlflow", "many", "none"}


# ---- the tracker wired into training (lego.training.train_epoch / fit, lego.run) ----------------
class Recorder:
    """A Tracker that keeps every call."""

    def __init__(self):
        self.metrics, self.calls = [], []

    def log_hparams(self, config):
        self.calls.append(("hparams", config))

    def log_metrics(self, metrics, step, prefix):
        self.metrics.append((prefix, step, dict(metrics)))

    def log_summary(self, metrics):
        self.calls.append(("summary", metrics))

    def log_artifact(self, path):
        self.calls.append(("artifact", Path(path).name))

    def close(self):
        self.calls.append(("close",))


def test_train_epoch_logs_every_log_every_steps(make_tiny_model, make_token_batches):
    import torch

    from lego.config import create_standard_config
    from lego.training import TrainingTotals, Trainer, train_epoch

    model = make_tiny_model(num_layers=2)
    trainer = Trainer(create_standard_config(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec, totals = Recorder(), TrainingTotals(steps=10)  # a resumed stage: steps count on from 10
    batches = make_token_batches(n_batches=5)
    train_epoch(model, batches, opt, trainer.stage_loss_sum, "cpu", grad_clip=1.0, totals=totals, tracker=rec,
                prefix="phase1", log_every=2, progress=False)
    assert [(p, s) for p, s, _ in rec.metrics] == [("phase1", 12), ("phase1", 14)]
    for _, _, m in rec.metrics:
        assert set(m) == {"loss", "lr", "grad_norm", "tokens_per_s"}
        assert m["lr"] == 0.1 and m["grad_norm"] > 0 and m["tokens_per_s"] > 0 and m["loss"] > 0
    # no tracker: the same steps, nothing logged, the same weights
    again = make_tiny_model(num_layers=2)
    train_epoch(again, batches, torch.optim.SGD(again.parameters(), lr=0.1), trainer.stage_loss_sum, "cpu",
                grad_clip=1.0, progress=False)
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_run_sends_each_stage_to_the_tracker(tmp_path):
    """A tiny run with the default csv tracker: one file per training stage (phase 1, phase 2, dense
    baselines) with train rows every logger.log_every steps and a validation row per epoch."""
    from conftest import tiny_config

    from lego.run import run

    cfg = tiny_config(tmp_path / "cache", **{"logger.log_every": 3, "eval.dense_depths": [2]})
    summary = run(cfg, tmp_path / "run")
    metrics = tmp_path / "run" / "metrics"
    assert sorted(p.name for p in metrics.iterdir()) == ["dense2.csv", "dense4.csv", "phase1.csv", "phase2.csv",
                                                         "summary.json"]
    for stage in ("phase1", "phase2", "dense2"):
        rows = _rows(metrics / f"{stage}.csv")
        result = json.loads((tmp_path / "run" / stage / "result.json").read_text())
        train = [r for r in rows if r["loss"]]
        val = [r for r in rows if r["val_loss"]]
        assert [int(r["step"]) for r in train] == list(range(3, result["steps"] + 1, 3)), stage
        assert all(float(r["grad_norm"]) > 0 and float(r["tokens_per_s"]) > 0 for r in train)
        assert len(val) == result["epochs_run"]
        assert min(float(r["val_loss"]) for r in val) == pytest.approx(result["best_val_loss"])
    assert json.loads((metrics / "summary.json").read_text())["ppl"] == summary["ppl"]


@pytest.mark.slow
def test_lego_run_logger_tensorboard_writes_readable_events(tmp_path):
    """`lego-run logger=tensorboard` (lego-run's main in this process): event files whose scalars are
    each stage's curves."""
    pytest.importorskip("tensorboard")
    from conftest import TINY, lego_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = lego_run([*TINY, "logger=tensorboard", "logger.log_every=1", "eval.standard_baseline=false",
                    "hydra.run.dir=run"], cwd=tmp_path, env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"phase1/loss", "phase1/lr", "phase1/grad_norm", "phase1/val_ppl", "phase2/loss", "phase2/val_loss"} <= tags
    steps = json.loads((tmp_path / "run" / "phase1" / "result.json").read_text())["steps"]
    assert [e.step for e in acc.Scalars("phase1/loss")] == list(range(1, steps + 1))
