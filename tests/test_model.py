"""The model (`Model`, and the specification's `DeepSupervisionTransformer` constructor): causality, readout at any
layer, growing, upper-context policies, argument checks, no routing state.

    python -m pytest tests/test_model.py -q
"""

import pytest
import torch

from lego.ashem import grow
from lego.config import Routing
from lego.generate import teacher_forced_logits
from lego.model import DeepSupervisionTransformer, Model


def random_tokens(shape, vocab, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# -- causality and readout -------------------------------------------------------------------------

@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_causal_at_every_layer(make_tiny_model, pos):
    model = make_tiny_model(num_layers=3, pos=pos)
    x = random_tokens((2, 8), model.vocab_size)
    states = model.hidden_states(x)
    for t in range(x.shape[1] - 1):
        x2 = x.clone()
        x2[:, t + 1:] = (x[:, t + 1:] + 1 + random_tokens(x[:, t + 1:].shape, 5, seed=t)) % model.vocab_size
        states2 = model.hidden_states(x2)
        for layer in range(1, model.num_layers + 1):
            a, b = model.logits_at(states[layer], layer), model.logits_at(states2[layer], layer)
            assert torch.equal(a[:, : t + 1], b[:, : t + 1]), f"layer {layer}, t={t}: future tokens leaked"
            assert not torch.allclose(a[:, t + 1:], b[:, t + 1:]), "test is vacuous: later logits did not change"


@pytest.mark.parametrize("policy", ["propagate", "skip"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_routed_upper_layers_are_causal(make_tiny_model, perturb, pos, policy):
    big = grow(make_tiny_model(num_layers=2, pos=pos), 4)
    perturb(big.layers[2:].parameters())
    x = random_tokens((3, 8), big.vocab_size)
    hard = torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    t = 4
    x2 = x.clone()
    x2[:, t + 1:] = (x2[:, t + 1:] + 3) % big.vocab_size
    out = [big.run_layers(big.run_layers(big.embed(v), 0, 2), 2, 4, hard=hard, policy=policy) for v in (x, x2)]
    torch.testing.assert_close(out[0][:, : t + 1], out[1][:, : t + 1], atol=1e-6, rtol=0)


def test_forward_equals_layerwise_readout(make_tiny_model):
    model = make_tiny_model(num_layers=3)
    x = random_tokens((2, 8), model.vocab_size)
    states = model.hidden_states(x)
    assert len(states) == 4 and torch.equal(states[0], model.embed(x))
    for layer in range(1, 4):
        assert torch.equal(model(x, layer=layer), model.logits_at(states[layer], layer))
        assert torch.equal(model.run_layers(states[layer - 1], layer - 1, layer), states[layer])
    assert torch.equal(model(x), model(x, layer=3))
    assert model(x).shape == (2, 8, model.vocab_size)


@pytest.mark.parametrize("norm,pos,ffn", [("rmsnorm", "rope", "swiglu"), ("layernorm", "learned", "swiglu"),
                                          ("rmsnorm", "learned", "gelu")])
def test_model_options_build_and_train_a_step(make_tiny_model, norm, pos, ffn):
    model = make_tiny_model(num_layers=2, norm=norm, pos=pos, ffn=ffn).train()
    x = random_tokens((2, 8), model.vocab_size)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if p.grad is not None)


def test_sequence_longer_than_max_seq_len_is_refused(make_tiny_model):
    model = make_tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens((1, model.max_seq_len + 1), model.vocab_size))


# -- growing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("deep_head", [True, False])
def test_grow_copies_and_freezes_the_lower_block(make_tiny_model, deep_head):
    small = make_tiny_model(num_layers=2)
    big = grow(small, 4, deep_head=deep_head)
    assert (big.num_layers, big.exit_layers, big.args.deep_head) == (4, [2], deep_head)
    x = random_tokens((2, 8), small.vocab_size)
    assert torch.equal(big(x, layer=2), small(x))
    assert torch.equal(big(x, layer=1), small(x, layer=1))
    frozen = [big.embedding, big.output_head, big.layers[0], big.layers[1]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in big.layers[2:] for p in m.parameters())
    if deep_head:
        assert all(p.requires_grad for p in big.deep_head.parameters())
        # the deep head starts as a copy of the exit head, and is read above the exit only
        assert torch.equal(big.deep_head.proj.weight, small.output_head.proj.weight)
        assert big.head_for(2) is big.output_head and big.head_for(3) is big.deep_head
    else:
        assert big.deep_head is None and big.head_for(4) is big.output_head


def test_grow_rejects_bad_depths(make_tiny_model):
    small = make_tiny_model(num_layers=2)
    with pytest.raises(ValueError, match="num_layers"):
        grow(small, 2)
    with pytest.raises(ValueError, match="exit_layer"):
        grow(small, 4, exit_layer=1)


# -- upper-context policies -------------------------------------------------------------------------

def routed_setup(make_tiny_model, perturb, pos, seed=0, p_hard=0.5):
    big = grow(make_tiny_model(num_layers=2, pos=pos, seed=seed), 4)
    perturb(big.layers[2:].parameters(), seed=seed)
    x = random_tokens((4, 8), big.vocab_size, seed=seed)
    h = big.run_layers(big.embed(x), 0, 2)
    hard = torch.rand(4, 8, generator=torch.Generator().manual_seed(seed + 7)) < p_hard
    hard[0] = True  # one row all hard
    hard[1] = False  # one row all easy
    hard[2, 0] = True  # a row whose first token is hard
    return big, h, hard


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_all_hard_policies_equal_full(make_tiny_model, perturb, pos, policy):
    big, h, _ = routed_setup(make_tiny_model, perturb, pos)
    hard = torch.ones(h.shape[:2], dtype=torch.bool)
    full = big.run_layers(h, 2, 4, policy="full")
    torch.testing.assert_close(big.run_layers(h, 2, 4, hard=hard, policy=policy), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_propagate_equals_layerwise_where_reference(make_tiny_model, perturb, pos):
    big, h, hard = routed_setup(make_tiny_model, perturb, pos)
    ref = h
    for layer in big.layers[2:4]:
        ref = torch.where(hard[..., None], layer(ref, big.rope), ref)
    out = big.run_layers(h, 2, 4, hard=hard, policy="propagate")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(out[~hard], h[~hard]), "easy tokens must leave with their exit state"


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_skip_equals_running_each_rows_hard_subsequence(make_tiny_model, perturb, pos):
    """skip: hard tokens attend to earlier hard tokens only; with rope, at their original positions."""
    big, h, hard = routed_setup(make_tiny_model, perturb, pos)
    ref = h.clone()
    for b in range(h.shape[0]):
        idx = hard[b].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        sub = h[b, idx][None]  # (1, n_hard, C): the compacted row
        rope = None if big.rope is None else (big.rope_cos[idx], big.rope_sin[idx])
        for layer in big.layers[2:4]:
            sub = layer(sub, rope)
        ref[b, idx] = sub[0]
    out = big.run_layers(h, 2, 4, hard=hard, policy="skip")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # states are O(1): float32 rounding only
    assert torch.equal(out[~hard], h[~hard])
    # and skip is really different from propagate here (easy tokens' keys are dropped)
    assert not torch.allclose(out[hard], big.run_layers(h, 2, 4, hard=hard, policy="propagate")[hard])


def test_full_is_the_default_policy_and_ignores_the_mask(make_tiny_model, perturb):
    big, h, hard = routed_setup(make_tiny_model, perturb, "learned")
    assert torch.equal(big.run_layers(h, 2, 4, hard=hard), big.run_layers(h, 2, 4))  # default: full
    assert torch.equal(big.run_layers(h, 2, 4, hard=hard, policy="full"), big.run_layers(h, 2, 4))
    assert not torch.equal(big.run_layers(h, 2, 4, hard=hard, policy="skip"), big.run_layers(h, 2, 4))


def test_the_model_holds_no_routing_state(make_tiny_model):
    """A plain LM: a grown model has exits (structure) but no threshold, policy or measure; routing is a value
    passed at call time, so one model evaluated under two routings gives what each routing alone gives."""
    big = grow(make_tiny_model(num_layers=2), 4)
    for name in ("routing_threshold", "routing_thresholds", "upper_context", "confidence", "router_probe"):
        assert not hasattr(big, name), name
    x = random_tokens((2, 8), big.vocab_size)
    one = teacher_forced_logits(big, x, Routing((0.05,), "skip"))
    other = teacher_forced_logits(big, x, Routing((0.2,), "propagate"))
    assert torch.equal(teacher_forced_logits(big, x, Routing((0.05,), "skip"))[0], one[0])
    assert not torch.equal(one[1], other[1])  # the thresholds route other tokens


def test_model_is_built_from_its_arguments(make_tiny_model):
    """Model(ModelArgs) rebuilds a model exactly: same parameters, same state-dict keys and shapes."""
    big = grow(make_tiny_model(num_layers=2, exit_head="lowrank", exit_rank=4), 4)
    again = Model(big.args)
    assert again.args == big.args and again.args.exits == (2,)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in big.state_dict().items()}
    again.load_state_dict(big.state_dict())
    x = random_tokens((2, 8), big.vocab_size)
    assert torch.equal(again.eval()(x), big(x))


def test_the_specification_constructor_builds_a_model_and_returns_its_routing():
    """`DeepSupervisionTransformer(...)` with the specification's keywords: a `Model` with those exits, and the
    routing keywords as `model.routing` (a value the model does not read)."""
    m = DeepSupervisionTransformer(vocab_size=32, dim=16, num_layers=4, num_heads=2, exit_layer=2,
                                   routing_threshold=0.4, upper_context="propagate", confidence="margin")
    assert isinstance(m, Model) and m.exit_layers == [2] and m.num_layers == 4
    assert m.routing == Routing((0.4,), "propagate", "margin")
    cascade = DeepSupervisionTransformer(32, 16, 6, 2, exit_layers=[2, 4], routing_thresholds=[0.3, 0.5],
                                         deep_head=True)
    assert cascade.args.exits == (2, 4) and cascade.routing.thresholds == (0.3, 0.5) and len(cascade.exit_heads) == 1
    plain = DeepSupervisionTransformer(32, 16, 2, 2)
    assert plain.exit_layer is None and plain.routing == Routing()
    with pytest.raises(ValueError, match="routing_thresholds"):
        DeepSupervisionTransformer(32, 16, 6, 2, exit_layers=[2, 4], routing_thresholds=[0.3])
    with pytest.raises(ValueError, match="exit_layer=3 must be the first"):
        DeepSupervisionTransformer(32, 16, 6, 2, exit_layer=3, exit_layers=[2, 4])


# -- argument checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,key", [
    (dict(dim=18, num_heads=4), "dim"),
    (dict(num_layers=2, exit_layer=2), "exit_layer"),
    (dict(num_layers=2, exit_layer=3), "exit_layer"),
    (dict(num_layers=2, exit_layer=0), "exit_layer"),
    (dict(num_layers=0), "num_layers"),
    (dict(norm="batchnorm"), "norm"),
    (dict(pos="alibi"), "pos"),
    (dict(ffn="relu"), "ffn"),
    (dict(upper_context="partial"), "upper_context"),
    (dict(confidence="variance"), "confidence"),
    (dict(dropout=1.0), "dropout"),
    (dict(dim=6, num_heads=2, pos="rope"), "rope"),
    (dict(deep_head=True), "deep_head"),
])
def test_bad_arguments_name_the_argument(kwargs, key):
    args = dict(vocab_size=16, dim=16, num_layers=2, num_heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=key):
        DeepSupervisionTransformer(**args)


def test_bad_policy_and_layer_range_in_run_layers(make_tiny_model):
    model = make_tiny_model(num_layers=2)
    h = model.embed(random_tokens((1, 8), model.vocab_size))
    hard = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="upper_context"):
        model.run_layers(h, 0, 2, hard=hard, policy="partial")
    with pytest.raises(ValueError, match="layer range"):
        model.run_layers(h, 1, 3)


@pytest.mark.slow
def test_compile_blocks_compiles_what_training_calls(make_tiny_model):
    """model.compile=true: the parts training calls (embed, layers, heads) run compiled, with the
    same results, parameters and checkpoint keys as eager (torch.compile(model) would compile
    only `forward`, which no stage calls)."""
    model = grow(make_tiny_model(num_layers=2), 3)
    x = random_tokens((2, 8), model.vocab_size)
    keys = list(model.state_dict())
    ref = model.logits_at(model.run_layers(model.embed(x), 0, 3), 3)
    assert model.compile_blocks() is model
    assert all(m._compiled_call_impl is not None
               for m in (model.embedding, *model.layers, model.output_head, model.deep_head))
    out = model.logits_at(model.run_layers(model.embed(x), 0, 3), 3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys
