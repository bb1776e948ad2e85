"""Optuna sweeps: the objective is a validation metric, job directories name the searched keys,
and the sweep summary picks the best trial on validation before it shows test numbers."""

import json
from importlib.util import find_spec

import pytest
from omegaconf import OmegaConf

from lego.cli import job_dirname
from lego.config import ASHEMConfig, validate
from lego.sweep import best_trial as summarize
from lego.sweep import main as summary_main


def _has_optuna_sweeper() -> bool:
    try:
        return find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:
        return False


needs_optuna = pytest.mark.skipif(not _has_optuna_sweeper(),
                                  reason="hydra-optuna-sweeper is not installed (pip install -e '.[optuna]')")


def test_objective_is_a_validation_metric():
    assert ASHEMConfig().objective == "val_ppl"
    validate(ASHEMConfig(objective="val_loss"))
    with pytest.raises(ValueError, match="objective"):
        validate(ASHEMConfig(objective="ppl"))  # the test perplexity: never a selection objective


def test_job_dirname_names_the_search_space(monkeypatch):
    monkeypatch.delenv("LEGO_SWEPT_KEYS", raising=False)
    root = OmegaConf.create({"hydra": {"sweeper": {"params": {"phase2.lr": "tag(log, interval(1e-4, 3e-3))",
                                                              "hard_example_ratio": "interval(0.3, 0.7)"}}}})
    task = ["hparams_search=lr_ratio", "seed=3", "phase2.lr=0.0002", "hard_example_ratio=0.41"]
    assert job_dirname(4, task, _root_=root) == "4_phase2.lr=0.0002,hard_example_ratio=0.41"
    no_params = OmegaConf.create({"hydra": {"sweeper": {"params": None}}})  # the basic sweeper
    assert job_dirname(4, task, _root_=no_params) == "4_" + ",".join(task)
    # an appended group swept on the command line (lego-run -m +variant=spec,copy) names its jobs too
    monkeypatch.setenv("LEGO_SWEPT_KEYS", "+variant")
    assert job_dirname(2, ["+variant=copy", "seed=0"], _root_=no_params) == "2_+variant=copy"
    monkeypatch.delenv("LEGO_SWEPT_KEYS")
    # a preset's sweep over an appended group (experiment=lego_study: +variant) names its jobs by it
    study = OmegaConf.create({"hydra": {"sweeper": {"params": {"+variant": "spec,copy", "seed": "0,1"}}}})
    assert job_dirname(3, ["+variant=copy", "seed=1", "experiment=lego_study"], _root_=study) == "3_+variant=copy,seed=1"


def _fake_sweep(tmp_path, values, best_params, objective="val_ppl"):
    sweep = tmp_path / "sweep"
    for i, (lr, v) in enumerate(values):
        job = sweep / f"{i}_phase2.lr={lr}"
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"phase2.lr={lr}", "seed=1"]), job / ".hydra" / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"objective": objective, "seed": 1}), job / ".hydra" / "config.yaml")
        # Test ppl runs opposite to validation: choosing on test would pick another job.
        (job / "metrics.json").write_text(json.dumps({"val_ppl": v, "val_loss": v / 100, "ppl": 1000 - v,
                                                      "acc": 0.1 + i}))
    (sweep / "2_unfinished").mkdir()  # no metrics.json: left out
    if best_params is not None:
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best_params, "best_value": 0.0}),
                       sweep / "optimization_results.yaml")
    return sweep


def test_summary_picks_best_on_validation_then_reads_test(tmp_path):
    sweep = _fake_sweep(tmp_path, [(0.001, 50.0), (0.0002, 40.0), (0.003, 60.0)], {"phase2.lr": 0.0002})
    s = summarize(sweep)
    assert s["objective"] == "val_ppl" and s["n_trials"] == 3
    assert s["best"]["job"] == "1_phase2.lr=0.0002" and s["best"]["val_ppl"] == 40.0
    assert s["best_test"] == {"ppl": 960.0, "acc": 1.1}  # the chosen job's test numbers, not the best test ppl
    assert s["best"]["validation"] == {"val_ppl": 40.0, "val_loss": 0.4}
    assert summary_main([str(sweep)]) == 0
    assert json.loads((sweep / "optuna_summary.json").read_text())["best"]["job"] == "1_phase2.lr=0.0002"
    assert "Test split, the best trial only" in (sweep / "optuna_summary.md").read_text()


def test_summary_without_results_file_and_with_a_bad_one(tmp_path):
    sweep = _fake_sweep(tmp_path, [(0.001, 50.0), (0.0002, 70.0)], None, objective="val_loss")
    s = summarize(sweep)  # an interrupted sweep: the best finished job
    assert s["objective"] == "val_loss" and s["best"]["job"] == "0_phase2.lr=0.001"
    OmegaConf.save(OmegaConf.create({"best_params": {"phase2.lr": 0.5}, "best_value": 1.0}),
                   sweep / "optimization_results.yaml")
    with pytest.raises(ValueError, match="no job has the best params"):
        summarize(sweep)


def test_summary_of_an_empty_directory_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        summarize(tmp_path)
    assert summary_main([str(tmp_path)]) == 2


@needs_optuna
def test_preset_composes_with_the_optuna_sweeper():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lego.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hparams_search=lr_ratio"], return_hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("OptunaSweeper") and sw.direction == "minimize"
    assert sw.sampler._target_ == "optuna.samplers.TPESampler" and sw.sampler.seed is not None
    assert set(sw.params) == {"phase2.lr", "phase1.lr", "hard_example_ratio"}
    assert cfg.objective == "val_ppl"


@pytest.mark.slow
@needs_optuna
@pytest.mark.filterwarnings("ignore:Deprecated API features detected")  # optuna 2.x on SQLAlchemy 1.4 (pyproject)
def test_optuna_sweep_reports_the_best_validation_trial(tmp_path):
    """`lego-run -m hparams_search=lr_ratio` with three trials (lego-run's main in this process)."""
    from conftest import lego_run
    from test_cli import TINY

    res = lego_run(["-m", "hparams_search=lr_ratio", "hydra.sweeper.n_trials=3", *TINY, "hydra.sweep.dir=sweep"],
                   cwd=tmp_path, env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "sweep"
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 3
    # Job directories are named by the searched keys, not by the fixed tiny-budget overrides.
    assert all("phase2.lr=" in j.name and "hard_example_ratio=" in j.name and "data." not in j.name for j in jobs)
    metrics = {j.name: json.loads((j / "metrics.json").read_text()) for j in jobs}
    val = {name: m["val_ppl"] for name, m in metrics.items()}
    assert len(set(val.values())) == 3  # three different trials
    best_name = min(val, key=val.get)
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(val[best_name], rel=1e-12)  # Optuna saw val_ppl, not test ppl
    assert results.best_value != pytest.approx(metrics[best_name]["ppl"], rel=1e-9)
    s = json.loads((sweep / "optuna_summary.json").read_text())  # written by the default SweepSummary callback
    s.pop("sweep_dir")  # as the sweep's config names it (relative here)
    assert s == {k: v for k, v in summarize(sweep).items() if k != "sweep_dir"}
    assert s["best"]["job"] == best_name and s["best"]["val_ppl"] == min(val.values())
    assert s["best_test"]["ppl"] == metrics[best_name]["ppl"]


@pytest.mark.slow
def test_val_ppl_is_the_routed_model_on_validation(tmp_path):
    """val_ppl equals the routed model's ppl when eval itself runs on validation; the objective
    does not change what a run computes (a run dir made with another objective is not refused)."""
    import math

    from conftest import tiny_config

    from lego.run import run

    kw = {"eval.standard_baseline": False}
    on_test = run(tiny_config(tmp_path / "cache", **kw), tmp_path / "a")
    on_val = run(tiny_config(tmp_path / "cache", **kw, **{"eval.split": "validation", "eval.allow_validation_split": True}), tmp_path / "b")
    assert on_val["val_ppl"] == pytest.approx(on_val["ppl"], rel=1e-12)
    assert on_test["val_ppl"] == pytest.approx(on_val["val_ppl"], rel=1e-9)
    assert on_test["val_ppl"] != pytest.approx(on_test["ppl"], rel=1e-6)  # another split
    assert on_test["val_ppl"] == pytest.approx(math.exp(on_test["val_loss"]), rel=1e-9)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["val_ppl"] == on_test["val_ppl"]
    again = run(tiny_config(tmp_path / "cache", **kw, objective="val_loss", stages=["eval"]), tmp_path / "a")
    assert again["val_loss"] == pytest.approx(on_test["val_loss"], rel=1e-9)
