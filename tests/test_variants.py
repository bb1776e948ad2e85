"""The LEGO variants, one config key each (phase2.init, loss_tokens, lower, phase1.budget_fraction):
what each changes, that the defaults stay the specification, and one tiny run per non-default key."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from lego.ashem import _upper_loss, collect_hard_examples, compute_confidence_threshold, grow, train_upper_layers
from lego.checkpoint import load_model
from lego.confidence import IGNORE_INDEX
from lego.config import ASHEMConfig, ConfigError, validate
from lego.run import run
from lego.stages.phase1 import phase1_steps
from lego.pipeline.science import science_config
from lego.store import create_hard_example_loader

NEW_KEYS = {"phase1": ("budget_fraction", "scaffold"), "phase2": ("init", "loss_tokens", "easy_weight", "lower",
                                                       "exit_loss_weight")}


# -- every key: validated, and out of the science config at its default -------------------------------
@pytest.mark.parametrize("key, value, fragment", [
    ("phase2.init", "zeros", "phase2.init='zeros' is not allowed; choose one of random, copy"),
    ("phase2.loss_tokens", "easy", "phase2.loss_tokens='easy' is not allowed; choose one of hard, all, weighted"),
    ("phase2.easy_weight", -0.5, "phase2.easy_weight=-0.5 must be a number >= 0"),
    ("phase2.lower", "thaw", "phase2.lower='thaw' is not allowed; choose one of frozen, finetune"),
    ("phase2.exit_loss_weight", -1.0, "phase2.exit_loss_weight=-1.0 must be a number >= 0"),
    ("phase1.budget_fraction", 1.0, "phase1.budget_fraction=1.0 must be strictly between 0 and 1"),
])
def test_each_key_is_checked_with_one_line(key, value, fragment):
    cfg = ASHEMConfig()
    group, name = key.split(".")
    setattr(getattr(cfg, group), name, value)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_combinations_that_cannot_run_are_refused():
    cfg = ASHEMConfig()
    cfg.phase2.loss_tokens, cfg.phase2.upper_context = "all", "propagate"
    with pytest.raises(ConfigError, match="phase2.loss_tokens=all .* upper_context=full"):
        validate(cfg)
    cfg = ASHEMConfig()
    cfg.phase2.lower = "finetune"  # loss_tokens stays hard
    with pytest.raises(ConfigError, match="phase2.lower=finetune .* allowed: all"):
        validate(cfg)
    cfg.phase2.loss_tokens = "all"
    validate(cfg)


def test_defaults_leave_the_science_config_and_others_enter_it():
    d = science_config(ASHEMConfig())
    for group, keys in NEW_KEYS.items():
        assert not set(keys) & set(d[group]), group  # run dirs and cache keys of older runs stay valid
    cfg = ASHEMConfig()
    cfg.phase1.budget_fraction = 0.5
    cfg.phase2.init, cfg.phase2.loss_tokens, cfg.phase2.easy_weight = "copy", "weighted", 0.2
    cfg.phase2.lower, cfg.phase2.exit_loss_weight = "finetune", 0.5
    d = science_config(cfg)
    assert d["phase1"]["budget_fraction"] == 0.5
    assert {k: d["phase2"][k] for k in NEW_KEYS["phase2"]} == {
        "init": "copy", "loss_tokens": "weighted", "easy_weight": 0.2, "lower": "finetune", "exit_loss_weight": 0.5}
    cfg.phase2.loss_tokens = "all"  # easy_weight no longer matters
    assert "easy_weight" not in science_config(cfg)["phase2"]


def test_shipped_yaml_holds_every_key():
    from conftest import compose_config
    composed = compose_config()
    for group, keys in NEW_KEYS.items():
        for key in keys:
            assert key in composed[group], f"{group}.{key}"


# -- phase2.init ----------------------------------------------------------------------------------
def test_grow_copy_stacks_the_lower_layers_in_order(make_tiny_model):
    small = make_tiny_model(2)
    for depth in (4, 5):
        torch.manual_seed(3)
        big = grow(small, depth, init="copy")
        after_copy = torch.rand(3)
        for i in range(2, depth):  # layer i + 1 := layer (i mod 2) + 1
            src = small.layers[i % 2].state_dict()
            for k, v in big.layers[i].state_dict().items():
                assert torch.equal(v, src[k]), (depth, i, k)
            assert all(p.requires_grad for p in big.layers[i].parameters())  # copies train
        torch.manual_seed(3)
        default = grow(small, depth)
        assert torch.equal(torch.rand(3), after_copy)  # both draw the same random numbers
        torch.manual_seed(3)
        random = grow(small, depth, init="random")
        for a, b in zip(default.state_dict().values(), random.state_dict().values()):
            assert torch.equal(a, b)  # random is today's grow, bit for bit
    with pytest.raises(ConfigError, match="init='tile'"):
        grow(small, 4, init="tile")


# -- phase2.loss_tokens -----------------------------------------------------------------------------
@pytest.fixture
def mined(make_tiny_model, make_token_batches, perturb):
    small = make_tiny_model(2)
    batches = make_token_batches(n_batches=4)
    t = compute_confidence_threshold(small, batches, 0.5)
    big = grow(small, 4)
    perturb([p for p in big.parameters() if p.requires_grad], seed=1)  # the deep exit says something
    hard = collect_hard_examples(small, batches, t, keep_easy=True)
    return small, big, batches, t, hard


def test_keep_easy_adds_all_targets_and_changes_nothing_else(mined):
    small, _, batches, t, hard = mined
    plain = collect_hard_examples(small, batches, t)
    assert "all_targets" not in plain
    for k, v in plain.items():
        assert torch.equal(v, hard[k]) if torch.is_tensor(v) else v == hard[k], k
    keep = torch.tensor([(tg != IGNORE_INDEX).any() for tg in plain["targets"]])
    assert keep.all()  # every mined row holds a hard token
    hard_pos = hard["targets"] != IGNORE_INDEX
    assert torch.equal(hard["all_targets"][hard_pos], hard["targets"][hard_pos])
    assert ((hard["all_targets"] != IGNORE_INDEX) & ~hard_pos).any()  # easy targets are kept


def _deep_ce(big, hard):
    """Hand-computed per-position cross-entropy at the last layer of every mined sequence (N, T)."""
    with torch.no_grad():
        logits = big(hard["inputs"]).float()  # (N, T, V): every token through every layer
    t = hard["all_targets"]
    ce = F.cross_entropy(logits.transpose(1, 2), t.clamp(min=0), reduction="none")
    return ce, t != IGNORE_INDEX, hard["targets"] != IGNORE_INDEX


def test_loss_all_is_the_mean_over_every_position_and_hard_over_hard_ones(mined):
    _, big, _, _, hard = mined
    ce, valid, is_hard = _deep_ce(big, hard)
    x = hard["hidden_states"]
    both = torch.stack((hard["targets"], hard["all_targets"]), 1)
    with torch.no_grad():
        loss, n = _upper_loss(big, x, both, 2, IGNORE_INDEX, "full", 1.0)
        assert int(n) == int(valid.sum())
        torch.testing.assert_close(loss / n, ce[valid].mean())
        loss_h, n_h = _upper_loss(big, x, hard["targets"], 2, IGNORE_INDEX, "full")  # the specification
        assert n_h == int(is_hard.sum()) < int(valid.sum())
        torch.testing.assert_close(loss_h / n_h, ce[is_hard].mean())
        w = torch.where(is_hard, 1.0, 0.25)[valid]
        loss_w, n_w = _upper_loss(big, x, both, 2, IGNORE_INDEX, "full", 0.25)
        torch.testing.assert_close(loss_w / n_w, (w * ce[valid]).sum() / w.sum())
    with pytest.raises(ValueError, match="keep_easy"):
        _upper_loss(big, x, hard["targets"], 2, IGNORE_INDEX, "full", 1.0)
    with pytest.raises(ValueError, match="upper_context=skip"):
        _upper_loss(big, x, both, 2, IGNORE_INDEX, "skip", 1.0)


def test_weighted_with_zero_easy_weight_trains_like_hard(mined):
    small, _, batches, t, hard = mined
    plain = collect_hard_examples(small, batches, t)
    trained = []
    for data, easy_weight in ((plain, None), (hard, 0.0)):
        torch.manual_seed(5)
        big = grow(small, 4)
        opt = torch.optim.SGD([p for p in big.parameters() if p.requires_grad], lr=0.5)
        loader = create_hard_example_loader(data, batch_size=3, shuffle=True, seed=1)
        loss = train_upper_layers(big, loader, opt, None, "cpu", 2, epoch=1, easy_weight=easy_weight)
        trained.append((loss, [p.detach().clone() for p in big.parameters()]))
    assert trained[0][0] == pytest.approx(trained[1][0], rel=1e-5)
    for a, b in zip(trained[0][1], trained[1][1]):
        torch.testing.assert_close(a, b)


# -- phase1.budget_fraction ------------------------------------------------------------------------
def test_budget_fraction_splits_one_budget_between_the_phases():
    cfg = ASHEMConfig()
    cfg.phase1.max_epochs, cfg.phase1.epoch_steps = 6, 4
    loaders = SimpleNamespace(train=list(range(10)))  # 10 batches: epochs of epoch_steps=4 steps, 24 steps in all
    assert phase1_steps(cfg, loaders) == 24  # the specification: phase 1 its own whole budget
    for fraction, steps in ((0.5, 12), (0.25, 6), (0.05, 1), (0.9, 22), (0.02, 1)):  # halves round up, >= 1
        cfg.phase1.budget_fraction = fraction
        assert phase1_steps(cfg, loaders) == steps


# -- tiny runs, one per non-default key ------------------------------------------------------------
def _run(tmp_path, **overrides):
    cfg = tiny_config(tmp_path / "cache", **{"eval.standard_baseline": False, "eval.analysis": False,
                                             "num_threads": 1, **overrides})
    summary = run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").exists() and summary["ppl"] > 0
    return cfg, summary, tmp_path / "run"


def _history(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{"phase2.init": "copy"}, {"phase2.loss_tokens": "all"},
                                       {"phase2.loss_tokens": "weighted", "phase2.easy_weight": 0.3}],
                         ids=["init-copy", "loss-all", "loss-weighted"])
def test_tiny_run_per_variant(tmp_path, overrides):
    _, _, d = _run(tmp_path, **overrides)
    run_json = json.loads((d / "run.json").read_text())["science_config"]["phase2"]
    for key, value in overrides.items():
        assert run_json[key.split(".")[1]] == value
    result = json.loads((d / "phase2/result.json").read_text())
    assert "block1_finetuned" not in result
    if overrides.get("phase2.loss_tokens") in ("all", "weighted"):
        assert result["counted"] > 0


@pytest.mark.slow
def test_tiny_run_finetune_trains_block1_and_recalibrates(tmp_path):
    cfg, summary, d = _run(tmp_path, **{"phase2.lower": "finetune", "phase2.loss_tokens": "all",
                                        "phase2.exit_loss_weight": 0.5})
    model1 = torch.load(d / "phase1/model.pt", weights_only=True)["state_dict"]
    ck = torch.load(d / "phase2/model.pt", weights_only=True)
    assert not torch.equal(ck["state_dict"]["layers.0.qkv.weight"], model1["layers.0.qkv.weight"])
    assert not torch.equal(ck["state_dict"]["output_head.proj.weight"], model1["output_head.proj.weight"])
    result = json.loads((d / "phase2/result.json").read_text())
    assert result["block1_finetuned"] is True
    new = json.loads((d / "phase2/threshold.json").read_text())
    old = json.loads((d / "hard_examples/threshold.json").read_text())
    assert new["threshold"] != old["threshold"]
    assert summary["threshold"] == new["threshold"] == ck["meta"]["threshold"]
    # the recalibrated threshold meets the asked ratio on validation: an exact quantile, up to ties
    from lego.ashem import gather_confidences
    from lego.data import load_corpus
    from lego.pipeline.setup import make_loaders
    model2 = load_model(d / "phase2/model.pt", ck["model_args"], "cpu", "test")
    loaders = make_loaders(cfg, load_corpus(cfg.data))
    conf = gather_confidences(model2, loaders.validation, "cpu")
    below = float((conf < new["threshold"]).double().mean())
    assert abs(below - cfg.hard_example_ratio) <= 1 / conf.numel() + float((conf == new["threshold"]).double().mean())
    assert new["num_tokens"] == conf.numel()


@pytest.mark.slow
def test_tiny_run_budget_fraction_follows_the_rule(tmp_path):
    """phase1.budget_fraction: phase 1 trains its share of the pipeline's budget (12 x 8 phase-1 steps of MACs),
    mining costs what it runs, phase 2 trains the rest to the step; the pipeline ends within one phase-2 step of
    the budget."""
    cfg, _, d = _run(tmp_path, **{"phase1.budget_fraction": 0.34, "phase1.max_epochs": 12, "phase1.patience": None,
                                  "phase2.patience": None})
    p1 = json.loads((d / "phase1/result.json").read_text())
    assert p1["steps"] == p1["budget_steps"] == round(0.34 * 12 * 8) == 33  # 4 validations of 8 steps, then 1
    p2 = json.loads((d / "phase2/result.json").read_text())
    ev = json.loads((d / "eval/metrics.json").read_text())
    step1 = p1["train_macs"] / p1["steps"]
    assert p2["budget_macs"] == pytest.approx(12 * 8 * step1)
    mining = ev["train_compute"]["mining"]["train_macs"]
    assert 0 < mining < p2["budget_macs"] - p1["train_macs"]
    assert p2["rest_macs"] == pytest.approx(p2["budget_macs"] - p1["train_macs"] - mining)
    assert p2["steps"] == p2["budget_steps"] == round(p2["rest_macs"] / p2["step_macs"])
    total = ev["train_compute"]["total"]["train_macs"]
    assert abs(total - p2["budget_macs"]) <= p2["step_macs"]
    assert p2["steps"] != cfg.phase2.max_epochs * cfg.phase2.epoch_steps  # the rule, not phase 2's own budget


@pytest.mark.parametrize("experiment", ["matched", "lego_study"])
@pytest.mark.parametrize("variant", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "lego/conf/variant").glob("*.yaml")))
def test_every_study_variant_composes_and_validates(variant, experiment):
    from conftest import compose_config

    from lego.cli import to_config
    from lego.config import validate

    cfg = to_config(compose_config([f"+variant={variant}", f"experiment={experiment}"]))
    validate(cfg)
    if experiment == "lego_study":  # the study's setting, under each variant
        assert (cfg.model.dim, cfg.data.tokenizer, cfg.data.max_train_tokens, cfg.hard_example_ratio) == (64, "bytes", None, 0.25)
        assert cfg.eval.dense_depths is None and cfg.phase1.patience is None and cfg.phase2.schedule == "cosine"
        # the variants that score easy positions at the deep exit need their states there: no savings
        assert cfg.phase2.upper_context == ("full" if cfg.phase2.loss_tokens != "hard" else "propagate")


def test_lr_sweep_preset_is_copy_lr_at_its_middle_rate():
    """experiment=lego_study_lr at phase2.lr=1e-3 composes to +variant=copy_lr's science (so the stage cache
    shares those jobs between the two presets)."""
    from conftest import compose_config

    from lego.cli import to_config
    from lego.config import to_dict

    sweep = to_dict(to_config(compose_config(["experiment=lego_study_lr", "phase2.lr=1e-3"])))
    study = to_dict(to_config(compose_config(["experiment=lego_study", "+variant=copy_lr"])))
    assert sweep == study and sweep["phase2"]["init"] == "copy" and sweep["phase2"]["lr"] == 0.001
