"""The honest comparison (issue 12, SPEC section 6): recorded training compute, matched dense baselines and
the frontier, operating points chosen on validation, the learning-rate schedule in the loop, the verdict."""

import json

import pytest
from conftest import tiny_config

from lego.analysis import compute_saved_at, routed_from_tokens, share_threshold, token_outputs, tradeoff_curve
from lego.cost import dense_training_macs
from lego.run import format_table, run
from lego.schedule import lr_at
from lego.stages.compare import interpolate, pareto, positions


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def matched_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("matched")
    cfg = tiny_config(d / "cache", **{"eval.analysis": True, "eval.html_tokens": 20, "eval.dense_depths": None,
                                      "phase1.schedule": "cosine",
                                      "phase1.warmup_steps": 3, "phase1.min_lr_ratio": 0.2})
    return cfg, run(cfg, d / "run"), d / "run"


def test_matched_baseline_spends_the_pipelines_training_compute(matched_run):
    cfg, summary, d = matched_run
    ev = read(d / "eval/metrics.json")
    compute = ev["train_compute"]
    p1, p2 = read(d / "phase1/result.json"), read(d / "phase2/result.json")
    assert compute["phase1"]["train_macs"] == p1["train_macs"] and compute["phase2"]["train_macs"] == p2["train_macs"]
    T, B = cfg.data.seq_len, cfg.data.batch_size
    shape = dict(dim=cfg.model.dim, ffn_mult=cfg.model.ffn_mult, ffn=cfg.model.ffn, vocab_size=summary["vocab_size"],
                 seq_len=T)
    # phase 1: 3 x forward of every layer and the head, on every input position it trained on
    assert p1["tokens"] == p1["steps"] * B * T
    assert p1["train_macs"] == pytest.approx(dense_training_macs(tokens=p1["tokens"], num_layers=2, **shape))
    assert compute["total"]["train_macs"] == pytest.approx(
        p1["train_macs"] + compute["mining"]["train_macs"] + p2["train_macs"])
    assert compute["mining"]["tokens"] > positions(range(cfg.data.max_train_tokens), T)  # train + validation
    for depth in (2, 3, 4):  # every depth of the frontier, each at the pipeline's budget
        dense = read(d / f"dense{depth}/result.json")
        epoch_macs = cfg.phase1.epoch_steps * dense_training_macs(tokens=B * T, num_layers=depth, **shape)
        assert abs(dense["train_macs"] - compute["total"]["train_macs"]) <= epoch_macs / 2 + 1e-6 * epoch_macs
        assert ev["dense"][str(depth)]["ppl"] == summary[f"dense{depth}_ppl"]
    assert ev["standard"] == ev["dense"]["4"]
    # deeper dense models get fewer steps for the same compute
    assert read(d / "dense2/result.json")["steps"] > read(d / "dense4/result.json")["steps"]


def test_verdict_and_flags_are_in_the_summary_and_table(matched_run):
    _, summary, d = matched_run
    v = read(d / "eval/metrics.json")["verdict"]
    assert v["inference"]["cost"] == summary["flop_cost"]
    assert v["training"]["dense_ppl"] == summary["dense4_ppl"]
    assert summary["gap_at_training_compute_pct"] == pytest.approx(100 * (summary["ppl"] / summary["dense4_ppl"] - 1))
    assert summary["verdict"] == v["line"] and "At equal training compute" in v["line"]
    best = min((2, 3, 4), key=lambda depth: summary[f"dense{depth}_ppl"])
    assert v["training"]["best_depth"] == best and v["training"]["best_ppl"] == summary[f"dense{best}_ppl"]
    assert set(summary["not_converged"]) <= {"phase1", "phase2", "dense2", "dense3", "dense4"}
    table = format_table(summary)
    assert table.endswith(v["line"])
    assert ("the comparison is preliminary" in table) == bool(summary["not_converged"])


def test_the_schedule_runs_in_the_training_loop(matched_run):
    cfg, _, d = matched_run
    p1 = cfg.phase1
    hist = [json.loads(line) for line in (d / "phase1/history.jsonl").read_text().splitlines()]
    total = p1.max_epochs * p1.epoch_steps
    done = 0
    for row in hist:  # each row records the lr of its epoch's last optimizer step
        done += row["steps"]
        assert row["lr"] == pytest.approx(lr_at(done - 1, base_lr=p1.lr, schedule="cosine", warmup_steps=3,
                                                total_steps=total, min_lr_ratio=0.2), rel=1e-12)
    # phase 2 kept the constant default: its lr never moved
    assert {json.loads(line)["lr"] for line in (d / "phase2/history.jsonl").read_text().splitlines()} == {cfg.phase2.lr}


def test_quoted_operating_points_are_chosen_on_validation(matched_run):
    cfg, _, d = matched_run
    an = read(d / "eval/analysis.json")
    saved = an["at_1pct_ppl"]
    assert an["operating_points_chosen_on"] == "validation" and saved["chosen_on"] == "validation"
    assert an["compute_saved_at_1pct_ppl"] == saved["compute_saved"]


def test_operating_points_recomputed_from_validation_and_reported_on_test(make_tiny_model, perturb, make_token_batches):
    small = make_tiny_model(num_layers=2)
    big = small.grow(4, routing_threshold=0.2)
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
    if budget == "phase1":
        assert dense["epochs_run"] <= cfg.phase1.max_epochs
    else:
        pipeline_steps = read(tmp_path / "run/phase1/result.json")["steps"] + read(tmp_path / "run/phase2/result.json")["steps"]
        assert abs(dense["steps"] - pipeline_steps) <= cfg.phase1.epoch_steps / 2


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


def test_scoring_on_the_calibration_split_needs_saying_so(tmp_path):
    from lego.config import ConfigError, validate

    cfg = tiny_config(tmp_path, **{"eval.split": "validation"})
    with pytest.raises(ConfigError, match="eval.allow_validation_split"):
        validate(cfg)
    cfg.eval.allow_validation_split = True
    validate(cfg)
