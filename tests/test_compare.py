"""The honest comparison (issue 12, SPEC section 6): recorded training compute, matched dense baselines and
the frontier, operating points chosen on validation, the learning-rate schedule in the loop, the verdict."""

import csv
import dataclasses
import json

import numpy as np
import pytest
from conftest import tiny_config

from lego.ashem import grow
from lego.analysis import compute_saved_at, routed_from_tokens, share_threshold, token_outputs, tradeoff_curve
from lego.cost import dense_training_macs
from lego.summary import format_table
from lego.run import run
from lego.schedule import lr_factor
from lego.pipeline.verdict import interpolate, pareto


def read(path):
    return json.loads(path.read_text())


MATCHED = {"eval.analysis": True, "eval.html_tokens": 20, "eval.dense_depths": [3], "phase1.patience": None,
           "phase2.patience": None, "phase1.warmup_steps": 3, "phase1.min_lr_ratio": 0.2, "phase2.min_lr_ratio": 0.3}


@pytest.fixture(scope="module")
def matched_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("matched")
    cfg = tiny_config(d / "cache", **MATCHED)
    return cfg, run(cfg, d / "run"), d / "run"


def shape_of(cfg, vocab_size):
    return dict(dim=cfg.model.dim, ffn_mult=cfg.model.ffn_mult, ffn=cfg.model.ffn, vocab_size=vocab_size,
                seq_len=cfg.data.seq_len)


def test_matched_baseline_spends_the_pipelines_training_compute(matched_run):
    """Each dense model's MACs are within one of its optimizer steps of the pipeline's total, computed here by
    hand from the split sizes and the model's shape, and nothing stopped early."""
    cfg, summary, d = matched_run
    ev = read(d / "eval/metrics.json")
    T, B = cfg.data.seq_len, cfg.data.batch_size
    shape = shape_of(cfg, summary["vocab_size"])
    p1, p2 = read(d / "phase1/result.json"), read(d / "phase2/result.json")
    # phase 1: its whole budget of steps, 3 x forward of every layer and the head on B x T positions each
    assert p1["steps"] == p1["budget_steps"] == cfg.phase1.max_epochs * cfg.phase1.epoch_steps
    assert p1["train_macs"] == pytest.approx(3 * p1["steps"] * B * T * (2 * LAYER(cfg) + cfg.model.dim * 256))
    assert p2["steps"] == p2["budget_steps"] == cfg.phase2.max_epochs * cfg.phase2.epoch_steps
    # mining: calibration on validation + the training split's hard sequences, forward through Block 1 and its
    # head; the validation split's mining (to validate phase 2) is a validation pass, outside the budget
    train_windows, val_windows = cfg.data.max_train_tokens // (T + 1), cfg.data.max_eval_tokens // (T + 1)
    per_token = 2 * LAYER(cfg) + cfg.model.dim * 256
    mining = ev["train_compute"]["mining"]
    assert [r["pass"] for r in mining["passes"]] == ["calibration", "training-split mining"]
    assert mining["train_macs"] == pytest.approx((val_windows + train_windows) * T * per_token)
    assert mining["val_macs"] == pytest.approx(val_windows * T * per_token)
    total = p1["train_macs"] + mining["train_macs"] + p2["train_macs"]
    assert ev["train_compute"]["total"]["train_macs"] == pytest.approx(total)
    for depth in (2, 3, 4):  # every depth of the frontier, each at the pipeline's budget to one of its steps
        dense = read(d / f"dense{depth}/result.json")
        step = 3 * B * T * (depth * LAYER(cfg) + cfg.model.dim * 256)
        assert dense["stopped_early"] is False and dense["steps"] == dense["budget_steps"]
        assert dense["train_macs"] == pytest.approx(dense["steps"] * step)
        assert abs(dense["train_macs"] - total) <= step / 2 * (1 + 1e-9)
        assert ev["dense"][str(depth)]["macs_off"] == pytest.approx(dense["train_macs"] - total)
        assert ev["dense"][str(depth)]["step_macs"] == pytest.approx(step)
    assert ev["standard"] == ev["dense"]["4"]
    assert read(d / "dense2/result.json")["steps"] > read(d / "dense4/result.json")["steps"]


def LAYER(cfg):
    """MACs of one tiny-model layer per token, by hand (lego.cost.layer_macs): q, k, v, out, 2 FFN matrices,
    and attention over (T + 1) / 2 keys on average (2 x dim per key)."""
    dim, T = cfg.model.dim, cfg.data.seq_len
    return 4 * dim * dim + 2 * cfg.model.ffn_mult * dim * dim + 2 * dim * (T + 1) / 2


def test_every_model_ends_its_budget_at_the_schedules_minimum(matched_run):
    """Budget first: phase 1, phase 2 and every dense model ran their last step at min_lr_ratio x lr."""
    cfg, _, d = matched_run
    p1, p2 = cfg.phase1, cfg.phase2
    for stage, group in (("phase1", p1), ("phase2", p2), ("dense2", p1), ("dense3", p1), ("dense4", p1)):
        result = read(d / stage / "result.json")
        assert result["last_lr"] == pytest.approx(group.lr * group.min_lr_ratio, rel=1e-12), stage
        hist = [json.loads(line) for line in (d / stage / "history.jsonl").read_text().splitlines()]
        assert sum(row["steps"] for row in hist) == result["budget_steps"]
        assert hist[-1]["lr"] == result["last_lr"]


def test_the_schedule_runs_in_the_training_loop(matched_run):
    cfg, _, d = matched_run
    p1 = cfg.phase1
    hist = [json.loads(line) for line in (d / "phase1/history.jsonl").read_text().splitlines()]
    total = p1.max_epochs * p1.epoch_steps
    done = 0
    for row in hist:  # each row records the lr of its epoch's last optimizer step
        done += row["steps"]
        assert row["lr"] == pytest.approx(p1.lr * lr_factor(done - 1, schedule="cosine", warmup_steps=3,
                                                            total_steps=total, min_lr_ratio=0.2), rel=1e-12)


def test_verdict_and_flags_are_in_the_summary_and_table(matched_run):
    _, summary, d = matched_run
    ev = read(d / "eval/metrics.json")
    v = ev["verdict"]
    assert v["inference"]["cost"] == summary["flop_cost"]
    assert v["training"]["dense_ppl"] == summary["dense4_ppl"]
    assert summary["gap_at_training_compute_pct"] == pytest.approx(100 * (summary["ppl"] / summary["dense4_ppl"] - 1))
    assert summary["verdict"] == v["line"] and "At equal training compute" in v["line"]
    # the best dense model is the best on validation, reported on test
    best = min((2, 3, 4), key=lambda depth: ev["dense"][str(depth)]["val_ppl"])
    assert v["training"]["best_depth"] == best and v["training"]["best_ppl"] == summary[f"dense{best}_ppl"]
    assert v["chosen_on"] == "validation"
    table = format_table(summary)
    assert table.endswith(v["line"])
    for name in ("phase1", "phase2", "dense2", "dense3", "dense4"):
        assert name in summary["convergence"]
    assert "converged: the last 20% of its steps" in table


def test_frontier_and_operating_points_do_not_depend_on_the_test_split(matched_run, tmp_path, monkeypatch):
    """Swap the test split's tokens: every model comes from the cache, every choice (the frontier's Pareto
    points, the best dense model, the trade-off curve's thresholds, the 1%-loss operating point) is the same,
    and the test numbers differ (so the comparison can fail)."""
    import lego.run

    cfg, summary, d = matched_run
    load = lego.run.load_corpus

    def other_test_split(data_cfg):
        corpus = load(data_cfg)
        return dataclasses.replace(corpus, test=np.ascontiguousarray(corpus.test[::-1]))

    monkeypatch.setattr(lego.run, "load_corpus", other_test_split)
    swapped = run(cfg, tmp_path / "swapped")
    a, b = read(d / "eval/metrics.json"), read(tmp_path / "swapped/eval/metrics.json")
    assert swapped["ppl"] != summary["ppl"] and swapped["dense2_ppl"] != summary["dense2_ppl"]
    assert a["verdict"]["frontier_depths"] == b["verdict"]["frontier_depths"]
    assert a["verdict"]["training"]["best_depth"] == b["verdict"]["training"]["best_depth"]
    assert {k: v["val_ppl"] for k, v in a["dense"].items()} == {k: v["val_ppl"] for k, v in b["dense"].items()}
    x, y = read(d / "eval/analysis.json"), read(tmp_path / "swapped/eval/analysis.json")
    assert x["at_1pct_ppl"]["threshold"] == y["at_1pct_ppl"]["threshold"]
    thresholds = [[row["threshold"] for row in csv.DictReader(open(run_dir / "eval/tradeoff.csv"))]
                  for run_dir in (d, tmp_path / "swapped")]
    assert thresholds[0] == thresholds[1] and len(thresholds[0]) > 5
    assert x["at_1pct_ppl"]["ppl"] != y["at_1pct_ppl"]["ppl"]


def test_finetune_is_charged_no_training_split_mining(tmp_path):
    """phase2.lower=finetune mines no hard sequences: its mining is calibration before and after phase 2."""
    from lego.pipeline.compute import mining_compute
    from lego.pipeline.setup import make_loaders
    from lego.data import load_corpus

    cfg = tiny_config(tmp_path, **{"phase2.lower": "finetune", "phase2.loss_tokens": "all"})
    corpus = load_corpus(cfg.data)
    loaders = make_loaders(cfg, corpus)
    m = mining_compute(cfg, loaders, corpus.vocab_size)
    assert [r["pass"] for r in m["passes"]] == ["calibration", "recalibration"] and m["val_macs"] == 0
    spec = mining_compute(tiny_config(tmp_path), loaders, corpus.vocab_size)
    assert [r["pass"] for r in spec["passes"]] == ["calibration", "training-split mining"]
    calibration = spec["passes"][0]["macs"]
    assert m["train_macs"] == pytest.approx(2 * calibration) and spec["train_macs"] > m["train_macs"]


def test_operating_points_recomputed_from_validation_and_reported_on_test(make_tiny_model, perturb, make_token_batches):
    small = make_tiny_model(num_layers=2)
    big = grow(small, 4)
    perturb(big.layers[2:].parameters(), 0.3, 1)
    val, test = make_token_batches(n_batches=3, seed=1), make_token_batches(n_batches=3, seed=2)
    kw = dict(exit_layer=2, num_layers=4)
    tv = token_outputs(big, val, "cpu", measures=("max_prob",), exit_layer=2)
    tt = token_outputs(big, test, "cpu", measures=("max_prob",), exit_layer=2)
    saved = compute_saved_at(tt, measure="max_prob", choose=tv, **kw)
    on_val = compute_saved_at(tv, measure="max_prob", **kw)
    assert saved["threshold"] == on_val["threshold"] and saved["chosen"]["ppl"] == on_val["ppl"]
    at = routed_from_tokens(tt, saved["threshold"], measure="max_prob", **kw)
    assert saved["ppl"] == at["ppl"] and saved["compute_saved"] == 1 - at["compute_cost"]
    rows = tradeoff_curve(tt, measure="max_prob", calibrated_threshold=0.2, choose=tv, **kw)
    for row in (r for r in rows if r["kind"] == "grid"):
        thr = share_threshold(tv["conf_max_prob"], row["target_share"])
        assert row["threshold"] == thr
        assert row["ppl"] == routed_from_tokens(tt, thr, measure="max_prob", **kw)["ppl"]


def test_dense_frontier_cache_trains_each_depth_once_across_jobs(tmp_path):
    kw = {"eval.standard_baseline": True, "eval.dense_depths": [2, 4], "eval.analysis": False}
    run(tiny_config(tmp_path / "cache", **kw, **{"eval.html_tokens": 10}), tmp_path / "job0")
    run(tiny_config(tmp_path / "cache", **kw, **{"eval.html_tokens": 20}), tmp_path / "job1")
    for depth in (2, 4):
        first, second = (read(tmp_path / job / f"dense{depth}/cache.json") for job in ("job0", "job1"))
        assert first["key"] == second["key"] and not first["hit"] and second["hit"]
    assert not (tmp_path / "job0/dense3").exists()
    assert len(list((tmp_path / "cache/models").glob("dense*-*/model.pt"))) == 2


@pytest.mark.parametrize("budget", ["steps", "phase1"])
def test_other_budgets(tmp_path, budget):
    cfg = tiny_config(tmp_path / "cache", **{"eval.baseline_budget": budget, "eval.dense_depths": [4],
                                             "eval.analysis": False})
    run(cfg, tmp_path / "run")
    dense = read(tmp_path / "run/dense4/result.json")
    assert dense["stopped_early"] is False
    if budget == "phase1":
        assert dense["steps"] == dense["budget_steps"] == cfg.phase1.max_epochs * cfg.phase1.epoch_steps
    else:  # the pipeline's optimizer steps, exactly
        pipeline_steps = read(tmp_path / "run/phase1/result.json")["steps"] + read(tmp_path / "run/phase2/result.json")["steps"]
        assert dense["steps"] == dense["budget_steps"] == pipeline_steps


def test_interpolation_on_the_frontier():
    pts = [(0.6, 100.0), (0.8, 90.0), (1.0, 85.0)]
    assert interpolate(pts, 0.7) == {"ppl": 95.0, "where": "interpolated"}
    assert interpolate(pts, 1.2)["ppl"] == 85.0 and "beyond" in interpolate(pts, 1.2)["where"]
    assert interpolate(pts, 0.5)["ppl"] == 100.0 and "below" in interpolate(pts, 0.5)["where"]
    # a deeper model that does worse than a shallower one is off the frontier: the shallow one is cheaper
    dominated = [(0.6, 73.0), (1.0, 88.5)]
    assert pareto(dominated) == [(0.6, 73.0)]
    assert interpolate(dominated, 1.118) == {"ppl": 73.0, "where": "at or beyond its dearest point"}
    assert interpolate(dominated, 0.8)["ppl"] == 73.0
    # chosen on validation (item 1), read on test (item 2): a model that is better on test but worse on
    # validation stays off the frontier, and the test ppl interpolated is the chosen points'
    chosen = [(0.6, 80.0, 100.0), (0.8, 82.0, 70.0), (1.0, 75.0, 90.0)]
    assert pareto(chosen) == [(0.6, 80.0, 100.0), (1.0, 75.0, 90.0)]
    assert interpolate(chosen, 0.8, value=2) == {"ppl": 95.0, "where": "interpolated"}


def test_scoring_on_the_calibration_split_needs_saying_so(tmp_path):
    from lego.config import ConfigError, validate

    cfg = tiny_config(tmp_path, **{"eval.split": "validation"})
    with pytest.raises(ConfigError, match="eval.allow_validation_split"):
        validate(cfg)
    cfg.eval.allow_validation_split = True
    validate(cfg)


def test_sweep_summary_opens_with_a_table_read_at_a_glance():
    """summary.md's first table: one row per configuration with routed ppl, cost, MACs, both gaps, who wins at
    equal inference cost (a tie when the mean gap is within its seed spread) and how many seeds converged."""
    from lego.sweep_tables import glance_markdown, verdict_word

    base = {"_overrides": ["experiment=matched"], "n": 3, "ppl_mean": 95.1, "ppl_std": 1.5, "flop_cost_mean": 1.12,
            "flop_cost_std": 0.0, "train_macs_total_mean": 5.9e12, "train_macs_total_std": 1e9,
            "gap_at_inference_cost_pct_mean": 4.0, "gap_at_inference_cost_pct_std": 1.0,
            "gap_at_training_compute_pct_mean": -1.0, "gap_at_training_compute_pct_std": 2.0,
            "converged_phase1_mean": 2 / 3, "converged_dense2_mean": 0.0}
    assert verdict_word(base) == "dense"
    assert verdict_word({**base, "gap_at_inference_cost_pct_mean": -4.0}) == "ASHEM"
    assert verdict_word({**base, "gap_at_inference_cost_pct_mean": 0.5}) == "tie (within the seed spread)"
    assert verdict_word({"n": 1}) == ""
    lines = glance_markdown([base]).splitlines()
    header = next(line for line in lines if line.startswith("| config"))
    row = lines[lines.index(header) + 2]
    assert "wins at equal inference cost" in header and "converged" in header
    assert row.split(" | ")[2:] == ["95.1 ± 1.5", "1.12 ± 0", "5.9e+12 ± 1e+09", "4 ± 1", "-1 ± 2", "dense",
                                    "phase1 2/3, dense2 0/3 |"]


def test_baseline_tolerance_reuses_a_dense_model_a_step_off(tmp_path):
    """eval.baseline_tolerance: a dense model asked for one step more (or fewer) than one in the cache is that
    model (cache hit, its own step count and record), the nearest one when several are within it; with the
    tolerance 0 (the default) the asked steps are trained. Bad values get one line naming the key."""
    import torch

    from lego.config import ConfigError, validate
    from lego.data import load_corpus
    from lego.pipeline.setup import make_loaders
    from lego.pipeline.standard import cached_standard

    cfg = tiny_config(tmp_path / "cache")
    corpus = load_corpus(cfg.data)
    loaders = make_loaders(cfg, corpus)
    cpu = torch.device("cpu")

    def dense(job, steps, tolerance):
        cached_standard(cfg, corpus, loaders, 2, tmp_path / job / "dense2", cpu, "dense2", steps=steps,
                        tolerance=tolerance)
        return read(tmp_path / job / "dense2/cache.json"), read(tmp_path / job / "dense2/result.json")

    first, r0 = dense("a", 6, 0.0)
    assert not first["hit"] and r0["steps"] == 6
    near, r1 = dense("b", 7, 0.2)  # 7 x 0.2 -> within one step: the 6-step model
    assert near["hit"] and near["key"] == first["key"] and r1 == r0
    exact, r2 = dense("c", 7, 0.0)  # no tolerance: 7 steps trained
    assert not exact["hit"] and exact["key"] != first["key"] and r2["steps"] == 7
    nearest, _ = dense("d", 8, 0.25)  # 6 and 7 within two steps: 7 is nearer
    assert nearest["hit"] and nearest["key"] == exact["key"]
    far, r4 = dense("e", 9, 0.1)  # nothing within 0 steps: 9 trained
    assert not far["hit"] and r4["steps"] == 9
    for bad in (-0.1, 0.5, True):
        cfg.eval.baseline_tolerance = bad
        with pytest.raises(ConfigError, match=r"eval.baseline_tolerance=.*\[0, 0.01\]"):
            validate(cfg)
