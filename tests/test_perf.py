"""Properties that the speed of routing rests on (no timings: scripts/bench.py measures those).

    python -m pytest tests/test_perf.py -q

What is computed, and for which tokens: deep-exit logits only at hard positions, upper layers'
dense parts only for hard tokens (unpadded), the exit head once per batch; routed gradients
equal the reference's; the FLOP model on hand-computed cases; chunked confidences bit-equal.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lego.confidence import _CHUNK_ELEMENTS, _row_stats, confidence_from_logits, token_stats
from lego.config import CONFIDENCE_MEASURES, IGNORE_INDEX
from lego.store import HalfRowWriter, RowBuffer
from lego.ashem import collect_hard_examples, compute_confidence_threshold, upper_logits
from lego.cost import layer_macs, phase2_step_macs, routed_macs
from lego.config import StageConfig, TrainingConfig
from lego.training import Trainer

V = 16  # the conftest models' vocabulary


def rows_seen(module):
    """Attach a forward hook; returns a list that collects the number of rows of each input."""
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen


def routed_model(make_tiny_model, perturb, pos="learned", seed=0):
    big = make_tiny_model(num_layers=2, pos=pos, seed=seed).grow(4)
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
    big = small.grow(4, routing_threshold=t, upper_context="skip")
    perturb(big.layers[2:].parameters())
    exit_rows, deep_rows = rows_seen(big.output_head.proj), rows_seen(big.deep_head.proj)
    cfg = TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=t, exit_layer=2)
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


# -- confidences: chunked on CPU, bit-identical ----------------------------------------------------

@pytest.mark.parametrize("measure", CONFIDENCE_MEASURES)
def test_chunked_confidences_are_bit_identical(measure):
    vocab = 300
    rows = 3 * (_CHUNK_ELEMENTS // vocab) + 7  # several chunks and a ragged last one
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 4
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(1))
    targets[::5] = IGNORE_INDEX
    out = confidence_from_logits(logits.view(-1, 1, vocab), measure)
    assert out.shape == (rows, 1)
    whole = _row_stats(logits, targets, measure, IGNORE_INDEX)  # one pass, no chunks
    assert torch.equal(out.view(-1), whole["conf"])
    stats = token_stats(logits.view(-1, 1, vocab), targets.view(-1, 1), measure)
    for key in ("conf", "nll", "pred"):
        assert torch.equal(stats[key].view(-1), whole[key]), key
    # the textbook definitions, and what cross_entropy / argmax give
    p = F.softmax(logits.double(), -1)
    ref = {"max_prob": p.max(-1).values, "margin": p.topk(2, -1).values @ torch.tensor([1.0, -1.0]).double(),
           "entropy": (p * p.log()).sum(-1)}[measure]
    torch.testing.assert_close(out.view(-1).double(), ref, atol=1e-6, rtol=1e-5)
    keep = targets != IGNORE_INDEX
    assert torch.equal(stats["nll"].view(-1)[keep], F.cross_entropy(logits[keep], targets[keep], reduction="none"))
    assert (stats["nll"].view(-1)[~keep] == 0).all()
    assert torch.equal(stats["pred"].view(-1), logits.argmax(-1))


# -- mining keeps its rows in a few large slabs ---------------------------------------------------

def test_row_buffer_joins_pieces_across_slabs_in_order(monkeypatch):
    monkeypatch.setattr(RowBuffer, "SLAB_BYTES", 5 * 8 * 4)  # 5 rows of 4 int64 per slab
    buf = RowBuffer()
    pieces = [torch.arange(k * 4, dtype=torch.long).view(k, 4) + 100 * i for i, k in enumerate([3, 0, 7, 1, 5])]
    for p in pieces:
        buf.append(p)
    assert buf.rows == 16 and len(buf.slabs) == 4
    assert torch.equal(buf.tensor(torch.empty(0)), torch.cat(pieces))
    assert buf.slabs == [] and buf.rows == 0
    empty = torch.empty(0, 0, dtype=torch.long)
    assert RowBuffer().tensor(empty) is empty


def test_half_rows_round_trip_pickle_and_truncation(tmp_path):
    import pickle

    rows = torch.randn(7, 3, 4)
    w = HalfRowWriter(str(tmp_path / "s" / "h.f16"), (3, 4))
    w.append(rows[:2])
    w.append(rows[2:])
    store = w.close()
    assert store.shape == (7, 3, 4) and len(store) == 7
    assert (tmp_path / "s" / "h.f16").stat().st_size == 7 * 3 * 4 * 2  # float16, nothing else
    assert np.array_equal(store[5], rows[5].half().numpy()) and np.array_equal(store[-1], rows[6].half().numpy())
    assert np.array_equal(np.asarray(store), rows.half().numpy())
    again = pickle.loads(pickle.dumps(store))  # what a DataLoader worker receives
    assert np.array_equal(again[3], rows[3].half().numpy())
    with pytest.raises(IndexError):
        store[7]
    with open(tmp_path / "s" / "h.f16", "r+b") as f:
        f.truncate(6 * 3 * 4 * 2)
    with pytest.raises(ValueError, match="truncated"):
        again[6]


@pytest.mark.parametrize("store", ["memory", "disk", "recompute"])
def test_mining_with_small_slabs_gives_the_same_examples(make_tiny_model, token_batches, tmp_path, monkeypatch,
                                                         store):
    model = make_tiny_model(num_layers=2)
    t = compute_confidence_threshold(model, token_batches, 0.5)
    ref = collect_hard_examples(model, token_batches, t, store=store, store_dir=str(tmp_path / "a"))
    monkeypatch.setattr(RowBuffer, "SLAB_BYTES", 1)  # one row per slab
    out = collect_hard_examples(model, token_batches, t, store=store, store_dir=str(tmp_path / "b"))
    for key in ("inputs", "targets", "confidences"):
        assert torch.equal(out[key], ref[key]) and out[key].dtype == ref[key].dtype
    if store == "memory":
        assert torch.equal(out["hidden_states"], ref["hidden_states"])
    assert compute_confidence_threshold(model, token_batches, 0.5) == t


# -- the FLOP model --------------------------------------------------------------------------------
# dim 4, ffn_mult 2, gelu, vocab 10, seq_len 3 (average context 2), exit after layer 1 of 2.
# One layer: q 16 + kv 32 + attention 2*4*2 = 16 + out 16 + mlp 2*2*16 = 64 -> 144. Head 40.
# Full depth: 2 * 144 + 40 = 328. Every routed token pays layer 1 and the exit head: 184.
SHAPE = dict(dim=4, ffn_mult=2, ffn="gelu", vocab_size=10, seq_len=3, exit_layer=1, num_layers=2)


def test_layer_macs_by_hand():
    assert layer_macs(4, 2, "gelu", 2) == {"q": 16, "kv": 32, "attn": 16, "out": 16, "mlp": 64}
    assert layer_macs(4, 2, "swiglu", 2)["mlp"] == 96


@pytest.mark.parametrize("policy,upper", [
    ("full", 144),  # every token runs layer 2
    ("propagate", 0.5 * 144 + 0.5 * 32),  # hard tokens run it; easy ones only give K/V
    ("skip", 0.5 * (144 - 16 + 8)),  # hard tokens only, attending over half the context
])
def test_routed_macs_by_hand(policy, upper):
    out = routed_macs(**SHAPE, shallow_ratio=0.5, policy=policy)
    expected = 184 + upper + 0.5 * 40  # + the deep head for the hard half
    assert out["macs_per_token"] == pytest.approx(expected)
    assert out["full_depth_macs_per_token"] == 328
    assert out["flop_cost"] == pytest.approx(expected / 328)


def test_routed_macs_limits_and_order():
    exit_only = (184) / 328
    assert routed_macs(**SHAPE, shallow_ratio=1.0, policy="skip")["flop_cost"] == pytest.approx(exit_only)
    assert routed_macs(**SHAPE, shallow_ratio=1.0, policy="propagate")["flop_cost"] == pytest.approx((184 + 32) / 328)
    # all hard: every policy runs every layer, and pays the exit head on top of the full model
    for policy in ("full", "propagate", "skip"):
        assert routed_macs(**SHAPE, shallow_ratio=0.0, policy=policy)["flop_cost"] == pytest.approx(368 / 328)
    for s in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        cost = {p: routed_macs(**SHAPE, shallow_ratio=s, policy=p)["flop_cost"] for p in ("full", "propagate", "skip")}
        assert cost["full"] >= cost["propagate"] >= cost["skip"]
    with pytest.raises(ValueError, match="upper_context"):
        routed_macs(**SHAPE, shallow_ratio=0.5, policy="partial")


def test_phase2_step_macs_by_hand():
    full_step = 3 * 328
    out = phase2_step_macs(**SHAPE, hard_ratio=0.5, policy="full")
    assert out["full_step_macs_per_token"] == full_step
    assert out["macs_per_token"] == pytest.approx(3 * (144 + 0.5 * 40))  # layer 2 + the deep head at hard positions
    rec = phase2_step_macs(**SHAPE, hard_ratio=0.5, policy="full", recompute=True)
    assert rec["macs_per_token"] == pytest.approx(out["macs_per_token"] + 144)  # layer 1 forward, no backward
    skip = phase2_step_macs(**SHAPE, hard_ratio=0.5, policy="skip")
    assert skip["flop_ratio"] < phase2_step_macs(**SHAPE, hard_ratio=0.5, policy="propagate")["flop_ratio"] \
        < out["flop_ratio"] < 1


# -- the benchmark script runs and reports what the cost model says --------------------------------

def test_bench_script_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--model", "tiny", "--vocab", "64", "--seq-len", "16", "--batch", "2", "--warmup", "0",
                         "--repeats", "1", "--rounds", "1", "--threshold-n", "1000", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    cases = {r["case"]: r for r in result["rows"]}
    assert {"full-model step", "phase-2 step full", "phase-2 step propagate", "phase-2 step skip",
            "phase-2 step full (recompute)", "full-depth eval"} <= set(cases)
    assert all(f"routed eval {p} @{r}" in cases for p in ("full", "propagate", "skip") for r in ("0.3", "0.5", "0.7"))
    assert cases["full-model step"]["time_ratio"] == 1.0 and cases["full-depth eval"]["time_ratio"] == 1.0
    row = cases["routed eval skip @0.5"]
    assert row["flop_ratio"] == pytest.approx(routed_macs(
        dim=128, ffn_mult=4, ffn="gelu", vocab_size=64, seq_len=16, exit_layer=2, num_layers=4,
        shallow_ratio=1 - row["hard_ratio"], policy="skip")["flop_cost"])
    assert result["threshold"]["exact"] and result["threshold"]["n"] == 1000
