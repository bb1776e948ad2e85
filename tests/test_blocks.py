"""LEGO with any number of Blocks (issue 16): blocks=[2, 4] is the default run bit for bit; a 3-Block run keeps
every exit's logits, calibrates each exit on the tokens that reach it, and shares Blocks 1 and 2 through the cache;
cascaded routing and compute_cost against a hand computation; bad `blocks` / `hard_example_ratios` input."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
import torch
from conftest import TINY, lego_run, tiny_config

from lego.analysis import oracle_router, routed_from_tokens, token_outputs, tradeoff_curve
from lego.ashem import gather_confidences, grow
from lego.checkpoint import load_model, model_args, save_model
from lego.confidence import exact_quantile
from lego.config import ASHEMConfig, ConfigError, StageConfig, TrainingConfig, validate
from lego.cost import routed_macs
from lego.data import load_corpus
from lego.evaluation import evaluate
from lego.run import run
from lego.pipeline.setup import make_loaders

WALL = ("wall_s", "wall_cost", "train_s", "created")


def _metrics(run_dir: Path) -> dict:
    def strip(x):
        return {k: strip(v) for k, v in x.items() if k not in WALL} if isinstance(x, dict) else x
    return strip(json.loads((run_dir / "eval" / "metrics.json").read_text()))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The default tiny run, blocks=[2, 4] and blocks=[2, 4, 6] (hard_example_ratios=[0.5, 0.4], with the
    analysis), one cache."""
    root = tmp_path_factory.mktemp("blocks")
    runs = {"default": {}, "2-4": {"blocks": [2, 4]},
            "2-4-6": {"blocks": [2, 4, 6], "hard_example_ratios": [0.5, 0.4], "eval.analysis": True}}
    out = {}
    for name, overrides in runs.items():
        cfg = tiny_config(root / "cache", **{"generate.enabled": False}, **overrides)
        out[name] = (cfg, run(cfg, root / name), root / name)
    return out


def test_two_blocks_are_the_default_run_bit_for_bit(sweep):
    (_, s_def, d_def), (_, s_24, d_24) = sweep["default"], sweep["2-4"]
    assert _metrics(d_def) == _metrics(d_24)
    assert {k: v for k, v in s_def.items() if k not in ("run_dir", *WALL)} == \
           {k: v for k, v in s_24.items() if k not in ("run_dir", *WALL)}
    same = lambda d: json.loads((d / "run.json").read_text())["science_config"]  # noqa: E731
    assert same(d_def) == same(d_24) and "blocks" not in same(d_24)
    assert not (d_24 / "block3").exists()


def test_three_blocks_write_each_block_and_report_each_exit(sweep):
    cfg, summary, d = sweep["2-4-6"]
    for f in ("phase1/model.pt", "hard_examples/threshold.json", "phase2/model.pt", "block3/threshold.json",
              "block3/model.pt", "block3/history.jsonl", "eval/metrics.json"):
        assert (d / f).exists(), f
    ev = _metrics(d)
    assert ev["exit_layers"] == [2, 4] and ev["num_layers"] == 6 and len(ev["thresholds"]) == 2
    exits = ev["ashem"]["exits"]
    assert [e["layer"] for e in exits] == [2, 4, 6]
    assert sum(e["n_tokens"] for e in exits) == ev["ashem"]["n_tokens"]
    assert ev["ashem"]["shallow_ratio"] == pytest.approx(1 - exits[-1]["share"])
    layers_run = sum(e["share"] * e["layer"] for e in exits) / 6
    assert ev["ashem"]["compute_cost"] == pytest.approx(layers_run)
    assert set(ev["dense"]) == {"2", "4", "6"}  # every Block boundary
    resolved = yaml.safe_load((d / "config_resolved.yaml").read_text())  # what the stages read
    assert (resolved["phase1"]["layers"], resolved["phase2"]["layers"], resolved["blocks"]) == (2, 6, [2, 4, 6])
    assert resolved["hard_example_ratio"] == 0.5 and resolved["hard_example_ratios"] == [0.5, 0.4]
    assert {"block3"} <= set(ev["train_compute"]) and summary["exit4_share"] == exits[1]["share"]
    assert ev["train_compute"]["total"]["train_macs"] == pytest.approx(
        sum(ev["train_compute"][s]["train_macs"] for s in ("phase1", "mining", "phase2", "block3")))


def test_a_three_block_run_writes_the_analysis(sweep):
    _, summary, d = sweep["2-4-6"]
    for f in ("tradeoff.csv", "report.md", "tokens.html", "analysis.json"):
        assert (d / "eval" / f).stat().st_size > 0, f
    a = json.loads((d / "eval/analysis.json").read_text())
    ev = _metrics(d)
    assert a["exit_layer"] == [2, 4] and a["thresholds"] == ev["thresholds"]
    assert [e["n_tokens"] for e in a["exits"]["calibrated"]] == [e["n_tokens"] for e in ev["ashem"]["exits"]]
    assert a["oracle"]["acc"] == a["full_depth"]["acc"] and "compute_saved_at_1pct_ppl" in summary
    with open(d / "eval/tradeoff.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"threshold_2", "threshold_4", "share_2", "share_4", "share_6", "flop_cost"} <= set(rows[0])
    assert all(r["flop_cost"] != "" for r in rows)
    calibrated = rows[-1]
    assert [float(calibrated[f"threshold_{e}"]) for e in (2, 4)] == ev["thresholds"]
    assert float(calibrated["shallow_ratio"]) == pytest.approx(ev["ashem"]["shallow_ratio"])
    report = (d / "eval/report.md").read_text()
    assert "Exits at layers 2, 4 of 6" in report and "## Per exit" in report
    page = (d / "eval/tokens.html").read_text()
    assert all(f'class="swatch {c}"' in page for c in ("early", "exit4", "deep")) and "(layer 4)" in page


def test_every_exit_stays_bit_identical_and_meets_its_ratio(sweep):
    cfg, _, d = sweep["2-4-6"]
    corpus = load_corpus(cfg.data)
    loaders = make_loaders(cfg, corpus)
    m1 = load_model(d / "phase1/model.pt", {}, "cpu", "phase1")
    m2 = load_model(d / "phase2/model.pt", {}, "cpu", "phase2")
    m3 = load_model(d / "block3/model.pt", {}, "cpu", "block3")
    assert m3.exit_layers == [2, 4] and len(m3.exit_heads) == 1
    x, _ = next(iter(loaders.validation))
    with torch.no_grad():
        assert torch.equal(m1(x), m3(x, layer=2)) and torch.equal(m2(x, layer=2), m3(x, layer=2))
        assert torch.equal(m2(x), m3(x, layer=4))
    assert not any(p.requires_grad for p in m3.exit_heads.parameters())
    infos = {path: json.loads((d / path / "threshold.json").read_text()) for path in ("hard_examples", "block3")}
    for path, model, layer, below in (("hard_examples", m1, 2, []), ("block3", m2, 4, [infos["hard_examples"]])):
        info = infos[path]
        conf = gather_confidences(model, loaders.validation, "cpu", exit_layer=layer,  # tokens that reach it
                                  thresholds=[b["threshold"] for b in below])
        assert info["exit_layer"] == layer and info["num_tokens"] == conf.numel()
        assert info["threshold"] == exact_quantile(conf, info["target_ratio"])
        assert float((conf < info["threshold"]).double().mean()) == pytest.approx(info["target_ratio"], abs=0.01)
    assert json.loads((d / "block3/threshold.json").read_text())["target_ratio"] == 0.4
    # the routed model on validation: each exit's calibrated share of the tokens reaching it continues
    thresholds = [infos["hard_examples"]["threshold"], infos["block3"]["threshold"]]
    tc = TrainingConfig(stages=[StageConfig((6, 6))], exit_layers=[2, 4], routing_thresholds=thresholds)
    ex = evaluate(tc, m3, loaders.validation, "cpu", progress=False)["exits"]
    assert ex[0]["share"] == pytest.approx(0.5, abs=0.01)
    assert ex[1]["share"] / (1 - ex[0]["share"]) == pytest.approx(0.6, abs=0.01)


def test_the_cache_trains_block1_once_across_a_blocks_sweep(sweep):
    hits = {name: json.loads((d / "phase1/cache.json").read_text())["hit"] for name, (_, _, d) in sweep.items()}
    assert hits == {"default": False, "2-4": True, "2-4-6": True}


def test_the_cache_trains_block2_once_and_copies_it_into_each_run(sweep):
    hits = {name: json.loads((d / "phase2/cache.json").read_text()) for name, (_, _, d) in sweep.items()}
    assert {name: h["hit"] for name, h in hits.items()} == {"default": False, "2-4": True, "2-4-6": True}
    assert len({h["key"] for h in hits.values()}) == 1 and hits["2-4-6"]["key_source"]["blocks"] == [2, 4]
    d24, d246 = sweep["2-4"][2], sweep["2-4-6"][2]
    for f in ("model.pt", "history.jsonl", "result.json"):
        assert (d24 / "phase2" / f).read_bytes() == (d246 / "phase2" / f).read_bytes(), f
    block3 = json.loads((d246 / "block3/cache.json").read_text())
    assert not block3["hit"] and block3["key_source"]["exit_ratios"] == [0.5, 0.4]
    entry = Path(block3["entry"])
    for f in ("threshold.json", "model.pt", "history.jsonl", "result.json"):
        assert (entry / f).read_bytes() == (d246 / "block3" / f).read_bytes(), f


def test_cascaded_routing_and_compute_cost_match_a_hand_computation(make_tiny_model, token_batches):
    model = make_tiny_model(num_layers=3, exit_layers=[1, 2], routing_thresholds=[0.0, 0.0], deep_head=True)
    with torch.no_grad():
        model.exit_heads[0].proj.weight.mul_(3.0)  # three distinct heads
        model.deep_head.proj.weight.mul_(2.0)
        rows = []
        for x, y in token_batches:
            v = y != -100
            logp = [torch.log_softmax(model(x, layer=l).float(), -1) for l in (1, 2, 3)]
            conf = [lp.exp().max(-1).values[v] for lp in logp]
            nll = [-lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[v] for lp in logp]
            ok = [(lp.argmax(-1) == y)[v] for lp in logp]
            rows.append((conf, nll, ok))
    all_conf = [torch.cat([r[0][i] for r in rows]) for i in range(2)]
    t1, t2 = float(all_conf[0].quantile(0.6)), float(all_conf[1].quantile(0.5))
    tc = TrainingConfig(stages=[StageConfig((3, 3))], exit_layers=[1, 2], routing_thresholds=[t1, t2])
    got = evaluate(tc, model, token_batches, "cpu", progress=False)
    n = nll_sum = correct = layers = 0
    counts = [0, 0, 0]
    for conf, nll, ok in rows:
        for j in range(conf[0].numel()):
            k = 0 if conf[0][j] >= t1 else 1 if conf[1][j] >= t2 else 2  # the first exit that is confident
            counts[k] += 1
            nll_sum += float(nll[k][j])
            correct += int(ok[k][j])
            layers += k + 1
            n += 1
    assert min(counts) > 0
    assert [e["n_tokens"] for e in got["exits"]] == counts
    assert got["ppl"] == pytest.approx(math.exp(nll_sum / n), rel=1e-5)
    assert got["acc"] == correct / n
    assert got["compute_cost"] == pytest.approx(layers / (n * 3))
    assert got["shallow_ratio"] == (counts[0] + counts[1]) / n
    # realized MACs under full: every layer for every token, each later head for the tokens reaching it
    shape = dict(dim=16, ffn_mult=4, ffn="gelu", vocab_size=16, seq_len=8)
    one = routed_macs(exit_layer=1, num_layers=3, shallow_ratio=0.5, policy="full", **shape)
    casc = routed_macs(exit_layer=1, num_layers=3, shallow_ratio=0.75, policy="full", exit_layers=[1, 2],
                       exit_shares=[0.5, 0.25], **shape)
    assert casc["macs_per_token"] == pytest.approx(one["macs_per_token"] + 0.25 * 16 * 16)


def test_grow_twice_freezes_every_exit_and_checkpoints_round_trip(make_tiny_model, tmp_path):
    m1 = make_tiny_model(num_layers=2)
    m2 = grow(m1, 4)
    m3 = grow(m2, 6)
    assert (m3.exit_layers, m3.exit_layer, m3.args.exits) == ([2, 4], 2, (2, 4))
    assert torch.equal(m3.exit_heads[0].proj.weight, m2.deep_head.proj.weight)
    assert torch.equal(m3.deep_head.proj.weight, m2.deep_head.proj.weight)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers") else "")
                 for n, p in m3.named_parameters() if p.requires_grad}
    assert trainable == {"layers.4", "layers.5", "deep_head"}
    cfg = ASHEMConfig()
    save_model(tmp_path / "m.pt", m3, cfg, stage="block3")
    back = load_model(tmp_path / "m.pt", model_args(m3), "cpu", "block3")
    assert model_args(back) == model_args(m3)
    x = torch.randint(0, 16, (2, 8))
    with torch.no_grad():
        assert all(torch.equal(back(x, layer=l), m3(x, layer=l)) for l in (2, 4, 6))
    assert {n for n, p in back.named_parameters() if p.requires_grad} == \
           {n for n, p in m3.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("overrides, key", [
    ({"blocks": [2, 2, 6]}, "blocks"),
    ({"blocks": [4, 2]}, "blocks"),
    ({"blocks": [2]}, "blocks"),
    ({"blocks": [2, 4, 6], "hard_example_ratios": [0.5, 0.5, 0.5]}, "hard_example_ratios"),
    ({"blocks": [2, 4, 6], "hard_example_ratios": [0.5, 1.5]}, "hard_example_ratios"),
    ({"hard_example_ratios": [0.0]}, "hard_example_ratios"),
    ({"blocks": [2, 4, 6], "phase2.lower": "finetune", "phase2.loss_tokens": "all"}, "phase2.lower"),
    ({"blocks": [2, 4, 6], "hard_examples.store": "recompute", "phase2.upper_context": "skip"},
     "hard_examples.store"),
])
def test_bad_blocks_input_is_one_config_error_naming_the_key(overrides, key):
    cfg = ASHEMConfig()
    for k, v in overrides.items():
        *group, name = k.split(".")
        setattr(getattr(cfg, group[0]) if group else cfg, name, v)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_blocks_set_phase_depths_and_ratios():
    """`resolve` turns blocks into the values every stage reads, once; `validate` checks and changes nothing."""
    from lego.config import resolve

    cfg = ASHEMConfig(blocks=[3, 5, 8], hard_example_ratios=[0.3])
    validate(cfg)
    assert (cfg.phase1.layers, cfg.phase2.layers, cfg.hard_example_ratio) == (2, 4, 0.5)  # untouched
    r = resolve(cfg)
    assert (r.phase1.layers, r.phase2.layers, r.hard_example_ratio) == (3, 8, 0.3)
    assert resolve(r) == r


@pytest.mark.parametrize("blocks, depths", [("[1,2,3]", [1, 2, 3]), ("[2,4,6]", [2, 4, 6]), ("[2,4]", [2, 4])])
def test_the_default_preset_runs_any_blocks_with_every_boundary_on_the_frontier(blocks, depths):
    """`lego-run 'blocks=[1,2,3]'` with the default preset: no key the user never typed refuses it, and the dense
    frontier is every Block boundary of the resolved blocks."""
    from conftest import compose_config

    from lego.cli import to_config
    from lego.config import resolve
    from lego.pipeline.compute import dense_depths

    cfg = resolve(to_config(compose_config([f"blocks={blocks}"])))
    validate(cfg)
    assert dense_depths(cfg) == depths and (cfg.phase1.layers, cfg.phase2.layers) == (depths[0], depths[-1])


def test_the_cli_refuses_bad_blocks_in_one_line(tmp_path):
    res = lego_run([*TINY, "blocks=[4,2]", f"hydra.run.dir={tmp_path}/r", f"data.cache_dir={tmp_path}/c"],
                   cwd=Path(__file__).parent.parent)
    assert res.returncode == 2
    lines = [l for l in res.stderr.splitlines() if "blocks" in l]
    assert len(lines) == 1 and "strictly increasing" in lines[0], res.stderr[-2000:]


# -- the one-pass analysis of a cascade (lego.analysis, lego.cascade) ----------------------------------------
@pytest.fixture
def cascade(make_tiny_model, make_token_batches):
    """A tiny 3-exit model (exits at layers 1, 2; distinct heads), test and validation batches, and thresholds
    calibrated on validation (60% then 50% of the tokens reaching each exit continue)."""
    model = make_tiny_model(num_layers=3, exit_layers=[1, 2], routing_thresholds=[0.0, 0.0], deep_head=True)
    with torch.no_grad():
        model.exit_heads[0].proj.weight.mul_(3.0)
        model.deep_head.proj.weight.mul_(2.0)
    test, val = make_token_batches(seed=0), make_token_batches(seed=1)
    conf = token_outputs(model, val, "cpu", exit_layer=[1, 2], measures=("max_prob",))["conf_at_max_prob"]
    t1 = exact_quantile(conf[:, 0], 0.6)
    t2 = exact_quantile(conf[:, 1][conf[:, 0] < t1], 0.5)
    return model, test, val, [t1, t2]


def test_one_pass_cascade_routing_equals_evaluate(cascade):
    model, test, _, thresholds = cascade
    tok = token_outputs(model, test, "cpu", exit_layer=[1, 2])
    tc = TrainingConfig(stages=[StageConfig((3, 3))], exit_layers=[1, 2], routing_thresholds=thresholds,
                        upper_context="full")
    want = evaluate(tc, model, test, "cpu", progress=False)
    got = routed_from_tokens(tok, thresholds, measure="max_prob", exit_layer=[1, 2], num_layers=3)
    assert set(got) == set(want) and min(e["n_tokens"] for e in got["exits"]) > 0
    for key in ("acc", "ppl", "loss", "shallow_ratio", "compute_cost", "exit_acc", "exit_ppl", "hard_deep_ppl",
                "threshold", "n_tokens", "exit_layers", "thresholds"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    for g, w in zip(got["exits"], want["exits"]):
        assert (g["layer"], g["n_tokens"], g["threshold"]) == (w["layer"], w["n_tokens"], w["threshold"])
        assert (g["acc"], g["ppl"]) == pytest.approx((w["acc"], w["ppl"]), rel=1e-6)


def test_cascade_oracle_keeps_the_deepest_exits_accuracy(cascade):
    model, test, _, _ = cascade
    tok = token_outputs(model, test, "cpu", exit_layer=[1, 2])
    oracle = oracle_router(tok, exit_layer=[1, 2], num_layers=3)
    deepest = evaluate(TrainingConfig(stages=[StageConfig((3, 3))]), model, test, "cpu", progress=False)
    assert oracle["acc"] == deepest["acc"]
    stop = [0 if p[0] == p[2] else 1 if p[1] == p[2] else 2 for p in tok["pred_at"].tolist()]  # by hand
    assert [e["n_tokens"] for e in oracle["exits"]] == [stop.count(j) for j in range(3)]
    assert oracle["compute_cost"] == pytest.approx(sum(j + 1 for j in stop) / (3 * len(stop)))


def test_cascade_grid_thresholds_are_the_validation_shares(cascade):
    model, test, val, thresholds = cascade
    tok, choose = (token_outputs(model, b, "cpu", exit_layer=[1, 2]) for b in (test, val))
    rows = tradeoff_curve(tok, measure="max_prob", exit_layer=[1, 2], num_layers=3, calibrated_threshold=thresholds,
                          choose=choose, step=0.25)
    assert [r["kind"] for r in rows] == ["grid"] * 5 + ["calibrated"]
    conf = choose["conf_at_max_prob"]
    for row in rows[1:4]:
        s = row["target_share"]
        reach = torch.ones(len(conf), dtype=torch.bool)
        for j, layer in enumerate((1, 2)):  # share s of the validation tokens reaching each exit stop there
            assert row[f"threshold_{layer}"] == exact_quantile(conf[:, j][reach], 1 - s)
            stop = (conf[:, j] >= row[f"threshold_{layer}"]) & reach
            assert float(stop.sum() / reach.sum()) == pytest.approx(s, abs=0.1)  # ties among few tokens
            reach &= ~stop
    own = tradeoff_curve(tok, measure="max_prob", exit_layer=[1, 2], num_layers=3, calibrated_threshold=thresholds,
                         step=0.25)  # chosen on the split it reports: share 0 is full depth, share 1 the first exit
    assert (own[0]["compute_cost"], own[4]["compute_cost"]) == (1.0, 1 / 3)
    assert [rows[-1][f"threshold_{e}"] for e in (1, 2)] == thresholds
    routed = routed_from_tokens(tok, thresholds, measure="max_prob", exit_layer=[1, 2], num_layers=3)
    assert rows[-1]["ppl"] == routed["ppl"] and rows[-1]["share_3"] == routed["exits"][2]["share"]
