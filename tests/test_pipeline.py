"""The stage pipeline called directly: files written, resume, cache sharing, refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, tiny_config

from lego.artifacts import StageError
from lego.config import ASHEMConfig, rewrite_alias_overrides
from lego.run import run


def test_run_writes_every_artifact(tmp_path):
    cfg = tiny_config(tmp_path / "cache", **{"eval.analysis": True, "eval.html_tokens": 50})
    summary = run(cfg, tmp_path / "run")
    d = tmp_path / "run"
    for f in ["config_resolved.yaml", "run.json", "metrics.json", "tokenizer", "phase1/model.pt",
              "phase1/history.jsonl", "hard_examples/threshold.json", "phase2/model.pt", "phase2/history.jsonl",
              "eval/metrics.json", "dense2/model.pt", "dense4/model.pt"]:
        assert (d / f).exists(), f
    thr = json.loads((d / "hard_examples/threshold.json").read_text())
    assert thr["target_ratio"] == 0.5 and abs(thr["achieved_ratio"] - 0.5) < 0.01
    assert thr["num_hard"] + thr["num_easy"] == thr["num_tokens"]
    ev = json.loads((d / "eval/metrics.json").read_text())
    for part in ("ashem", "phase1_only", "no_routing", "standard"):
        assert {"acc", "ppl", "shallow_ratio", "compute_cost"} <= set(ev[part])
    # the calibrated threshold sends about half of the test tokens out early
    assert 0.3 < ev["ashem"]["shallow_ratio"] < 0.7
    assert ev["ashem"]["compute_cost"] == pytest.approx(1 - ev["ashem"]["shallow_ratio"] / 2)
    assert ev["no_routing"]["shallow_ratio"] == 0 and ev["no_routing"]["compute_cost"] == 1
    assert summary["ppl"] == ev["ashem"]["ppl"]
    # easy tokens (exit at Block 1) and hard tokens (the deep exit) make up the routed perplexity
    a = ev["ashem"]
    n_easy = round(a["shallow_ratio"] * a["n_tokens"])
    assert a["exits"][0]["n_tokens"] == n_easy and summary["easy_ppl_ashem"] == pytest.approx(a["exits"][0]["ppl"])
    assert (n_easy * math.log(summary["easy_ppl_ashem"]) + (a["n_tokens"] - n_easy) * math.log(a["hard_deep_ppl"])
            == pytest.approx(a["n_tokens"] * math.log(a["ppl"]), rel=1e-9))
    # the analysis: files, and its one-pass calibrated router is the routed evaluation itself
    for f in ["tradeoff.csv", "report.md", "tokens.html", "analysis.json"]:
        assert (d / "eval" / f).stat().st_size > 0, f
    pytest.importorskip("matplotlib")
    assert (d / "eval/tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    an = json.loads((d / "eval/analysis.json").read_text())
    for k in ("acc", "ppl", "shallow_ratio", "compute_cost"):
        assert an["calibrated"][k] == pytest.approx(ev["ashem"][k], rel=1e-6, abs=1e-9), k
    assert an["full_depth"]["ppl"] == pytest.approx(ev["no_routing"]["ppl"], rel=1e-6)
    assert an["oracle"]["acc"] == ev["no_routing"]["acc"]
    assert summary["oracle_shallow_ratio"] == ev["analysis"]["oracle_shallow_ratio"] == an["oracle_shallow_ratio"]
    report = (d / "eval/report.md").read_text()
    for name in ("phase-1 model (2 layers)", "ashem, no routing", "dense 4-layer model", "oracle"):
        assert name in report, name
    hist = [json.loads(line) for line in (d / "phase1/history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    # checkpoints: plain tensors and values only, with the config they were trained with
    ck = torch.load(d / "phase2/model.pt", weights_only=True)
    assert ck["model_args"]["num_layers"] == 4 and ck["model_args"]["exits"] == [2]
    assert ck["config"]["hard_example_ratio"] == 0.5
    # no half-written temporaries are left behind
    assert not list(d.rglob("*.tmp"))


def test_phase1_only_then_full_equals_uninterrupted(tmp_path):
    """Stop after phase 1, rerun everything in the same dir: phase 1 is reused, metrics are equal."""
    cfg = tiny_config(tmp_path / "cache", **{"phase1.cache": False, "eval.standard_baseline": False})
    whole = run(cfg, tmp_path / "whole")
    cfg_a = tiny_config(tmp_path / "cache", **{"phase1.cache": False, "eval.standard_baseline": False})
    cfg_a.stages = ["phase1"]
    run(cfg_a, tmp_path / "split")
    before = (tmp_path / "split/phase1/model.pt").stat().st_mtime_ns
    resumed = run(cfg, tmp_path / "split")
    assert (tmp_path / "split/phase1/model.pt").stat().st_mtime_ns == before  # not retrained
    for key in ("acc", "ppl", "shallow_ratio", "compute_cost", "threshold"):
        assert resumed[key] == whole[key], key


def test_interrupted_phase2_resumes_from_last_epoch(tmp_path, monkeypatch):
    """Kill phase 2 after its first epoch checkpoint; the rerun continues and matches a clean run. Block 2
    trains in its stage-cache entry (another cache dir than the clean run's, or it would be reused)."""
    import lego.training as training

    clean = run(tiny_config(tmp_path / "cache", **{"eval.standard_baseline": False}), tmp_path / "clean")
    cfg = tiny_config(tmp_path / "cache2", **{"eval.standard_baseline": False})

    real_save = training.save_resume

    def save_then_die(work_dir, state):
        real_save(work_dir, state)
        if work_dir.name.startswith("phase2-") and state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "crash")
    entry, = (tmp_path / "cache2").rglob("phase2-*/last.pt")
    assert not (entry.parent / "model.pt").exists() and not (tmp_path / "crash/phase2/model.pt").exists()
    monkeypatch.setattr(training, "save_resume", real_save)
    resumed = run(cfg, tmp_path / "crash")
    assert json.loads((tmp_path / "crash/phase2/cache.json").read_text())["hit"] is False
    hist = [json.loads(line) for line in (tmp_path / "crash/phase2/history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for key in ("acc", "ppl", "shallow_ratio", "compute_cost"):
        assert resumed[key] == pytest.approx(clean[key], rel=1e-6), key


def test_other_config_in_same_run_dir_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "cache", **{"eval.standard_baseline": False})
    cfg.stages = ["phase1"]
    run(cfg, tmp_path / "run")
    other = tiny_config(tmp_path / "cache", **{"eval.standard_baseline": False, "phase1.lr": 5e-3})
    with pytest.raises(StageError, match="phase1.lr"):
        run(other, tmp_path / "run")


def test_later_stage_without_earlier_result_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "cache")
    cfg.stages = ["phase2"]
    with pytest.raises(StageError, match="phase1"):
        run(cfg, tmp_path / "run")


def test_phase1_cache_is_shared_across_ratios(tmp_path):
    lo = run(tiny_config(tmp_path / "cache", hard_example_ratio=0.3, **{"eval.standard_baseline": False}),
             tmp_path / "r03")
    entry = Path(json.loads((tmp_path / "r03/phase1/cache.json").read_text())["entry"])
    litter = entry / ".model.pt.k1ll3d.tmp"  # what a trainer killed inside a checkpoint write leaves
    litter.write_bytes(b"half a checkpoint")
    hi = run(tiny_config(tmp_path / "cache", hard_example_ratio=0.7, **{"eval.standard_baseline": False}),
             tmp_path / "r07")
    c1 = json.loads((tmp_path / "r03/phase1/cache.json").read_text())
    c2 = json.loads((tmp_path / "r07/phase1/cache.json").read_text())
    assert c1["key"] == c2["key"] and not c1["hit"] and c2["hit"]
    assert hi["shallow_ratio"] < lo["shallow_ratio"]
    assert hi["phase1_ppl"] == lo["phase1_ppl"]
    assert not litter.exists() and (entry / "model.pt").exists()


def test_flat_names_read_and_write_the_groups():
    from hydra.errors import ConfigCompositionException

    cfg = ASHEMConfig()
    cfg.phase2_lr, cfg.hard_example_ratio = 3e-4, 0.3
    assert cfg.phase2.lr == 3e-4 and cfg.phase2_lr == 3e-4 and cfg.hard_example_ratio == 0.3
    defaults = ASHEMConfig()
    assert (defaults.phase1_layers, defaults.phase1_lr, defaults.phase1_patience, defaults.hard_example_ratio,
            defaults.phase2_layers, defaults.phase2_lr, defaults.phase2_patience) == (2, 1e-3, 1, 0.5, 4, 1e-4, 3)
    # a name that is not a flat alias passes through to Hydra, which refuses it naming the key
    assert rewrite_alias_overrides(["phase3_lr=1.0"]) == ["phase3_lr=1.0"]
    with pytest.raises(ConfigCompositionException, match="phase3_lr"):
        compose_config(rewrite_alias_overrides(["phase3_lr=1.0"]))


def test_run_json_records_provenance(tmp_path):
    """run.json holds the science config and the provenance of the command that started the run."""
    cfg = tiny_config(tmp_path / "cache", stages=["phase1"], seed=7)
    argv = ["/venv/bin/lego-run", "debug=tiny", "phase1_lr=0.002", "seed=7"]
    run(cfg, tmp_path / "run", argv=argv)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "science_config" in record
    p = record["provenance"]
    assert p["command"] == "lego-run debug=tiny phase1_lr=0.002 seed=7" and p["argv"] == argv
    assert {"commit", "dirty", "diff_sha256"} <= set(p["git"])
    assert p["packages"]["lego"] and p["packages"]["torch"] == torch.__version__
    assert p["torch"]["build"].split()[0] in ("cpu", "cuda", "rocm")
    assert p["threads"]["torch"] >= 1 and p["seeds"] == {"seed": 7}


@pytest.mark.parametrize("overrides", [{}, {"phase2.deep_head": False}, {"phase2.upper_context": "skip"},
                                       {"model.exit_head": "lowrank", "model.exit_rank": 4}, {"blocks": [1, 2, 3]},
                                       {"model.vocab_multiple": 48}])
def test_expected_args_are_what_the_built_models_record(tmp_path, overrides):
    """`expected_args` computes from the config what `model_args` reads from the models the stages build: a
    dense model, and the model grown Block by Block."""
    from lego.checkpoint import build_model, expected_args, model_args
    from lego.config import block_layers, resolve
    from lego.pipeline.upper import add_block

    cfg = resolve(tiny_config(tmp_path, **overrides))
    assert expected_args(cfg, 64, 3) == model_args(build_model(cfg, 64, 3))
    model, thresholds = build_model(cfg, 64, block_layers(cfg)[0]), []
    for depth in block_layers(cfg)[1:]:
        thresholds.append(0.1 * len(thresholds) + 0.05)
        model = add_block(cfg, model, depth)
        assert expected_args(cfg, 64, depth, thresholds) == model_args(model)


def test_compare_runs_script_ignores_times_only(tmp_path):
    """scripts/compare_runs.py: runs that differ in times, throughput and run dir agree (0); a number that
    differs is named (1); a directory without the files is bad input (2)."""
    import importlib.util

    path = Path(__file__).parent.parent / "scripts/compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def write(d: Path, ppl: float, wall: float) -> Path:
        (d / "eval").mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"run_dir": str(d), "ppl": ppl, "wall_s": {"eval": wall},
                                                    "tokens_per_s_phase1": wall, "easy_ppl_ashem": float("nan")}))
        (d / "eval/metrics.json").write_text(json.dumps({"ashem": {"ppl": ppl, "wall_s": wall, "exits": [{"n": 1}]}}))
        return d

    a, b, c = write(tmp_path / "a", 100.0, 1.0), write(tmp_path / "b", 100.0, 2.0), write(tmp_path / "c", 100.5, 1.0)
    assert script.main([str(a), str(b)]) == 0
    assert script.differences(json.loads((a / "metrics.json").read_text()),
                              json.loads((c / "metrics.json").read_text())) == ["ppl: 100.0 -> 100.5"]
    assert script.main([str(a), str(c)]) == 1
    assert script.main([str(a), str(tmp_path / "nowhere")]) == 2
