"""Routed layers (skip / propagate): dense parts run for hard tokens only, heads once per batch, the
same states and gradients as the reference."""


import pytest
import torch

from lego.ashem import collect_hard_examples, compute_confidence_threshold, grow, upper_logits
from lego.config import StageConfig, TrainingConfig
from lego.routed_layer import capacity_mask, routing_capacity
from lego.training import Trainer

V = 16  # the conftest models' vocabulary


def rows_seen(module):
    """Attach a forward hook; returns a list that collects the number of rows of each input."""
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen


def routed_model(make_tiny_model, perturb, pos="learned", seed=0):
    big = grow(make_tiny_model(num_layers=2, pos=pos, seed=seed), 4)
    perturb(big.layers[2:].parameters(), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (4, 8), generator=g)
    h = big.run_layers(big.embed(x), 0, 2).detach()
    hard = torch.rand(4, 8, generator=g) < 0.4
    hard[1] = False  # a row with no hard token
    hard[2] = True  # a row with only hard tokens
    return big, h, hard


# -- what runs, and for how many tokens -----------------------------------------------------------


@pytest.mark.parametrize("policy", ["full", "propagate", "skip"])
def test_upper_logits_computes_the_deep_head_at_hard_positions_only(make_tiny_model, perturb, policy):
    big, h, hard = routed_model(make_tiny_model, perturb)
    targets = torch.where(hard, torch.randint(0, V, hard.shape), torch.full(hard.shape, -100))
    seen = rows_seen(big.deep_head.proj)
    logits, y = upper_logits(big, h, targets, 2, policy=policy)
    assert logits.shape == (int(hard.sum()), V) and torch.equal(y, targets[hard])
    assert seen == [int(hard.sum())]


@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_routed_layers_run_dense_parts_for_hard_tokens_only(make_tiny_model, perturb, policy):
    """No padding in the projections and MLP: the MLP sees exactly the hard tokens; under skip, no
    projection sees an easy token either."""
    big, h, hard = routed_model(make_tiny_model, perturb)
    n_hard, n_all = int(hard.sum()), hard.numel()
    mlp, qkv = rows_seen(big.layers[2].mlp), rows_seen(big.layers[2].norm1)
    big.run_layers(h, 2, 3, hard=hard, policy=policy)
    assert mlp == [n_hard]
    assert qkv == ([n_all] if policy == "propagate" else [n_hard])  # propagate: every token gives K/V


def test_no_hard_token_runs_nothing_and_keeps_the_states(make_tiny_model, perturb):
    big, h, _ = routed_model(make_tiny_model, perturb)
    seen = rows_seen(big.layers[2].mlp)
    none = torch.zeros(h.shape[:2], dtype=torch.bool)
    for policy in ("propagate", "skip"):
        assert torch.equal(big.run_layers(h, 2, 4, hard=none, policy=policy), h)
    assert seen == []


def test_routed_evaluation_runs_each_head_once_per_batch_on_the_right_tokens(make_tiny_model, perturb,
                                                                             token_batches):
    small = make_tiny_model(num_layers=2)
    t = compute_confidence_threshold(small, token_batches, 0.5)
    big = grow(small, 4)
    perturb(big.layers[2:].parameters())
    exit_rows, deep_rows = rows_seen(big.output_head.proj), rows_seen(big.deep_head.proj)
    cfg = TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=t, exit_layer=2, upper_context="skip")
    stats = Trainer(cfg, V, progress=False).evaluate(big, token_batches)
    n_rows = token_batches[0][0].numel()
    assert exit_rows == [n_rows] * len(token_batches)  # the exit's logits once, for every token
    hard = collect_hard_examples(small, token_batches, t)
    assert sum(deep_rows) == hard["num_hard"] == round((1 - stats["shallow_ratio"]) * stats["n_tokens"])


# -- the packed implementation computes what the reference computes, gradients included -----------

def reference_upper(big, h, hard, policy):
    """Unpacked references: propagate = run every token, keep the hard ones' outputs; skip = run
    each row's hard subsequence alone, at its original positions."""
    if policy == "propagate":
        out = h
        for layer in big.layers[2:4]:
            out = torch.where(hard[..., None], layer(out, big.rope), out)
        return out
    rows = []
    for b in range(h.shape[0]):
        idx = hard[b].nonzero().squeeze(1)
        row = h[b]
        if idx.numel():
            sub = row[idx][None]
            rope = None if big.rope is None else (big.rope_cos[idx], big.rope_sin[idx])
            for layer in big.layers[2:4]:
                sub = layer(sub, rope)
            row = row.index_copy(0, idx, sub[0])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_routed_gradients_equal_the_reference(make_tiny_model, perturb, pos, policy):
    big, h, hard = routed_model(make_tiny_model, perturb, pos=pos)
    params = [p for layer in big.layers[2:4] for p in layer.parameters()]
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (lambda x: big.run_layers(x, 2, 4, hard=hard, policy=policy),
                lambda x: reference_upper(big, x, hard, policy)):
        x = h.clone().requires_grad_(True)
        out = run(x)
        g = torch.autograd.grad((out * w).sum(), [x, *params])
        grads.append((out.detach(), g))
    (out_a, g_a), (out_b, g_b) = grads
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_a_row_gives_the_same_states_alone_and_in_a_batch(make_tiny_model, perturb, pos, policy):
    """Packing (slots, padding to the longest row) must not leak between rows."""
    big, h, hard = routed_model(make_tiny_model, perturb, pos=pos)
    with torch.no_grad():
        batch = big.run_layers(h, 2, 4, hard=hard, policy=policy)
        for b in range(h.shape[0]):
            alone = big.run_layers(h[b:b + 1], 2, 4, hard=hard[b:b + 1], policy=policy)
            torch.testing.assert_close(batch[b:b + 1], alone, atol=1e-5, rtol=1e-5)


# -- fixed capacity: static shapes, overflow counted, the same states when nothing overflows ------------------


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_capacity_at_or_above_the_fullest_row_equals_the_routed_layers(make_tiny_model, perturb, pos, policy):
    """Nothing overflows: the same states, bit for bit in fp32, and the same gradients; no overflow counted."""
    big, h, hard = routed_model(make_tiny_model, perturb, pos=pos)
    most = int(hard.sum(1).max())  # 8: row 2 is all hard
    params = [p for layer in big.layers[2:4] for p in layer.parameters()]
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for capacity in (None, most, most + 5):
        x = h.clone().requires_grad_(True)
        out = big.run_layers(x, 2, 4, hard=hard, policy=policy, capacity=capacity)
        results.append((out.detach(), torch.autograd.grad((out * w).sum(), [x, *params])))
        if capacity is not None:
            assert int(capacity_mask(hard, capacity)[1]) == 0
    (ref, g_ref), *rest = results
    for out, g in rest:
        assert torch.equal(out, ref)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_tokens_beyond_capacity_are_counted_and_keep_their_state(make_tiny_model, perturb, pos, policy):
    """Each row's first `capacity` hard tokens run as if they were the only hard ones (an overflowed token is an
    easy one: its state is copied upward, under skip it gives no key/value); the overflow count is the number of
    hard tokens beyond capacity, counted by hand."""
    big, h, hard = routed_model(make_tiny_model, perturb, pos=pos)
    capacity = 2
    beyond = torch.zeros_like(hard)
    for b in range(hard.shape[0]):
        beyond[b, hard[b].nonzero().squeeze(1)[capacity:]] = True
    kept, overflow = capacity_mask(hard, capacity)
    assert overflow.dim() == 0 and int(overflow) == int(beyond.sum()) > 0
    assert torch.equal(kept, hard & ~beyond)
    with torch.no_grad():
        out = big.run_layers(h, 2, 4, hard=hard, policy=policy, capacity=capacity)
        assert torch.equal(out[beyond], h[beyond]) and torch.equal(out[~hard], h[~hard])
        assert not torch.equal(out[kept], h[kept])
        torch.testing.assert_close(out, big.run_layers(h, 2, 4, hard=kept, policy=policy), atol=1e-6, rtol=1e-6)
        none = torch.zeros_like(hard)
        assert torch.equal(big.run_layers(h, 2, 4, hard=none, policy=policy, capacity=capacity), h)


@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_phase2_loss_with_capacity_scores_the_kept_tokens_only(make_tiny_model, perturb, token_batches, policy):
    """train_upper_layers / evaluate_on_hard_examples with `capacity`: a capacity no row exceeds gives the exact
    selection's loss; a smaller one is the mean over each row's first `capacity` hard tokens (the others left out)."""
    from lego.ashem import evaluate_on_hard_examples, train_upper_layers
    from lego.store import create_hard_example_loader

    small = make_tiny_model(num_layers=2)
    t = compute_confidence_threshold(small, token_batches, 0.5)
    hard = collect_hard_examples(small, token_batches, t)
    big = grow(small, 4)
    perturb(big.layers[2:].parameters())
    mask = hard["targets"] != -100
    most = int(mask.sum(1).max())
    loader = create_hard_example_loader(hard, batch_size=len(hard["targets"]), shuffle=False)

    def loss(capacity):
        return train_upper_layers(big, loader, torch.optim.SGD(big.parameters(), lr=0.0), V, "cpu", 2,
                                  policy=policy, capacity=capacity)

    exact = loss(None)
    assert loss(most) == pytest.approx(exact, rel=1e-6)
    assert evaluate_on_hard_examples(big, loader, V, "cpu", 2, policy=policy, capacity=most)["n_tokens"] == mask.sum()
    small_cap = max(1, most // 2)
    kept, overflow = capacity_mask(mask, small_cap)
    assert int(overflow) > 0
    on_kept = evaluate_on_hard_examples(big, loader, V, "cpu", 2, policy=policy, capacity=small_cap)
    assert on_kept["n_tokens"] == int(kept.sum())
    with torch.no_grad():  # by hand: the exact routed layers on the kept tokens alone, the deep head there
        h = big.run_layers(hard["hidden_states"], 2, 4, hard=kept, policy=policy)
        nll = torch.nn.functional.cross_entropy(big.deep_head(h[kept]).float(), hard["targets"][kept])
    assert loss(small_cap) == pytest.approx(float(nll), rel=1e-5)


def test_a_run_with_capacity_records_the_slots_and_the_overflow(tmp_path):
    """phase2.capacity_slack: phase 2 trains with fixed-capacity layers; result.json records the slots per row
    (the mined sequences' hard share plus the slack, rounded up) and the hard tokens beyond them; with
    upper_context=full the key is refused, naming it."""
    import json

    from conftest import tiny_config

    from lego.config import ConfigError, validate
    from lego.run import run

    cfg = tiny_config(tmp_path / "cache", **{"phase2.upper_context": "skip", "phase2.capacity_slack": 0.0,
                                             "eval.standard_baseline": False, "stages": ["phase1", "hard_examples",
                                                                                        "phase2"]})
    run(cfg, tmp_path / "run")
    cap = json.loads((tmp_path / "run/phase2/result.json").read_text())["capacity"]
    assert cap["slack"] == 0.0 and cap["seq_len"] == cfg.data.seq_len and cap["slots_per_row"] % 8 == 0
    assert 0 <= cap["overflow_tokens"] < cap["hard_tokens"]
    bad = tiny_config(tmp_path / "cache", **{"phase2.capacity_slack": 0.1})  # upper_context=full
    with pytest.raises(ConfigError, match="^phase2.capacity_slack=0.1 needs routed upper layers"):
        validate(bad)
    bad.phase2.upper_context, bad.phase2.capacity_slack = "skip", -1
    with pytest.raises(ConfigError, match="^phase2.capacity_slack=-1 must be a number >= 0"):
        validate(bad)


def test_routing_capacity_is_the_share_plus_slack_rounded_up():
    assert routing_capacity(0.3, 256, slack=0.1, multiple=8) == 104  # ceil(0.4 * 256) = 103 -> 104
    assert routing_capacity(0.5, 64, slack=0.0, multiple=8) == 32
    assert routing_capacity(0.95, 100, slack=0.1) == 100  # never more slots than positions
    assert routing_capacity(0.0, 64, slack=0.0) == 8  # at least one slot, rounded up
    for key, bad in (("share", dict(share=1.5)), ("slack", dict(share=0.3, slack=-0.1)),
                     ("multiple", dict(share=0.3, multiple=0))):
        with pytest.raises(ValueError, match=key):
            routing_capacity(seq_len=64, **bad)
    with pytest.raises(ValueError, match="capacity"):
        capacity_mask(torch.ones(2, 4, dtype=torch.bool), 0)


@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_the_capacity_path_compiles_as_one_graph_for_every_mask(make_tiny_model, perturb, policy):
    """No graph break (fullgraph) and no recompilation when the number of hard tokens changes: the shapes
    are static. aot_eager traces forward and backward without a C++ compiler (inductor: the slow test)."""
    big, h, hard = routed_model(make_tiny_model, perturb, pos="rope")
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, mask):
        return big.run_layers(x, 2, 4, hard=mask, policy=policy, capacity=4)

    explained = torch._dynamo.explain(f)(h, hard)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=counting)
    other = torch.rand(hard.shape, generator=torch.Generator().manual_seed(7)) < 0.8
    with torch.no_grad():
        for mask in (hard, other, torch.zeros_like(hard)):
            assert torch.equal(compiled(h, mask), f(h, mask))
    assert len(graphs) == 1
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_the_capacity_path_under_inductor_equals_eager(make_tiny_model, perturb, policy):
    """torch.compile's default backend (C++ kernels on CPU: 10-30 s per policy on a cold cache): forward and
    gradients."""
    big, h, hard = routed_model(make_tiny_model, perturb, pos="rope")

    def f(x, mask):
        return big.run_layers(x, 2, 4, hard=mask, policy=policy, capacity=4)

    compiled = torch.compile(f, fullgraph=True)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (f, compiled):
        x = h.clone().requires_grad_(True)
        out = run(x, hard)
        grads.append((out.detach(), torch.autograd.grad((out * w).sum(), x)[0]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
