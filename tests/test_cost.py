"""Training-compute accounting (lego/cost.py): hand-computed MACs for a tiny shape, the matched baseline."""

import pytest

from lego.cost import (
    dense_training_macs,
    forward_macs_per_token,
    layer_macs,
    mining_macs,
    phase2_step_macs,
    phase2_training_macs,
    routed_macs,
    steps_for_macs,
)

# dim 4, FFN 2x (gelu), vocabulary 10, sequence length 3 (average context (3 + 1) / 2 = 2).
# One layer per token: q 4*4=16, kv 2*4*4=32, attention 2*4*2=16, out 4*4=16, mlp 2*2*4*4=64 -> 144.
# Head: 4*10 = 40.
SHAPE = dict(dim=4, ffn_mult=2, ffn="gelu", vocab_size=10, seq_len=3)
LAYER, HEAD = 144, 40
B, T = 2, 3  # a step sees 6 tokens


def test_forward_macs_by_hand():
    assert forward_macs_per_token(**SHAPE, num_layers=2) == 2 * 144 + 40 == 328
    assert forward_macs_per_token(**SHAPE, num_layers=4) == 4 * 144 + 40 == 616
    assert forward_macs_per_token(**SHAPE, num_layers=2, heads=0) == 288
    assert forward_macs_per_token(**SHAPE, num_layers=4, heads=2) == 4 * 144 + 2 * 40 == 656
    # the same count routed_macs and phase2_step_macs use for the full model
    assert routed_macs(**SHAPE, exit_layer=2, num_layers=4, shallow_ratio=0.5,
                       policy="full")["full_depth_macs_per_token"] == 616
    assert phase2_step_macs(**SHAPE, exit_layer=2, num_layers=4, hard_ratio=0.5,
                            policy="full")["full_step_macs_per_token"] == 3 * 616
    with pytest.raises(ValueError, match="num_layers"):
        forward_macs_per_token(**SHAPE, num_layers=-1)


def test_dense_training_and_mining_by_hand():
    assert dense_training_macs(tokens=B * T, **SHAPE, num_layers=4) == 3 * 6 * 616 == 11088
    assert mining_macs(tokens=B * T, **SHAPE, exit_layer=2) == 6 * 328 == 1968  # forward only, with exit head


def test_phase2_by_hand_and_policies():
    kw = dict(tokens=B * T, hard_ratio=0.5, **SHAPE, exit_layer=2, num_layers=4)
    # full: 2 upper layers for every token 2*144 = 288, deep head at half the positions 0.5*40 = 20;
    # trained: 3 * (288 + 20) = 924 per token, 6 tokens -> 5544
    assert phase2_training_macs(**kw, policy="full") == 6 * 3 * (288 + 20) == 5544
    # propagate: per layer 0.5*144 + 0.5*kv(32) = 88; 3 * (2*88 + 20) = 588 per token
    assert phase2_training_macs(**kw, policy="propagate") == 6 * 588
    # skip: a hard query sees context 0.5*2 = 1 (attention 2*4*1 = 8, layer 136), half the tokens:
    # per layer 68; 3 * (2*68 + 20) = 468 per token
    assert phase2_training_macs(**kw, policy="skip") == 6 * 468 == 2808
    assert phase2_training_macs(**kw, policy="full") > phase2_training_macs(**kw, policy="propagate") \
        > phase2_training_macs(**kw, policy="skip")
    for policy in ("full", "propagate", "skip"):  # recompute adds exactly the lower Block's forward, no head
        extra = phase2_training_macs(**kw, policy=policy, recompute=True) - phase2_training_macs(**kw, policy=policy)
        assert extra == B * T * forward_macs_per_token(**SHAPE, num_layers=2, heads=0) == 6 * 288


def test_steps_for_macs_rounds_to_nearest_at_least_one():
    assert steps_for_macs(14.9, 10) == 1
    assert steps_for_macs(15, 10) == 2  # halves round up
    assert steps_for_macs(25, 10) == 3  # Python round(2.5) would give 2
    assert steps_for_macs(0, 10) == 1
    with pytest.raises(ValueError, match="macs_per_step"):
        steps_for_macs(10, 0)


def test_matched_baseline_steps_by_hand():
    """A pipeline of 3 phase-1 steps (17712), calibration + mining (9840) and 4 phase-2 steps (22176), all
    computed by hand for SHAPE: 49728 MACs. A dense 4-layer step costs 11088, so the matched dense model gets
    round(4.48) = 4 steps, within half a step of the pipeline."""
    pipeline = (3 * dense_training_macs(tokens=B * T, **SHAPE, num_layers=2) + mining_macs(tokens=30, **SHAPE, exit_layer=2)
                + phase2_training_macs(tokens=24, hard_ratio=0.5, **SHAPE, exit_layer=2, num_layers=4, policy="full"))
    assert pipeline == 3 * 6 * 328 * 3 + 30 * 328 + 24 * 924 == 49728
    per_step = dense_training_macs(tokens=B * T, **SHAPE, num_layers=4)
    assert per_step == 6 * 3 * (4 * 144 + 40) == 11088
    assert steps_for_macs(pipeline, per_step) == 4 and abs(4 * per_step - pipeline) <= per_step / 2


# -- inference and phase-2 step costs ------------------------------------------------------------------
# SHAPE, exit after layer 1 of 2. One layer: q 16 + kv 32 + attention 2*4*2 = 16 + out 16 + mlp 2*2*16 = 64
# -> 144. Head 40. Full depth: 2 * 144 + 40 = 328. Every routed token pays layer 1 and the exit head: 184.
ROUTED = dict(SHAPE, exit_layer=1, num_layers=2)


def test_layer_macs_by_hand():
    assert layer_macs(4, 2, "gelu", 2) == {"q": 16, "kv": 32, "attn": 16, "out": 16, "mlp": 64}
    assert layer_macs(4, 2, "swiglu", 2)["mlp"] == 96


@pytest.mark.parametrize("policy,upper", [
    ("full", 144),  # every token runs layer 2
    ("propagate", 0.5 * 144 + 0.5 * 32),  # hard tokens run it; easy ones only give K/V
    ("skip", 0.5 * (144 - 16 + 8)),  # hard tokens only, attending over half the context
])


def test_routed_macs_by_hand(policy, upper):
    out = routed_macs(**ROUTED, shallow_ratio=0.5, policy=policy)
    expected = 184 + upper + 0.5 * 40  # + the deep head for the hard half
    assert out["macs_per_token"] == pytest.approx(expected)
    assert out["full_depth_macs_per_token"] == 328
    assert out["flop_cost"] == pytest.approx(expected / 328)


def test_routed_macs_limits_and_order():
    exit_only = (184) / 328
    assert routed_macs(**ROUTED, shallow_ratio=1.0, policy="skip")["flop_cost"] == pytest.approx(exit_only)
    assert routed_macs(**ROUTED, shallow_ratio=1.0, policy="propagate")["flop_cost"] == pytest.approx((184 + 32) / 328)
    # all hard: every policy runs every layer, and pays the exit head on top of the full model
    for policy in ("full", "propagate", "skip"):
        assert routed_macs(**ROUTED, shallow_ratio=0.0, policy=policy)["flop_cost"] == pytest.approx(368 / 328)
    for s in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        cost = {p: routed_macs(**ROUTED, shallow_ratio=s, policy=p)["flop_cost"] for p in ("full", "propagate", "skip")}
        assert cost["full"] >= cost["propagate"] >= cost["skip"]
    with pytest.raises(ValueError, match="upper_context"):
        routed_macs(**ROUTED, shallow_ratio=0.5, policy="partial")


def test_phase2_step_macs_by_hand():
    full_step = 3 * 328
    out = phase2_step_macs(**ROUTED, hard_ratio=0.5, policy="full")
    assert out["full_step_macs_per_token"] == full_step
    assert out["macs_per_token"] == pytest.approx(3 * (144 + 0.5 * 40))  # layer 2 + the deep head at hard positions
    rec = phase2_step_macs(**ROUTED, hard_ratio=0.5, policy="full", recompute=True)
    assert rec["macs_per_token"] == pytest.approx(out["macs_per_token"] + 144)  # layer 1 forward, no backward
    skip = phase2_step_macs(**ROUTED, hard_ratio=0.5, policy="skip")
    assert skip["flop_ratio"] < phase2_step_macs(**ROUTED, hard_ratio=0.5, policy="propagate")["flop_ratio"] \
        < out["flop_ratio"] < 1


# -- the benchmark script runs and reports what the cost model says --------------------------------
