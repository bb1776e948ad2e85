"""`lego-run` as users meet it: config composition, the installed console script, sweeps, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY as TINY_RUN
from conftest import compose_config, lego_run
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lego.cli import CONF_DIR, to_config
from lego.config import ASHEMConfig, rewrite_alias_overrides, validate

GROUPS = ["model", "data", "phase1", "hard_examples", "phase2", "eval", "generate"]

TINY = [*TINY_RUN, "eval.standard_baseline=false"]


@pytest.mark.parametrize("option", [p.stem for p in sorted(Path(CONF_DIR, "debug").glob("*.yaml"))])
def test_debug_presets_compose_validate_and_stay_small(option):
    config = to_config(compose_config([f"debug={option}"]))
    validate(config)
    assert config.device == "cpu" and config.model.dim == 16 and config.data.max_train_tokens <= 20000


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted(Path(CONF_DIR, g).glob("*.yaml"))])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    extra = []
    if (group, option) == ("data", "text_files"):  # needs the user's files: point it at one
        f = tmp_path / "a.txt"
        f.write_text("hello world\n" * 10)
        extra = [f"data.{s}_files=[{f}]" for s in ("train", "validation", "test")]
    if (group, option) == ("data", "hf"):  # needs a dataset path
        extra = ["data.path=wikitext", "data.config_name=wikitext-2-raw-v1"]
    if (group, option) == ("data", "shards"):  # needs the shards' directory (read when the corpus loads)
        extra = [f"data.shards.dir={tmp_path}"]
    config = to_config(compose_config([f"{group}={option}", *extra]))
    assert isinstance(config, ASHEMConfig)
    assert getattr(config, group) == getattr(config, group).__class__(**{
        k: v for k, v in OmegaConf.to_container(compose_config([f"{group}={option}", *extra])[group], resolve=True).items()})
    validate(config)


def test_schema_rejects_typos_and_wrong_types():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config(["phase1.lrr=1e-3"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["phase1.layers=two"])


def test_flat_alias_overrides_are_rewritten():
    assert rewrite_alias_overrides(["phase2_lr=3e-4", "hard_example_ratio=0.3", "+phase1_layers=3"]) == [
        "phase2.lr=3e-4", "hard_example_ratio=0.3", "+phase1.layers=3"]
    cfg = to_config(compose_config(rewrite_alias_overrides(["phase2_lr=3e-4", "model=small", "seed=1"])))
    assert cfg.phase2_lr == 3e-4 and cfg.model.name == "small" and cfg.seed == 1


def _lego_run(args, cwd, env_extra=None, timeout=600):
    exe = shutil.which("lego-run") or str(Path(sys.executable).parent / "lego-run")
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_installed_lego_run_from_another_directory(tmp_path):
    res = _lego_run([*TINY, "hydra.run.dir=run"], cwd=tmp_path, env_extra={"LEGO_CACHE_DIR": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-3000:]
    d = tmp_path / "run"
    assert f"run dir: {d.name}" in res.stdout or "run dir:" in res.stdout
    for f in ["config_resolved.yaml", ".hydra/config.yaml", "lego.log", "run.json", "metrics.json",
              "tokenizer/tokenizer.json", "phase1/model.pt", "phase1/history.jsonl", "hard_examples/threshold.json",
              "phase2/model.pt", "phase2/history.jsonl", "eval/metrics.json"]:
        assert (d / f).exists(), f
    for f in ["metrics.json", "eval/metrics.json", "hard_examples/threshold.json", "run.json"]:
        json.loads((d / f).read_text())
    OmegaConf.load(d / "config_resolved.yaml")
    assert "phase2 epoch 1" in (d / "lego.log").read_text()


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])
def test_sweep_trains_phase1_once(tmp_path, launcher):
    """Sequential (basic, in this process) or two jobs at once (conf/hydra/launcher/joblib.yaml, the
    installed lego-run in a subprocess): phase 1 is trained by one job; the other finds it in the
    cache (with joblib, after waiting on the cache lock)."""
    args = ["-m", "hard_example_ratio=0.3,0.7", *TINY, "hydra.sweep.dir=sweep"]
    env = {"LEGO_CACHE_DIR": str(tmp_path / "c")}
    if launcher == "joblib":
        res = _lego_run([*args, "hydra/launcher=joblib"], cwd=tmp_path, env_extra=env)
    else:
        res = lego_run(args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is validated against ConfigStore schema" not in res.stderr  # our joblib.yaml, warning filtered
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert len(jobs) == 2
    assert "hard_example_ratio=0.3" in jobs[0].name and "hard_example_ratio=0.7" in jobs[1].name
    caches = [json.loads((j / "phase1/cache.json").read_text()) for j in jobs]
    assert caches[0]["key"] == caches[1]["key"] and sorted(c["hit"] for c in caches) == [False, True]
    lo, hi = (json.loads((j / "metrics.json").read_text()) for j in jobs)
    assert hi["shallow_ratio"] < lo["shallow_ratio"]


def test_help_lists_groups_and_description(tmp_path):
    res = lego_run(["--help"], cwd=tmp_path)
    assert res.returncode == 0
    for word in ["lego-run", "ASHEM", "model: deep, gpt2_small, narrow, reference, small, tiny", "hard_example_ratio", "phase2"]:
        assert word in res.stdout, word


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated against ConfigStore schema")
def test_launcher_configs():
    """hydra/launcher=joblib selects conf/hydra/launcher/joblib.yaml over the plugin's defaults;
    slurm.yaml (hydra-submitit-launcher, not installed here) is only checked to parse."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=joblib"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 2
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    slurm = OmegaConf.load(Path(CONF_DIR) / "hydra/launcher/slurm.yaml")
    assert list(slurm.defaults) == ["submitit_slurm", "_self_"]
    assert {"partition", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node"} <= set(slurm)
