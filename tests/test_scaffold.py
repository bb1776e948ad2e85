"""phase1.scaffold (lego.pipeline.scaffold): Block 1 trained inside the full depth, its exit head beside it on a
detached state; phase 2 starts from the scaffold."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from lego.artifacts import load_checkpoint
from lego.ashem import grow
from lego.checkpoint import stored_args
from lego.config import ASHEMConfig, ConfigError, validate
from lego.model import Model, ModelArgs
from lego.pipeline.scaffold import lower_block, scaffold_loss_sum, start_from_scaffold
from lego.pipeline.science import science_config
from lego.run import run
from lego.training import train_epoch


def joint(seed=0):
    torch.manual_seed(seed)
    return Model(ModelArgs(vocab_size=40, dim=16, num_layers=3, num_heads=2, exits=(1,), deep_head=True))


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 40, (2, 6), generator=g), torch.randint(0, 40, (2, 6), generator=g)) for _ in range(n)]


def test_scaffold_loss_is_both_ces_and_the_layers_get_the_last_layers_gradient_alone():
    model = joint()
    x, y = batches(1)[0]
    total, n = scaffold_loss_sum(model, x, y, 1)
    exit_ce = F.cross_entropy(model(x, layer=1).flatten(0, 1), y.flatten(), reduction="sum")
    last_ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    assert int(n) == y.numel() and torch.allclose(total, exit_ce + last_ce, atol=1e-4)
    total.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").backward()
    for k, p in model.named_parameters():
        if not k.startswith("output_head."):  # every layer, the embedding, the last layer's head
            assert torch.allclose(got[k], p.grad, atol=1e-5), k
    assert all(k in got for k, _ in model.output_head.named_parameters(prefix="output_head"))


def test_a_head_clipped_apart_leaves_the_others_update_as_without_it():
    """train_epoch(apart=exit head), clipping on: the layers end where a model trained on the last layer's loss
    alone ends (its exit head never gets a gradient); clipped together they do not."""
    def trained(loss, apart):
        model = joint()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train_epoch(model, batches(), opt, loss, "cpu", grad_clip=0.05, progress=False,
                    apart=list(model.output_head.parameters()) if apart else ())
        return model.state_dict()

    def deep_only(m, x, y):
        return F.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction="sum"), (y >= 0).sum()

    def scaffold(m, x, y):
        return scaffold_loss_sum(m, x, y, 1)

    reference, apart, together = trained(deep_only, False), trained(scaffold, True), trained(scaffold, False)
    layers = [k for k in reference if not k.startswith("output_head.")]
    for k in layers:
        assert torch.allclose(apart[k], reference[k], atol=1e-6), k
    assert any(not torch.allclose(together[k], reference[k], atol=1e-6) for k in layers)
    assert not torch.allclose(apart["output_head.proj.weight"], reference["output_head.proj.weight"])


def test_lower_block_is_the_exit_and_phase2_starts_from_the_scaffold(tmp_path):
    from lego.checkpoint import save_model

    scaffold = joint(3)
    block = lower_block(scaffold, 1)
    x = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert block.num_layers == 1 and not block.exit_layers
        assert torch.equal(block(x), scaffold(x, layer=1))
    save_model(tmp_path / "scaffold.pt", scaffold, ASHEMConfig())
    torch.manual_seed(9)
    grown = start_from_scaffold(grow(block, 3, deep_head=True), tmp_path / "scaffold.pt")
    with torch.no_grad():  # the whole scaffold again, exit and last layer
        assert torch.equal(grown(x, layer=1), scaffold(x, layer=1)) and torch.equal(grown(x), scaffold(x))
    trainable = {k for k, p in grown.named_parameters() if p.requires_grad}
    assert trainable == {k for k, _ in grown.named_parameters() if k.startswith(("layers.1.", "layers.2.", "deep_head."))}
    with pytest.raises(ValueError, match="has 3 layers, the grown model 2"):
        start_from_scaffold(grow(block, 2, deep_head=True), tmp_path / "scaffold.pt")


@pytest.mark.parametrize("key, value", [("phase2.init", "copy"), ("phase2.lower", "finetune"),
                                        ("model.exit_head", "tied"), ("phase2.deep_head", False)])
def test_scaffold_refuses_what_it_cannot_run(key, value):
    cfg = ASHEMConfig()
    cfg.phase1.scaffold = True
    group, name = key.split(".")
    setattr(getattr(cfg, group), name, value)
    if value == "finetune":
        cfg.phase2.loss_tokens = "all"
    with pytest.raises(ConfigError, match=f"phase1.scaffold=true .*; {key}={value} is not allowed") as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_tiny_scaffold_run_spends_its_share_and_keeps_the_records(tmp_path):
    """A tiny run: phase 1 spends its share of the pipeline's MACs in scaffold steps (to half a step), Block 1 is
    the scaffold's exit, phase 2 gets the rest, the pipeline ends within a phase-2 step of the budget, and the dense
    models' cache key is the one a run without the scaffold uses."""
    kw = {"phase1.budget_fraction": 0.34, "phase1.max_epochs": 12, "phase1.patience": None, "phase2.patience": None,
          "eval.analysis": False, "eval.dense_depths": None, "num_threads": 1}
    cfg = tiny_config(tmp_path / "cache", **kw, **{"phase1.scaffold": True})
    run(cfg, tmp_path / "run")
    d = tmp_path / "run"
    p1 = json.loads((d / "phase1/result.json").read_text())
    assert p1["scaffold"] is True and p1["steps"] == p1["budget_steps"]
    assert p1["train_macs"] == pytest.approx(p1["steps"] * p1["step_macs"])
    assert abs(p1["train_macs"] - p1["budget_macs"]) <= p1["step_macs"] / 2 * (1 + 1e-9)
    state = load_checkpoint(d / "phase1/scaffold.pt", what="test")
    scaffold = Model(ModelArgs(**stored_args(state["model_args"])))
    scaffold.load_state_dict(state["state_dict"])
    block = load_checkpoint(d / "phase1/model.pt", what="test")
    b = Model(ModelArgs(**stored_args(block["model_args"])))
    b.load_state_dict(block["state_dict"])
    x = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(b(x), scaffold(x, layer=cfg.phase1.layers))
    assert scaffold.num_layers == cfg.phase2.layers
    p2 = json.loads((d / "phase2/result.json").read_text())
    ev = json.loads((d / "eval/metrics.json").read_text())
    assert p2["budget_macs"] == pytest.approx(p1["budget_macs"] / 0.34)
    assert p2["rest_macs"] > 0 and p2["steps"] > 1
    assert abs(ev["train_compute"]["total"]["train_macs"] - p2["budget_macs"]) <= p2["step_macs"]
    plain = tiny_config(tmp_path / "cache", **kw)
    assert science_config(cfg)["phase1"]["scaffold"] is True and "scaffold" not in science_config(plain)["phase1"]
    run(plain, tmp_path / "plain")
    for depth in (cfg.phase1.layers, cfg.phase2.layers):  # the dense frontier's key is blind to the scaffold
        a, b = (json.loads((tmp_path / r / f"dense{depth}/cache.json").read_text())["key_source"]
                for r in ("run", "plain"))
        assert abs(a.pop("steps") - b.pop("steps")) <= 1 and a == b
