"""Evaluation analysis: the one-pass trade-off curve against Trainer.evaluate, oracle, AUROC/ECE, files.

    python -m pytest tests/test_analysis.py -q
"""

import csv
import itertools
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lego import pictures
from lego.ashem import grow
from lego.analysis import (
    CSV_COLUMNS,
    auroc,
    compute_saved_at,
    exit_share_by_bucket,
    expected_calibration_error,
    frequency_buckets,
    oracle_router,
    routed_from_tokens,
    token_outputs,
    tradeoff_curve,
)
from lego.confidence import confidence_from_logits, exact_quantile
from lego.config import CONFIDENCE_MEASURES, StageConfig, TrainingConfig, create_standard_config
from lego.report import analyze
from lego.training import Trainer
from conftest import load_script

KEYS = ("acc", "ppl", "shallow_ratio", "compute_cost")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's waiting
    makes these tests 25x slower (1.3 s against 33 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def grown(make_tiny_model, perturb):
    """(phase-1 2-layer model, the 4-layer model grown from it with visibly different upper layers)."""
    small = make_tiny_model(num_layers=2)
    big = grow(small, 4)
    perturb(list(big.layers[2:].parameters()) + list(big.deep_head.parameters()), std=0.3, seed=1)
    return small, big.eval()


@pytest.fixture
def tok(grown, token_batches):
    return token_outputs(grown[1], token_batches, "cpu", exit_layer=2)


def evaluate(model, batches, threshold=None, *, measure="max_prob", exit_layer=2, num_layers=4):
    if threshold is None:
        config = create_standard_config(num_layers)
    else:
        config = TrainingConfig(stages=[StageConfig((num_layers, num_layers))], routing_threshold=threshold,
                                exit_layer=exit_layer, confidence=measure, upper_context="full")
    return Trainer(config, model.vocab_size, progress=False).evaluate(model, batches)


def assert_metrics_equal(got, want, keys=KEYS):
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key


# -- the one-pass curve ---------------------------------------------------------------------------

@pytest.mark.parametrize("measure", CONFIDENCE_MEASURES)
def test_routed_from_tokens_equals_evaluate(grown, token_batches, tok, measure):
    model = grown[1]
    conf = tok[f"conf_{measure}"]
    for q in (0.2, 0.5, 0.8):
        threshold = exact_quantile(conf, q)
        want = evaluate(model, token_batches, threshold, measure=measure)
        got = routed_from_tokens(tok, threshold, measure=measure, exit_layer=2, num_layers=4)
        assert 0 < got["shallow_ratio"] < 1
        assert set(got) == set(want)
        assert_metrics_equal(got, want, KEYS + ("exit_acc", "exit_ppl", "hard_deep_ppl", "threshold", "n_tokens"))


def test_tradeoff_rows_equal_evaluate_and_the_endpoints(grown, token_batches, tok):
    small, model = grown
    rows = tradeoff_curve(tok, measure="max_prob", exit_layer=2, num_layers=4, calibrated_threshold=0.3)
    assert [r["kind"] for r in rows] == ["grid"] * 21 + ["calibrated"]
    assert [r["target_share"] for r in rows[:21]] == pytest.approx([i / 20 for i in range(21)])
    for row in (rows[5], rows[10], rows[15], rows[21]):
        assert_metrics_equal(row, evaluate(model, token_batches, row["threshold"]))
    # share 0: the full-depth model, no routing at all
    assert_metrics_equal(rows[0], evaluate(model, token_batches))
    assert (rows[0]["shallow_ratio"], rows[0]["compute_cost"]) == (0.0, 1.0)
    # share 1: the exit-layer model, i.e. the phase-1 model it grew from
    phase1 = Trainer(create_standard_config(2), 16, progress=False).evaluate(small, token_batches)
    assert_metrics_equal(rows[20], phase1, ("acc", "ppl"))
    assert (rows[20]["shallow_ratio"], rows[20]["compute_cost"]) == (1.0, 0.5)
    shares = [r["shallow_ratio"] for r in rows[:21]]
    assert shares == sorted(shares)


def test_tradeoff_step_must_divide_one(tok):
    with pytest.raises(ValueError, match="step"):
        tradeoff_curve(tok, measure="max_prob", exit_layer=2, num_layers=4, calibrated_threshold=0.3, step=0.3)
    assert len(tradeoff_curve(tok, measure="margin", exit_layer=2, num_layers=4, calibrated_threshold=0.3,
                              step=0.25)) == 6


def test_token_outputs_match_the_model(grown, token_batches, tok):
    model = grown[1]
    x = torch.cat([b[0] for b in token_batches])
    y = torch.cat([b[1] for b in token_batches])
    valid = y != -100
    with torch.no_grad():
        deep, exit_ = model(x)[valid], model(x, layer=2)[valid]
    assert torch.equal(tok["target"], y[valid]) and torch.equal(tok["input"], x[valid])
    assert torch.equal(tok["pred_deep"], deep.argmax(-1)) and torch.equal(tok["pred_exit"], exit_.argmax(-1))
    torch.testing.assert_close(tok["nll_deep"], torch.nn.functional.cross_entropy(deep, y[valid], reduction="none"))
    assert torch.equal(tok["conf_max_prob"], confidence_from_logits(exit_))  # what routing compares
    seq = torch.arange(len(x))[:, None].expand_as(x)[valid]
    assert torch.equal(tok["sequence"], seq)
    with pytest.raises(ValueError, match="exit_layer"):
        token_outputs(model, token_batches, "cpu", exit_layer=4)
    with pytest.raises(ValueError, match="measure"):
        routed_from_tokens(token_outputs(model, token_batches, "cpu", exit_layer=2, measures=("margin",)), 0.5,
                           measure="max_prob", exit_layer=2, num_layers=4)


# -- oracle and the 1% point ----------------------------------------------------------------------

def test_oracle_accuracy_is_the_full_depth_accuracy(grown, token_batches, tok):
    oracle = oracle_router(tok, exit_layer=2, num_layers=4)
    full = evaluate(grown[1], token_batches)
    assert oracle["acc"] == float(int((tok["pred_deep"] == tok["target"]).sum()) / tok["target"].numel())
    assert oracle["acc"] == pytest.approx(full["acc"], abs=0)
    assert 0 < oracle["shallow_ratio"] < 1
    assert oracle["shallow_ratio"] == float((tok["pred_exit"] == tok["pred_deep"]).double().mean())


@pytest.mark.parametrize("measure", CONFIDENCE_MEASURES)
def test_compute_saved_is_the_best_threshold(tok, measure):
    conf = tok[f"conf_{measure}"]
    full = routed_from_tokens(tok, float(conf.max()) + 1, measure=measure, exit_layer=2, num_layers=4)
    for tol in (0.0, 0.01, 0.1):
        got = compute_saved_at(tok, measure=measure, exit_layer=2, num_layers=4, max_ppl_increase=tol)
        best = 0.0
        for t in conf.unique().tolist():  # brute force: every distinct threshold
            m = routed_from_tokens(tok, t, measure=measure, exit_layer=2, num_layers=4)
            if m["ppl"] <= full["ppl"] * (1 + tol) * (1 + 1e-12):
                best = max(best, 1 - m["compute_cost"])
        assert got["compute_saved"] == pytest.approx(best, abs=1e-12)
        assert got["ppl"] <= full["ppl"] * (1 + tol) * (1 + 1e-9)


# -- confidence diagnostics -----------------------------------------------------------------------

def test_auroc_by_hand():
    # positives 0.4, 0.8, 0.9 against negatives 0.1, 0.4, 0.8: wins 1 + 0.5 | 2 + 0.5 | 3 = 7 of 9 pairs
    scores = [0.1, 0.4, 0.4, 0.8, 0.8, 0.9]
    labels = [0, 1, 0, 1, 0, 1]
    assert auroc(scores, labels) == pytest.approx(7 / 9)
    assert auroc(torch.tensor(scores), torch.tensor(labels, dtype=torch.bool)) == pytest.approx(7 / 9)
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([1, 2, 3], [1, 0, 0]) == 0.0
    assert auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5
    assert math.isnan(auroc([1, 2], [1, 1]))
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    y = torch.rand(200, generator=g) < 0.4
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auroc(s, y) == pytest.approx(float(pairs.mean()), abs=1e-12)


def test_ece_by_hand():
    conf = [0.05, 0.1, 0.5, 0.55, 0.95, 1.0]
    correct = [0, 1, 1, 0, 1, 1]
    # two bins (0, .5] and (.5, 1]: |2/3 - 0.65/3| * 3/6 + |2/3 - 2.5/3| * 3/6
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.5 * 0.45 + 0.5 * (1 / 6))
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(abs(4 / 6 - 3.15 / 6))
    assert expected_calibration_error([0.0, 0.3], [0, 0], n_bins=15) == pytest.approx(0.15)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0


def test_each_measure_changes_the_hard_tokens(grown, token_batches):
    tok = token_outputs(grown[1], token_batches[:1], "cpu", exit_layer=2)  # one fixed batch
    hard = {m: tok[f"conf_{m}"] < exact_quantile(tok[f"conf_{m}"], 0.5) for m in CONFIDENCE_MEASURES}
    for a, b in itertools.combinations(CONFIDENCE_MEASURES, 2):
        assert not torch.equal(hard[a], hard[b]), (a, b)


def test_frequency_buckets_are_thirds_of_the_mass():
    # sorted 40 | 20 15 | 15 10 (+ unseen id 1); mass of the more frequent types: 0 | .4 .6 | .75 .9
    counts = np.array([40, 0, 20, 15, 15, 10])
    assert frequency_buckets(counts).tolist() == [0, 2, 1, 1, 2, 2]
    targets = torch.tensor([0, 0, 2, 3, 4, 1])
    easy = torch.tensor([True, False, True, True, True, False])
    out = exit_share_by_bucket(targets, {"exit_share": easy}, counts)
    assert out["frequent"] == {"n_types": 1, "train_mass": 0.4, "n_tokens": 2, "exit_share": 0.5}
    assert (out["mid"]["n_types"], out["mid"]["train_mass"], out["mid"]["exit_share"]) == (2, 0.35, 1.0)
    assert (out["rare"]["n_types"], out["rare"]["exit_share"]) == (3, 0.5)


# -- analyze: files -------------------------------------------------------------------------------

class CharTokenizer:
    """decode([i]) -> one letter; id 3 decodes to markup, to prove the HTML escapes it."""

    def decode(self, ids):
        return "".join("<b>&" if i == 3 else chr(ord("a") + i) for i in ids)


def run_analyze(out_dir, grown, batches, tokenizer=None, upper_context="full"):
    small, model = grown
    conf = token_outputs(model, batches, "cpu", exit_layer=2)["conf_max_prob"]
    threshold = exact_quantile(conf, 0.5)
    baselines = {
        "ashem (routed)": evaluate(model, batches, threshold),
        "phase-1 model": dict(evaluate(small, batches, num_layers=2), compute_cost=0.5, shallow_ratio=1.0),
        "ashem, no routing": evaluate(model, batches),
    }
    train_tokens = np.random.default_rng(0).zipf(1.5, 2000) % 16
    summary = analyze(out_dir, model=model, loader=batches, device="cpu", threshold=threshold, measure="max_prob",
                      exit_layer=2, baselines=baselines, tokenizer=tokenizer, train_tokens=train_tokens,
                      vocab_size=16, html_tokens=40, upper_context=upper_context)
    return summary, baselines, threshold


def test_analyze_writes_every_file(tmp_path, grown, token_batches):
    summary, baselines, threshold = run_analyze(tmp_path, grown, token_batches, CharTokenizer())
    for name in ("tradeoff.csv", "report.md", "tokens.html", "tradeoff.png", "analysis.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "tradeoff.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert len(rows) == 22 and [r["kind"] for r in rows].count("calibrated") == 1
    calibrated = next(r for r in rows if r["kind"] == "calibrated")
    assert float(calibrated["threshold"]) == threshold
    for key in KEYS:  # the calibrated row is the routed model (upper_context='full')
        assert float(calibrated[key]) == pytest.approx(baselines["ashem (routed)"][key], rel=1e-6)
    report = (tmp_path / "report.md").read_text()
    assert "| router / model | acc | ppl | shallow_ratio | compute_cost |" in report
    for name in (*baselines, "oracle router", "calibrated router (one pass)"):
        assert f"| {name} |" in report
    assert "thirds of the training-split token mass" in report and "AUROC" in report
    page = (tmp_path / "tokens.html").read_text()
    assert page.count('class="early"') + page.count('class="deep"') == 40
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    assert summary["oracle"]["acc"] == summary["full_depth"]["acc"]
    assert set(summary["auroc"]) == set(CONFIDENCE_MEASURES)
    assert 0.0 <= summary["ece_exit"] <= 1.0
    assert sum(b["n_tokens"] for b in summary["frequency_buckets"]["buckets"].values()) == summary["n_tokens"]
    assert summary["hard_tokens"] and all(isinstance(e["token"], str) for e in summary["hard_tokens"])
    assert 0.0 <= summary["at_1pct_ppl"]["compute_saved"] <= 0.5
    assert json.loads((tmp_path / "analysis.json").read_text())["n_tokens"] == summary["n_tokens"]


def test_plot_script_redraws_from_the_eval_dir(tmp_path, grown, token_batches):
    run_analyze(tmp_path, grown, token_batches)
    (tmp_path / "tradeoff.png").unlink()
    script = load_script("plot_tradeoff")
    assert script.main([str(tmp_path)]) == 0
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert script.main([str(tmp_path / "nowhere")]) == 2


def test_analyze_without_matplotlib(tmp_path, grown, token_batches, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    caplog.set_level(logging.INFO, logger=pictures.__name__)  # the picture is what needs matplotlib
    summary, _, _ = run_analyze(tmp_path, grown, token_batches)
    for name in ("tradeoff.csv", "report.md", "tokens.html", "analysis.json"):
        assert (tmp_path / name).exists(), name
    assert not (tmp_path / "tradeoff.png").exists()
    hints = [r.getMessage() for r in caplog.records if "pip install -e '.[plots]'" in r.getMessage()]
    assert len(hints) == 1
    assert "pip install -e '.[plots]'" in (tmp_path / "report.md").read_text()
    assert summary["hard_tokens"][0]["token"] == str(summary["hard_tokens"][0]["id"])  # ids without a tokenizer


def test_analyze_says_when_the_model_routes_under_another_policy(tmp_path, grown, token_batches, caplog):
    run_analyze(tmp_path, grown, token_batches, upper_context="skip")
    assert "upper_context='skip'" in (tmp_path / "report.md").read_text()
    assert any("assumes 'full'" in r.getMessage() for r in caplog.records)
