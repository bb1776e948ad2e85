"""Metrics by label, routing against the truth and the learned router (lego.labels, lego.stages.by_label)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import add_noise, tiny_config

from lego.batches import make_loader
from lego.chains import UNPREDICTABLE, generate
from lego.config import ChainsConfig, StageConfig, TrainingConfig, create_standard_config
from lego.evaluation import evaluate
from lego.label_report import section, write_section
from lego.labels import (fit_probe, label_table, labelled_tokens, learned_threshold, oracle_by_label, router_summary,
                         solved_hops, truth)
from lego.model import DeepSupervisionTransformer

T = 16


@pytest.fixture(scope="module")
def setting():
    """A noisy 4-layer byte model and a labelled chains loader (validation and test)."""
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(256, 16, 4, 2, max_seq_len=T)
    add_noise(model.parameters(), 0.3, 0)
    model.eval()
    c = ChainsConfig(num_vars=4, depth_probs=[0.25, 0.25, 0.25, 0.25], queries=1, eval_lines=120)
    loaders = {}
    for split in ("validation", "test"):
        rows, labels = generate(c, split)
        tokens = np.frombuffer("".join(rows).encode(), dtype=np.uint8)
        loaders[split] = (tokens, labels)
    return model, loaders


def loader(setting, split, labelled=True, **kw):
    tokens, labels = setting[1][split]
    return make_loader(tokens, T, 8, shuffle=False, seed=0, labels=labels if labelled else None, **kw)


def test_per_label_metrics_add_up_to_the_overall_ones(setting):
    model = setting[0]
    tok = labelled_tokens(model, loader(setting, "test"), "cpu", exit_layer=2, progress=False)
    for nll, ok in ((tok["nll_deep"], tok["ok_deep"]), (tok["nll_exit"], tok["ok_exit"])):
        table = label_table(tok["label"], nll, ok)
        rows = [r for k, r in table.items() if k != "all"]
        assert {"unpredictable", "format", "1 hops", "4 hops"} <= set(table)
        assert sum(r["n_tokens"] for r in rows) == table["all"]["n_tokens"] == nll.numel()
        assert sum(r["correct"] for r in rows) == table["all"]["correct"] == int(ok.sum())
        assert sum(r["nll_sum"] for r in rows) == table["all"]["nll_sum"]  # exactly: the row sums, in order
        assert table["all"]["nll_sum"] == pytest.approx(float(nll.double().sum()), rel=1e-12)
    # the overall numbers are Trainer.evaluate's, unrouted and routed
    plain = evaluate(create_standard_config(4), model, loader(setting, "test", labelled=False), "cpu", progress=False)
    all_deep = label_table(tok["label"], tok["nll_deep"], tok["ok_deep"])["all"]
    assert all_deep["acc"] == plain["acc"] and all_deep["n_tokens"] == plain["n_tokens"]
    assert all_deep["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    thr = float(tok["conf"].median())
    routed_cfg = TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=thr, exit_layer=2)
    live = evaluate(routed_cfg, model, loader(setting, "test", labelled=False), "cpu", progress=False)
    r = router_summary(tok, tok["conf"] >= thr, exit_layer=2, num_layers=4)
    assert r["shallow_ratio"] == live["shallow_ratio"] and r["compute_cost"] == pytest.approx(live["compute_cost"])
    assert r["acc"] == pytest.approx(live["acc"], abs=1.5 / live["n_tokens"])
    assert r["ppl"] == pytest.approx(live["ppl"], rel=1e-5)
    rows = [v for k, v in r["by_label"].items() if k != "all"]
    assert sum(v["n_exit"] for v in rows) == r["by_label"]["all"]["n_exit"] == int((tok["conf"] >= thr).sum())
    assert r["by_label"]["all"]["acc"] == r["acc"]
    assert r["by_label"]["all"]["ppl"] == pytest.approx(r["ppl"], rel=1e-12)


def test_labels_follow_the_loader_order_under_sharding(setting):
    model = setting[0]
    whole = labelled_tokens(model, loader(setting, "test"), "cpu", progress=False)
    shards = [labelled_tokens(model, loader(setting, "test", rank=r, world_size=2), "cpu", progress=False)
              for r in (0, 1)]
    counts = label_table(whole["label"], whole["nll_deep"], whole["ok_deep"])
    merged = label_table(torch.cat([s["label"] for s in shards]), torch.cat([s["nll_deep"] for s in shards]),
                         torch.cat([s["ok_deep"] for s in shards]))
    assert {k: (v["n_tokens"], v["correct"]) for k, v in counts.items()} == \
           {k: (v["n_tokens"], v["correct"]) for k, v in merged.items()}


def test_oracle_by_label_exit_share_equals_the_labelled_share(setting):
    labels = torch.from_numpy(setting[1]["test"][1].copy())
    tok = {"label": labels, "nll_exit": torch.ones(len(labels)), "nll_deep": torch.zeros(len(labels)),
           "ok_exit": torch.zeros(len(labels), dtype=torch.bool), "ok_deep": torch.ones(len(labels), dtype=torch.bool)}
    for k in range(0, 5):
        stop = oracle_by_label(labels, k)
        labelled_share = float(((labels <= 0) | (labels <= k)).double().mean())
        r = router_summary(tok, stop, exit_layer=2, num_layers=4)
        assert r["shallow_ratio"] == labelled_share
        for h in range(1, 5):
            assert r["by_label"][f"{h} hops"]["exit_share"] == (1.0 if h <= k else 0.0)
        assert r["truth"]["sent_up_by_hops"] == {str(h): 0.0 if h <= k else 1.0 for h in range(1, 5)}
        share = r["truth"]["unpredictable_share_of_sent_up"]  # only answers go up; none at all for k = 4
        assert share == 0.0 if k < 4 else math.isnan(share)


def test_solved_hops_and_truth():
    t = lambda *acc: {f"{k + 1} hops": {"acc": a} for k, a in enumerate(acc)}  # noqa: E731
    assert solved_hops(t(0.9, 0.5, 0.9), t(0.91, 0.9, 0.9)) == 1  # stops at the first hop it fails
    assert solved_hops(t(0.2), t(0.9)) == 0
    assert solved_hops(t(0.9, 0.9), t(0.9, 0.9)) == 2
    labels = torch.tensor([1, 1, 2, 3, UNPREDICTABLE, UNPREDICTABLE, 0], dtype=torch.int8)
    stop = torch.tensor([True, False, False, True, False, True, True])
    got = truth(labels, stop)
    assert got["sent_up_by_hops"] == {"1": 0.5, "2": 1.0, "3": 0.0}
    assert got["sent_up_2plus_hops"] == 0.5
    assert got["unpredictable_share_of_sent_up"] == pytest.approx(1 / 3)
    assert got["sent_up_share"] == pytest.approx(3 / 7)


def test_learned_router_is_deterministic_and_gives_the_asked_exit_share(setting):
    model = setting[0]
    val = labelled_tokens(model, loader(setting, "validation"), "cpu", exit_layer=2, hidden=True, progress=False)
    assert val["hidden"].shape == (val["nll_deep"].numel(), 16)
    wins = val["nll_deep"] < val["nll_exit"]
    probe = fit_probe(val["hidden"], wins)
    again = fit_probe(val["hidden"], wins)
    assert torch.equal(probe.weight, again.weight) and probe.bias == again.bias
    conf = probe(val["hidden"])
    for ratio in (0.3, 0.5, 0.8):
        thr = learned_threshold(conf, ratio)
        share = float((conf >= thr).double().mean())
        assert abs(share - (1 - ratio)) <= 1.0 / conf.numel(), (ratio, share)
    # it learns something: the tokens it keeps at the exit are those the deep exit beats less often
    thr = learned_threshold(conf, 0.5)
    assert wins[conf < thr].double().mean() > wins[conf >= thr].double().mean()


def test_learned_probe_separates_a_linear_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) * 3 + 5
    y = x[:, 2] - x[:, 5] > 0
    probe = fit_probe(x, y)
    conf = probe(x)
    assert ((conf < 0) == y).double().mean() > 0.97  # confidence is the negated logit of 'deep wins'


@pytest.mark.parametrize("policy,target", [("full", "wins"), ("propagate", "gain")])
def test_a_chains_run_reports_by_label(tmp_path, policy, target):
    from lego.run import run

    cfg = tiny_config(tmp_path / "cache", **{"data.name": "chains", "data.max_train_tokens": None,
                                            "phase2.upper_context": policy, "eval.learned_router_target": target,
                                            "data.chains": ChainsConfig(train_lines=600, eval_lines=120),
                                            "eval.learned_router": True, "num_threads": 1,
                                            "stages": ["phase1", "hard_examples", "phase2", "eval", "generate"]})
    run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run/eval/metrics.json").read_text())
    s = metrics["by_label"]
    assert set(s["routers"]) == {"calibrated", "oracle by label", "learned"}
    assert {"phase-1 model (2 layers)", "ashem, no routing", "dense 2-layer model", "dense 4-layer model"} == \
           set(s["models"])
    cal = s["routers"]["calibrated"]
    assert cal["shallow_ratio"] == metrics["ashem"]["shallow_ratio"]
    assert math.isclose(cal["ppl"], metrics["ashem"]["ppl"], rel_tol=1e-5)
    assert s["models"]["ashem, no routing"]["all"]["acc"] == metrics["no_routing"]["acc"]
    assert s["models"]["dense 4-layer model"]["all"]["acc"] == metrics["dense"]["4"]["acc"]
    learned = s["routers"]["learned"]  # the asked exit share on validation, up to ties at the threshold
    assert abs(learned["validation_shallow_ratio"] - 0.5) <= learned["validation_tie_share"] + 1 / learned["validation_tokens"]
    assert learned["validation_tie_share"] < 0.05
    assert learned["target"] == {"wins": "nll_deep < nll_exit", "gain": "nll_exit - nll_deep (ridge)"}[target]
    live = learned["live"]  # Trainer.evaluate with it: the labelled routed pass's numbers, under every policy
    assert live["upper_context"] == metrics["upper_context"] == policy
    assert live["shallow_ratio"] == learned["shallow_ratio"] and math.isclose(live["ppl"], learned["ppl"], rel_tol=1e-5)
    assert 0 < learned["shallow_ratio"] < 1 and learned["by_label"]["all"]["n_exit"] == round(
        learned["shallow_ratio"] * learned["n_tokens"])
    assert (tmp_path / "run/eval/learned_router.pt").is_file()
    flat = json.loads((tmp_path / "run/metrics.json").read_text())  # the sweep summary's numbers
    table = s["models"]["dense 4-layer model"]
    deep = [table[k] for k in table if k.endswith("hops") and int(k.split()[0]) >= 2]
    assert flat["acc_2plus_dense4"] == sum(r["correct"] for r in deep) / sum(r["n_tokens"] for r in deep)
    assert flat["acc_hops1_ashem"] == cal["by_label"]["1 hops"]["acc"]
    assert flat["sent_up_2plus_learned"] == learned["truth"]["sent_up_2plus_hops"]
    assert flat["ppl_router_learned"] == learned["ppl"] and "ppl_router_ashem" not in flat
    gen = json.loads((tmp_path / "run/generate/metrics.json").read_text())["learned_router"]
    assert gen["settings"]["confidence"] == "learned" and 0 <= gen["routed"]["exit_share"] <= 1
    assert gen["routed"]["agreement_with_dense"] <= 1
    report = (tmp_path / "run/eval/report.md").read_text()
    assert report.count("## Routing by label") == 1 and "### Routers" in report
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run/eval/by_label.png").stat().st_size > 0


def test_report_section_without_labels_and_its_rewrite(tmp_path):
    r = {"acc": 0.5, "ppl": 3.0, "shallow_ratio": 0.5, "compute_cost": 0.75, "n_tokens": 10, "threshold": 0.1}
    s = {"split": "test", "n_tokens": 10, "exit_layer": 2, "num_layers": 4, "models": {}, "points": {},
         "routers": {"calibrated": r, "learned": {**r, "hard_ratio": 0.5, "validation_shallow_ratio": 0.5}}}
    text = section(s, False)
    assert "carries no labels" in text and "| learned | 0.5 | 3 |" in text and "by_label.png" not in text
    path = tmp_path / "report.md"
    path.write_text("# Evaluation analysis\n\nbody\n")
    write_section(path, text)
    write_section(path, text)  # an eval rerun replaces the section
    assert path.read_text().count("## Routing by label") == 1 and path.read_text().startswith("# Evaluation analysis")


def test_gain_probe_recovers_a_linear_gain_and_ranks_by_it():
    """eval.learned_router_target=gain: ridge regression of nll_exit - nll_deep on the state; on an exactly linear
    gain it predicts it (small ridge), and the router's score is the negated prediction, so the tokens the last
    layer helps most are the least confident; the threshold gives the asked share as for the logistic probe."""
    from lego.labels import fit_gain_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g) * 2 + 3
    gain = 0.7 * x[:, 1] - 0.2 * x[:, 4] + 0.5
    probe = fit_gain_probe(x, gain, l2=1e-8)
    assert torch.allclose(-probe(x), gain, atol=1e-3)
    again = fit_gain_probe(x, gain, l2=1e-8)
    assert torch.equal(probe.weight, again.weight) and probe.bias == again.bias
    conf = probe(x)
    thr = learned_threshold(conf, 0.2)  # send up the 20% with the largest gain
    up = conf < thr
    assert abs(float(up.double().mean()) - 0.2) <= 1 / x.shape[0]
    assert gain[up].min() >= gain[~up].max() - 1e-3
    # the ridge shrinks: a large l2 pulls every prediction towards the mean gain
    flat = fit_gain_probe(x, gain, l2=1e3)
    assert (-flat(x)).std() < 0.1 * gain.std() and abs(float(-flat(x).mean()) - float(gain.mean())) < 1e-3


def test_learned_router_target_is_checked_and_recorded(tmp_path):
    from lego.config import ConfigError, validate
    from lego.pipeline.science import science_config

    cfg = tiny_config(tmp_path, **{"eval.learned_router_target": "loss"})
    with pytest.raises(ConfigError, match="eval.learned_router_target='loss' is not allowed; choose one of wins, gain"):
        validate(cfg)
    cfg.eval.learned_router_target = "gain"
    assert "learned_router_target" not in science_config(cfg)["eval"]  # no learned router: unused
    cfg.eval.learned_router = True
    assert science_config(cfg)["eval"]["learned_router_target"] == "gain"
    cfg.eval.learned_router_target = "wins"
    assert "learned_router_target" not in science_config(cfg)["eval"]  # the default
