"""Exit heads (model.exit_head: separate | tied | lowrank): Block 1 stays bit-identical, checkpoints
round-trip, the cost counts the factored head, bad settings fail in one line.

    python -m pytest tests/test_heads.py -q
"""

import math
from pathlib import Path

import pytest
import torch
from conftest import DIM, TINY, compose_config, lego_run
from test_ashem import params_of, phase2_step, stack

from lego.artifacts import save_checkpoint
from lego.ashem import collect_hard_examples, compute_confidence_threshold, grow
from lego.checkpoint import build_model, load_model, model_args, save_model
from lego.cli import to_config
from lego.config import ASHEMConfig, ConfigError, validate
from lego.cost import forward_macs_per_token, head_macs, routed_macs
from lego.heads import LowRankHead

HEADS = [("tied", None), ("lowrank", 4)]


@pytest.mark.parametrize("deep_head", [True, False])
@pytest.mark.parametrize("exit_head,exit_rank", HEADS)
def test_phase2_keeps_block1_bit_identical(make_tiny_model, token_batches, exit_head, exit_rank, deep_head):
    small = make_tiny_model(num_layers=2, exit_head=exit_head, exit_rank=exit_rank)
    t = compute_confidence_threshold(small, token_batches, 0.5)
    hard = collect_hard_examples(small, token_batches, t)
    torch.manual_seed(1)
    big = grow(small, 4, deep_head=deep_head)
    frozen = params_of(big.embedding, big.output_head, *big.layers[:2])
    trained = [big.deep_head] if deep_head else []
    before = params_of(*big.layers[2:], *trained)
    deep_before = big(stack(token_batches)[0]).detach()
    losses = phase2_step(big, hard, steps=3)
    assert all(math.isfinite(v) for v in losses)
    x, _ = stack(token_batches)
    with torch.no_grad():
        assert torch.equal(big(x, layer=2), small(x))
        assert not torch.equal(big(x), deep_before)  # phase 2 did train something
    assert all(torch.equal(a, b) for a, b in zip(frozen, params_of(big.embedding, big.output_head, *big.layers[:2])))
    moved = params_of(*big.layers[2:], *trained)
    assert sum(not torch.equal(a, b) for a, b in zip(before, moved)) >= len(before) - 1
    if exit_head == "tied" and deep_head:  # one projection, frozen; the deep exit trains its own norm
        assert big.deep_head.proj is big.output_head.proj and not big.output_head.proj.weight.requires_grad
        assert big.deep_head.norm.weight.requires_grad
    if exit_head == "lowrank":
        assert isinstance(big.output_head, LowRankHead) and big.output_head.down.weight.shape == (exit_rank, DIM)
    assert torch.equal(collect_hard_examples(big, token_batches, t)["targets"], hard["targets"])


@pytest.mark.parametrize("exit_head,exit_rank", HEADS)
def test_heads_round_trip_through_checkpoints(make_tiny_model, perturb, tmp_path, exit_head, exit_rank):
    big = grow(make_tiny_model(num_layers=2, exit_head=exit_head, exit_rank=exit_rank), 4)
    perturb(list(big.layers[2:].parameters()) + list(big.deep_head.norm.parameters()), seed=2)
    path = tmp_path / "model.pt"
    save_model(path, big, ASHEMConfig(), stage="phase2")
    back = load_model(path, model_args(big), "cpu", "test checkpoint").eval()
    x = torch.randint(0, 16, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(x), big(x)) and torch.equal(back(x, layer=2), big(x, layer=2))
    assert (back.config.exit_head, back.config.exit_rank) == (exit_head, exit_rank)
    if exit_head == "tied":
        assert back.deep_head.proj is back.output_head.proj and not back.output_head.proj.weight.requires_grad
    # a checkpoint of another head refuses to load
    with pytest.raises(Exception, match="exit_head"):
        load_model(path, dict(model_args(big), exit_head="separate", exit_rank=None), "cpu", "test checkpoint")


def test_checkpoints_written_before_model_args_still_load(make_tiny_model, perturb, tmp_path):
    """Model files and cache entries written with the constructor's keywords (exit_layer, routing_threshold,
    upper_context, confidence; no exit_head or precision) load as the same model."""
    big = grow(make_tiny_model(num_layers=2), 4)
    perturb(list(big.layers[2:].parameters()), seed=2)
    path = tmp_path / "old.pt"
    old = {k: v for k, v in model_args(big).items() if k not in ("exits", "exit_head", "exit_rank", "precision")}
    old.update(exit_layer=2, routing_threshold=0.3, upper_context="skip", confidence="margin")
    save_checkpoint(path, {"model_args": old, "state_dict": big.state_dict(), "config": {}, "meta": {}})
    back = load_model(path, model_args(big), "cpu", "old checkpoint").eval()
    assert back.args == big.args
    x = torch.randint(0, 16, (2, 8))
    with torch.no_grad():
        assert torch.equal(back(x), big(x))


def test_build_model_and_cost_follow_the_config():
    cfg = to_config(compose_config(["model=deep", "model.exit_head=lowrank", "model.exit_rank=64"]))
    validate(cfg)
    model = build_model(cfg, 2048, 2)
    assert isinstance(model.output_head, LowRankHead) and model.output_head.up.weight.shape == (2048, 64)
    assert head_macs(384, 2048, 64) == 64 * (384 + 2048) == model.output_head.down.weight.numel() + \
        model.output_head.up.weight.numel()
    shape = dict(dim=384, ffn_mult=4, ffn="gelu", vocab_size=2048, seq_len=128)
    full = forward_macs_per_token(num_layers=8, **shape)
    low = forward_macs_per_token(num_layers=8, exit_rank=64, **shape)
    assert full - low == 384 * 2048 - 64 * (384 + 2048)
    # c: Block 1 and its head over a dense step; the target is <= 0.3 at 2 of 8 layers
    c_low = forward_macs_per_token(num_layers=2, exit_rank=64, **shape) / low
    c_full = forward_macs_per_token(num_layers=2, **shape) / full
    assert c_low < c_full <= 0.3
    r = routed_macs(exit_layer=2, num_layers=8, shallow_ratio=1.0, policy="skip", exit_rank=64, **shape)
    assert r["flop_cost"] == pytest.approx(c_low)


@pytest.mark.parametrize("overrides,key", [
    (["model.exit_head=lowrank", "model.exit_rank=0"], "model.exit_rank"),
    (["model.exit_head=lowrank", "model.exit_rank=129"], "model.exit_rank"),
    (["model.exit_head=lowrank"], "model.exit_rank"),
    (["model.exit_head=tied", "model.exit_rank=64"], "model.exit_rank"),
    (["model.exit_head=shared"], "model.exit_head"),
])
def test_bad_exit_heads_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(to_config(compose_config(overrides)))
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_the_cli_refuses_a_bad_rank_in_one_line(tmp_path):
    res = lego_run([*TINY, "model.exit_head=lowrank", "model.exit_rank=17", f"hydra.run.dir={tmp_path}/r",
                    f"data.cache_dir={tmp_path}/c"], cwd=Path(__file__).parent.parent)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if "exit_rank" in line]
    assert len(lines) == 1 and "[1, model.dim=16]" in lines[0], res.stderr[-2000:]


@pytest.mark.parametrize("exit_head,exit_rank", HEADS)
def test_a_run_with_a_cheap_exit_head_keeps_block1(tmp_path, exit_head, exit_rank):
    """debug=tiny end to end: the phase-2 checkpoint's exit predicts as the phase-1 model does, bit for bit."""
    from conftest import tiny_config

    from lego.run import run

    cfg = tiny_config(tmp_path / "cache", **{"model.exit_head": exit_head, "model.exit_rank": exit_rank,
                                             "eval.standard_baseline": False, "generate.adaptive": True})
    run(cfg, tmp_path / "run")
    small, big = (_load(tmp_path / f"run/{stage}/model.pt") for stage in ("phase1", "phase2"))
    assert small.args.exit_head == big.args.exit_head == exit_head
    x = torch.randint(0, small.vocab_size, (4, cfg.data.seq_len))
    with torch.no_grad():
        assert torch.equal(big.eval()(x, layer=cfg.phase1.layers), small.eval()(x))


def _load(path: Path):
    return load_model(path, torch.load(path, weights_only=True)["model_args"], "cpu", str(path))
