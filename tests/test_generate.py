"""Generation: KV-cached decoding, routed decoding (train = infer per policy), self-speculative decoding.

    python -m pytest tests/test_generate.py -q
"""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lego.ashem import grow
from lego.confidence import confidence_from_logits
from lego.config import ConfigError, Routing
from lego.generate import agreement, generate, generate_batched, run_generation, teacher_forced_logits
from lego.generate import test_prompts as pick_prompts
from lego.kvcache import CachedModel, Positions
from lego.sampling import Sampler, probabilities
from lego.speculative import draft_confident, speculative_round
from lego.training import StageConfig, Trainer, TrainingConfig

PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]  # different lengths on purpose
MAX_LEN = 24


@pytest.fixture
def grown(make_tiny_model, perturb):
    """`grown(policy="full", pos="learned", threshold=None, **shape)`: a 4-layer model grown from a
    2-layer one, its new layers and deep head perturbed so that they change the predictions; the routing the
    tests decode it with is `model.routing` (a test's own attribute: the model does not read it)."""

    def make(policy="full", pos="learned", threshold=None, **shape):
        small = make_tiny_model(num_layers=2, seed=3, max_seq_len=MAX_LEN, pos=pos, **shape)
        big = grow(small, 4).eval()
        big.routing = Routing(() if threshold is None else (threshold,), policy)
        perturb(list(big.layers[2:].parameters()), std=0.3, seed=4)
        perturb(list(big.deep_head.parameters()), std=0.1, seed=5)
        return big

    return make


def uncached_greedy(model, prompt, n):
    """Greedy decoding that recomputes the whole forward for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def exit_confidences(model, sequences):
    with torch.no_grad(), model.autocast():
        return torch.cat([confidence_from_logits(model.logits_at(model.run_layers(model.embed(torch.tensor([s])), 0, 2),
                                                                 2).float(), model.routing.measure).flatten()
                          for s in sequences])


def mid_threshold(conf):
    """A threshold near the median confidence, in the widest gap between neighbouring values,
    so that tiny float differences between cached and full forwards cannot flip a decision."""
    v = conf.sort().values
    lo, hi = int(0.35 * len(v)), int(0.65 * len(v))
    gaps = v[lo + 1:hi + 1] - v[lo:hi]
    i = lo + int(gaps.argmax())
    return float((v[i] + v[i + 1]) / 2)


def calibrated(model, n=12):
    """Set the model's threshold so that about half of the positions of dense greedy text exit."""
    d = generate(model, PROMPTS, routing=model.routing, max_new_tokens=n)
    threshold = mid_threshold(exit_confidences(model, [p + t for p, t in zip(PROMPTS, d.tokens)]))
    model.routing = replace(model.routing, thresholds=(threshold,))
    return model


# -- KV cache ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos,norm,ffn", [("learned", "layernorm", "gelu"), ("rope", "rmsnorm", "swiglu"),
                                          ("rope", "layernorm", "gelu"), ("learned", "rmsnorm", "swiglu")])
def test_cached_greedy_equals_uncached(grown, pos, norm, ffn):
    model = grown(pos=pos, norm=norm, ffn=ffn)
    out = generate(model, PROMPTS, routing=model.routing, max_new_tokens=10)
    expected = [uncached_greedy(model, p, 10) for p in PROMPTS]
    assert out.tokens == expected
    assert len({t for row in expected for t in row}) >= 3, "test is vacuous: the model repeats one token"
    assert out.exit_share == 0 and out.decoder == "dense"


@pytest.mark.parametrize("decoder,policy", [("dense", "full"), ("speculative", "full"), ("routed", "full"),
                                             ("routed", "propagate"), ("routed", "skip")])
def test_batch_of_different_lengths_equals_each_prompt_alone(grown, decoder, policy):
    model = calibrated(grown(policy=policy, pos="rope"))
    batch = generate(model, PROMPTS, routing=model.routing, max_new_tokens=10, decoder=decoder, k=3)
    alone = [generate(model, [p], routing=model.routing, max_new_tokens=10, decoder=decoder, k=3) for p in PROMPTS]
    assert batch.tokens == [a.tokens[0] for a in alone]
    assert batch.exited == [a.exited[0] for a in alone]
    if decoder == "routed":
        assert 0 < batch.exit_share < 1, "test is vacuous: all or none exit"


# -- routed decoding ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["full", "propagate", "skip"])
def test_routed_with_threshold_above_one_equals_dense(grown, policy):
    model = grown(policy=policy, threshold=1.01)  # max_prob <= 1: nothing exits
    routed = generate(model, PROMPTS, routing=model.routing, max_new_tokens=10, decoder="routed", return_logits=True)
    dense = generate(model, PROMPTS, routing=model.routing, max_new_tokens=10, return_logits=True)
    assert routed.tokens == dense.tokens and routed.exit_share == 0.0
    for a, b in zip(routed.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("policy", ["full", "propagate", "skip"])
def test_routed_decoding_logits_equal_teacher_forced_routed_forward(grown, policy, pos):
    model = calibrated(grown(policy=policy, pos=pos))
    out = generate(model, PROMPTS, routing=model.routing, max_new_tokens=12, decoder="routed", return_logits=True)
    assert 0.2 < out.exit_share < 0.8, f"test is vacuous: exit share {out.exit_share}"
    for b, p in enumerate(PROMPTS):
        seq = torch.tensor([p + out.tokens[b]])
        expected, easy = teacher_forced_logits(model, seq, model.routing)
        torch.testing.assert_close(out.logits[b], expected[0, len(p) - 1:-1], atol=2e-5, rtol=1e-5)
        assert out.exited[b] == easy[0, len(p) - 1:-1].tolist()
    # prefill applies the same rule to the prompt's own positions (a prompt that is a whole generated text)
    seqs = [p + t for p, t in zip(PROMPTS, out.tokens)]
    padded = torch.tensor([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs])
    state = CachedModel(model, len(seqs), padded.shape[1], routing=model.routing)
    with torch.no_grad():
        logits, exited = state.prefill(padded, [len(s) for s in seqs])
    for b, s in enumerate(seqs):
        expected, easy = teacher_forced_logits(model, torch.tensor([s]), model.routing)
        torch.testing.assert_close(logits[b, :len(s)], expected[0], atol=2e-5, rtol=1e-5)
        assert torch.equal(exited[b, :len(s)], easy[0])


@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_routed_steps_on_a_mixed_batch_keep_the_cache_invariant(grown, policy):
    """Mixed steps (propagate: one upper pass over every row; skip: the hard rows only) leave the cache a
    prefill of the same tokens writes: exited rows' keys from their exit state, or none (an invalid slot is 0)."""
    model = calibrated(grown(policy=policy))
    B, n = len(PROMPTS), 10
    state = CachedModel(model, B, MAX_LEN, routing=model.routing)
    padded = torch.tensor([p + [0] * (5 - len(p)) for p in PROMPTS])
    mixed = 0
    with torch.no_grad():
        logits, _ = state.prefill(padded, [len(p) for p in PROMPTS])
        seqs = [list(p) for p in PROMPTS]
        tok = logits[torch.arange(B), torch.tensor([len(p) - 1 for p in PROMPTS])].argmax(-1)
        for i in range(n):
            for b, t in enumerate(tok.tolist()):
                seqs[b].append(t)
            at = Positions(None, None, torch.tensor([[len(s) - 1] for s in seqs]), 1, max(map(len, seqs)))
            logits, exited = state.step(tok, at)
            mixed += 0 < int(exited.sum()) < B
            tok = logits.argmax(-1)
        ref = CachedModel(model, B, MAX_LEN, routing=model.routing)
        ref.prefill(torch.tensor([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs]), list(map(len, seqs)))
    assert mixed > 0, "test is vacuous: no mixed step"
    assert torch.equal(state.cache.valid, ref.cache.valid)
    upper = ref.cache.valid[1].view(1, B, 1, MAX_LEN, 1)
    for mine, theirs in ((state.cache.k, ref.cache.k), (state.cache.v, ref.cache.v)):
        torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-5)
        assert torch.count_nonzero(mine[2:] * ~upper) == 0


@pytest.mark.parametrize("measure", ["margin", "entropy"])
def test_routed_decoding_follows_the_models_confidence_measure(grown, measure):
    model = grown(policy="propagate", pos="rope")
    model.routing = replace(model.routing, measure=measure)
    model = calibrated(model)
    out = generate(model, PROMPTS, routing=model.routing, max_new_tokens=12, decoder="routed", return_logits=True)
    assert 0.2 < out.exit_share < 0.8, f"test is vacuous: exit share {out.exit_share}"
    for b, p in enumerate(PROMPTS):
        expected, easy = teacher_forced_logits(model, torch.tensor([p + out.tokens[b]]), model.routing)
        torch.testing.assert_close(out.logits[b], expected[0, len(p) - 1:-1], atol=2e-5, rtol=1e-5)
        assert out.exited[b] == easy[0, len(p) - 1:-1].tolist()


@pytest.mark.parametrize("policy", ["full", "propagate", "skip"])
def test_teacher_forced_logits_are_what_trainer_evaluate_scores(grown, policy):
    model = calibrated(grown(policy=policy))
    seq = torch.randint(0, model.vocab_size, (3, MAX_LEN + 1), generator=torch.Generator().manual_seed(0))
    x, y = seq[:, :-1], seq[:, 1:]
    logits, easy = teacher_forced_logits(model, x, model.routing)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    cfg = TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=model.routing.threshold, exit_layer=2,
                         confidence=model.routing.measure, upper_context=policy)
    stats = Trainer(cfg, model.vocab_size, progress=False).evaluate(model, [(x, y)])
    assert stats["shallow_ratio"] == pytest.approx(float(easy.float().mean()), abs=0)
    assert stats["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)


# -- self-speculative decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_speculative_greedy_equals_dense_greedy(grown, k, pos):
    model = grown(pos=pos)
    dense = generate(model, PROMPTS, routing=model.routing, max_new_tokens=14)
    spec = generate(model, PROMPTS, routing=model.routing, max_new_tokens=14, decoder="speculative", k=k)
    assert spec.tokens == dense.tokens
    assert 0 < spec.accepted < spec.drafted, "test is vacuous: every draft accepted or none"
    assert [sum(e) for e in spec.exited] and sum(map(sum, spec.exited)) == spec.accepted
    assert spec.acceptance_rate == spec.accepted / spec.drafted


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("k", [2, 4])
def test_adaptive_drafting_greedy_equals_dense_greedy(grown, k, pos):
    model = grown(pos=pos)
    dense = generate(model, PROMPTS, routing=model.routing, max_new_tokens=14)
    # most positions confident: a batch stops drafting as soon as one row is unsure
    model.routing = Routing((float(exit_confidences(model, [p + t for p, t in zip(PROMPTS, dense.tokens)])
                                    .quantile(0.1)),))
    fixed = generate(model, PROMPTS, routing=model.routing, max_new_tokens=14, decoder="speculative", k=k)
    spec = generate(model, PROMPTS, routing=model.routing, max_new_tokens=14, decoder="speculative", k=k, adaptive=True)
    assert spec.tokens == dense.tokens and spec.extra["adaptive"]
    assert 0 < spec.drafted < fixed.drafted, "test is vacuous: drafting never stopped early, or never drafted"
    assert sum(map(sum, spec.exited)) == spec.accepted
    # a stricter threshold drafts less; a threshold of 0 drafts as the fixed-k decoder does
    model.routing = Routing((0.0,))
    assert generate(model, PROMPTS, routing=model.routing, max_new_tokens=14, decoder="speculative", k=k,
                    adaptive=True).drafted == fixed.drafted


@pytest.mark.parametrize("adaptive", [False, True])
def test_aligned_batch_never_takes_the_ragged_path(grown, adaptive):
    model = grown()
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]  # one length: rows start aligned
    dense = generate(model, prompts, routing=model.routing, max_new_tokens=14)
    model.routing = Routing((float(exit_confidences(model, [p + t for p, t in zip(prompts, dense.tokens)])
                                    .quantile(0.1)),))
    spec = generate(model, prompts, routing=model.routing, max_new_tokens=14, decoder="speculative", k=2, adaptive=adaptive)
    assert spec.tokens == dense.tokens
    assert spec.extra["ragged_chunks"] == 0 and spec.extra["rounds"] > 0
    per_row = [sum(e) for e in spec.exited]
    assert len(set(per_row)) == 1 and 0 < spec.accepted < spec.drafted  # every row keeps the fewest
    # prompts of different lengths are at per-row positions from the start: the counter sees it
    assert generate(model, PROMPTS, routing=model.routing, max_new_tokens=4, decoder="speculative", k=3).extra["ragged_chunks"] > 0


def test_agreement_threshold_is_the_lowest_confidence_meeting_the_target():
    """By hand: sorted by confidence, the agreement over the top 1, 3 (a tie at 0.8 counts whole), 4 and 5 tokens
    is 1, 2/3, 3/4 and 3/5; the threshold is the lowest confidence whose set still meets the target."""
    from lego.speculative import agreement_threshold

    conf = torch.tensor([0.3, 0.8, 0.9, 0.5, 0.8])
    agree = torch.tensor([False, True, True, True, False])
    got = agreement_threshold(conf, agree, 0.75)
    assert (got["threshold"], got["agreement"], got["draft_share"], got["tokens"]) == (0.5, 0.75, 0.8, 5)
    assert agreement_threshold(conf, agree, 0.8)["threshold"] == pytest.approx(0.9)  # 2/3 at the tie is too few
    low = agreement_threshold(conf, agree, 0.6)  # 3/5 = 0.6 over every token: all of them draft
    assert low["threshold"] == pytest.approx(0.3) and low["draft_share"] == 1.0
    none = agreement_threshold(conf, torch.zeros(5, dtype=torch.bool), 0.5)
    assert none["draft_share"] == 0 and none["threshold"] > float(conf.max())
    with pytest.raises(ValueError, match="target"):
        agreement_threshold(conf, agree, 0.0)


def test_draft_confidence_is_the_max_prob_test_in_log_space():
    logits = torch.randn(64, 50) * 3
    p = logits.softmax(-1).amax(-1)
    for thr in (0.05, 0.2, 0.5):
        assert torch.equal(draft_confident(logits, "max_prob", thr), p >= thr) or \
            (draft_confident(logits, "max_prob", thr) != (p >= thr)).sum() <= 1  # a tie at the last bit
    assert torch.equal(draft_confident(logits, "margin", 0.1),
                       confidence_from_logits(logits, "margin") >= 0.1)


def test_rejected_drafts_leave_the_cache_as_if_never_drafted(grown):
    """After rounds with rejections, the cache equals a prefill of the kept tokens: valid slots
    allclose, validity identical, every other slot exactly zero."""
    model = grown()
    prompts, k = PROMPTS, 4
    B, slots = len(prompts), MAX_LEN
    state = CachedModel(model, B, slots)
    sampler = Sampler(0.0, None, None, None)
    padded = torch.tensor([p + [0] * (5 - len(p)) for p in prompts])
    rejected = 0
    with torch.no_grad():
        logits, _ = state.prefill(padded, [len(p) for p in prompts])
        tok = logits[torch.arange(B), torch.tensor([len(p) - 1 for p in prompts])].argmax(-1)
        seqs, cached = [list(p) for p in prompts], [len(p) for p in prompts]
        for b, t in enumerate(tok.tolist()):
            seqs[b].append(t)
        for _ in range(3):
            tok, new, _, _ = speculative_round(state, tok, cached, list(range(B)), k, sampler)
            rejected += sum(len(row) - 1 < k for row in new)
            for b, row in enumerate(new):
                seqs[b] += row
        kept = [s[:c] for s, c in zip(seqs, cached)]  # the pending token is not in the cache yet
        ref = CachedModel(model, B, slots)
        ref.prefill(torch.tensor([s + [0] * (max(cached) - len(s)) for s in kept]), cached)
    assert rejected > 0, "test is vacuous: no draft was rejected"
    assert torch.equal(state.cache.valid, ref.cache.valid)
    valid = ref.cache.valid[0].view(1, B, 1, slots, 1)
    for mine, theirs in ((state.cache.k, ref.cache.k), (state.cache.v, ref.cache.v)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(mine * ~valid) == 0


@pytest.mark.parametrize("align", [False, True])
def test_speculative_sampling_keeps_the_dense_distribution(grown, align):
    """The second new token (drafted, then accepted or resampled) follows the dense model's p; aligned,
    every row keeps the fewest drafts (none of 20,000), and the accepted ones are its second token."""
    model = grown()
    n = 20000
    out = generate(model, [[1, 2, 3]] * n, routing=model.routing, max_new_tokens=3, decoder="speculative", k=1, temperature=1.0, seed=0,
                   align=align)
    assert (0 < out.accepted < out.drafted) if not align else out.accepted == 0
    first = torch.tensor([t[0] for t in out.tokens])
    t0 = int(first.mode().values)  # condition on the most common first token
    rows = (first == t0).nonzero().flatten()
    second = torch.tensor([out.tokens[i][1] for i in rows.tolist()])
    freq = torch.bincount(second, minlength=model.vocab_size).float() / len(rows)
    with torch.no_grad():
        p = model(torch.tensor([[1, 2, 3, t0]]))[0, -1].softmax(-1)
    assert len(rows) > 3000
    assert 0.5 * (freq - p).abs().sum() < 0.05  # total variation (noise ~0.02); the draft alone is far off:
    with torch.no_grad():
        q = model(torch.tensor([[1, 2, 3, t0]]), layer=2)[0, -1].softmax(-1)
    assert 0.5 * (q - p).abs().sum() > 0.15, float(0.5 * (q - p).abs().sum())


# -- sampling and stopping --------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["dense", "routed", "speculative"])
def test_sampling_is_reproducible_with_a_seed(grown, decoder):
    model = grown(policy="propagate", threshold=0.3)
    opts = dict(max_new_tokens=10, decoder=decoder, temperature=1.0, top_k=8, top_p=0.9)
    a = generate(model, PROMPTS, routing=model.routing, seed=7, **opts)
    b = generate(model, PROMPTS, routing=model.routing, seed=7, **opts)
    c = generate(model, PROMPTS, routing=model.routing, seed=8, **opts)
    assert a.tokens == b.tokens and a.exited == b.exited
    assert a.tokens != c.tokens


@pytest.mark.parametrize("decoder", ["dense", "routed", "speculative"])
def test_one_new_token_and_a_full_context(grown, decoder):
    model = grown(policy="skip", threshold=0.3)
    long_prompt = [t % 16 for t in range(MAX_LEN - 3)]
    one = generate(model, PROMPTS, routing=model.routing, max_new_tokens=1, decoder=decoder)
    assert [len(t) for t in one.tokens] == [1, 1, 1]
    full = generate(model, [long_prompt, [1]], routing=model.routing, max_new_tokens=3, decoder=decoder)  # 21 + 3 = max_seq_len
    assert full.tokens[0] == generate(model, [long_prompt], routing=model.routing, max_new_tokens=3, decoder=decoder).tokens[0]
    assert [len(t) for t in full.tokens] == [3, 3]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probabilities ~ .64 .24 .09 .03
    assert probabilities(logits, 1.0, top_k=2)[0].nonzero().flatten().tolist() == [0, 1]
    assert probabilities(logits, 1.0, top_p=0.5)[0].nonzero().flatten().tolist() == [0]
    assert probabilities(logits, 1.0, top_p=0.8)[0].nonzero().flatten().tolist() == [0, 1]
    torch.testing.assert_close(probabilities(logits, 1.0)[0], logits.exp()[0])
    torch.testing.assert_close(probabilities(logits, 0.5)[0], (2 * logits).softmax(-1)[0])


def test_generate_restores_training_mode(grown):
    model = grown().train()
    generate(model, PROMPTS, routing=model.routing, max_new_tokens=2)
    assert model.training


def test_stop_token_ends_a_row(grown):
    model = grown()
    full = generate(model, PROMPTS, routing=model.routing, max_new_tokens=10)
    stop = full.tokens[0][2]
    for decoder in ("dense", "speculative"):
        out = generate(model, PROMPTS, routing=model.routing, max_new_tokens=10, decoder=decoder, stop_token=stop)
        for row, ref in zip(out.tokens, full.tokens):
            cut = ref.index(stop) + 1 if stop in ref else len(ref)
            assert row == ref[:cut]


# -- input checks -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,key", [
    (dict(prompts=[[1, 2], []]), "generate.prompt"),
    (dict(prompts=[[1, 99]]), "generate.prompt"),
    (dict(max_new_tokens=0), "generate.max_new_tokens"),
    (dict(max_new_tokens=MAX_LEN), "generate.max_new_tokens"),
    (dict(k=0), "generate.k"),
    (dict(decoder="beam"), "generate.decoders"),
    (dict(temperature=-1.0), "generate.temperature"),
    (dict(top_k=0), "generate.top_k"),
    (dict(top_p=0.0), "generate.top_p"),
])
def test_bad_input_raises_naming_the_key(grown, kwargs, key):
    args = dict(prompts=PROMPTS, max_new_tokens=4, decoder="dense", k=2)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=key) as err:
        generate(grown(), args.pop("prompts"), **args)
    assert "\n" not in str(err.value)
    if key == "generate.max_new_tokens" and kwargs["max_new_tokens"] == MAX_LEN:
        assert str(MAX_LEN) in str(err.value)  # names the limit
    if key == "generate.decoders":
        assert "dense, routed, speculative" in str(err.value)


def test_routed_needs_a_threshold(make_tiny_model, grown):
    with pytest.raises(ValueError, match="generate.decoders"):
        generate(make_tiny_model(num_layers=2, max_seq_len=MAX_LEN), PROMPTS, max_new_tokens=2, decoder="routed")
    for routing in (None, Routing()):  # a grown model, but no threshold to route at
        with pytest.raises(ValueError, match="generate.decoders: routed needs a routing"):
            generate(grown(), PROMPTS, max_new_tokens=2, decoder="routed", routing=routing)
    with pytest.raises(ValueError, match="generate.adaptive"):
        generate(grown(), PROMPTS, max_new_tokens=2, decoder="speculative", adaptive=True)


# -- the report -----------------------------------------------------------------------------------------------

class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_run_generation_writes_samples_and_metrics(grown, tmp_path):
    model = calibrated(grown(policy="skip"))
    metrics = run_generation(model, CharTokenizer(), PROMPTS, k_values=(1, 3), max_new_tokens=8,
                             temperature=0.0, top_k=None, top_p=None, seed=0, adaptive=True, routing=model.routing,
                             out_dir=tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert set(on_disk) == {"settings", "dense", "routed", "speculative_k1", "speculative_k3",
                            "speculative_adaptive_k1", "speculative_adaptive_k3"}
    assert on_disk["speculative_adaptive_k3"]["agreement_with_dense"] == 1.0
    assert on_disk["dense"]["agreement_with_dense"] == 1.0
    assert on_disk["speculative_k1"]["agreement_with_dense"] == 1.0  # greedy speculative is exact
    assert on_disk["speculative_k3"]["agreement_with_dense"] == 1.0
    assert 0 < on_disk["routed"]["exit_share"] < 1
    assert 0 < on_disk["speculative_k3"]["acceptance_rate"] < 1
    assert on_disk["dense"]["time_over_dense"] == 1.0
    assert metrics["routed"]["tokens"] == 3 * 8
    samples = (tmp_path / "samples.md").read_text()
    assert samples.count("## Prompt") == 3 and "[" in samples.split("**routed**")[1]
    assert CharTokenizer().decode(PROMPTS[1]) in samples


def test_generation_in_batches_of_one_is_each_prompt_alone(grown):
    """generate.batch_size=1: every prompt decoded alone, its tokens and drafts as when decoded alone, the counts
    and seconds summed over the batches; the settings (k, adaptive) are not summed."""
    model = calibrated(grown(policy="skip"))
    kw = dict(max_new_tokens=6, decoder="speculative", k=3, adaptive=True, routing=model.routing)
    alone = [generate(model, [p], **kw) for p in PROMPTS]
    batched = generate_batched(model, PROMPTS, 1, **kw)
    assert batched.tokens == [a.tokens[0] for a in alone] and batched.exited == [a.exited[0] for a in alone]
    assert (batched.drafted, batched.accepted) == (sum(a.drafted for a in alone), sum(a.accepted for a in alone))
    for key in ("positions_verified", "rounds", "exit_heads"):
        assert batched.extra[key] == sum(a.extra[key] for a in alone) > 0
    assert batched.extra["k"] == 3 and batched.extra["adaptive"] is True
    assert generate_batched(model, PROMPTS, 2, **kw).tokens == batched.tokens
    assert generate_batched(model, PROMPTS, None, **kw).tokens == generate(model, PROMPTS, **kw).tokens
    with pytest.raises(ConfigError, match=r"^generate.batch_size=0 must be an integer >= 1, or null$"):
        generate_batched(model, PROMPTS, 0, **kw)


def test_test_prompts_are_deterministic():
    import numpy as np

    tokens = np.arange(100, dtype=np.uint16)
    a = pick_prompts(tokens, 5, 7, seed=1)
    assert a == pick_prompts(tokens, 5, 7, seed=1) and a != pick_prompts(tokens, 5, 7, seed=2)
    assert all(len(p) == 7 and p == list(range(p[0], p[0] + 7)) for p in a)
    assert len({p[0] for p in a}) == 5
    with pytest.raises(ValueError, match="generate.prompt_len"):
        pick_prompts(tokens, 5, 99, seed=0)


def test_agreement_counts_matching_positions():
    assert agreement([[1, 2, 3], [4]], [[1, 0, 3], [4]]) == 0.75


def test_bench_generation_rows(tmp_path):
    from conftest import load_script

    from lego.cost import routed_macs

    bench = load_script("bench")
    result = bench.main(["--only", "gen", "--gen-models", "tiny", "--gen-batches", "2", "--gen-tokens", "4",
                         "--gen-prompt", "4", "--gen-k", "2", "--gen-rounds", "1", "--vocab", "64",
                         "--gen-adaptive"])
    assert result["rows"] == [] and "threshold" not in result
    rows = {r["case"]: r for r in result["generation"]["rows"]}
    assert set(rows) == {"dense", "routed full", "routed propagate", "routed skip", "speculative k=2",
                         "speculative k<=2 adaptive", "speculative k=2 upper=0"}
    assert all(rows[c]["ragged_chunks"] == 0 for c in rows if c.startswith("speculative"))  # one prompt length
    assert rows["dense"]["time_ratio"] == 1.0 and rows["speculative k=2 upper=0"]["acceptance"] == 1.0
    r = rows["routed skip"]
    assert r["flop_ratio"] == pytest.approx(routed_macs(
        dim=128, ffn_mult=4, ffn="gelu", vocab_size=64, seq_len=8, exit_layer=2, num_layers=4,
        shallow_ratio=r["exit_share"], policy="skip")["flop_cost"])
    assert all(0 <= o["outside_matmul"] < 1 for o in result["generation"]["overhead"])
    step = result["generation"]["steps"][0]
    assert 0 < step["c_flops"] < 1 and step["c_wall"] > 0 and 0 < step["head_share_flops"] < step["c_flops"]
    assert step["verify_positions"] == 3 and step["verify_ratio"] > 0


def learned(model, seed=0):
    """Route `model` by a random learned router (`RouterProbe`) at the median of its scores over dense greedy text."""
    from lego.heads import RouterProbe

    g = torch.Generator().manual_seed(seed)
    C = model.dim
    probe = RouterProbe(torch.zeros(C), torch.ones(C), torch.randn(C, generator=g), 0.0)
    d = generate(model, PROMPTS, routing=model.routing, max_new_tokens=12)
    with torch.no_grad():
        scores = torch.cat([probe(model.hidden_states(torch.tensor([p + t]), upto=model.exit_layer)[-1][0])
                            for p, t in zip(PROMPTS, d.tokens)])
    model.routing = model.routing.learned(probe, float(scores.median()))
    return model


@pytest.mark.parametrize("policy", ["full", "propagate", "skip"])
def test_learned_router_decoding_equals_its_teacher_forced_routed_forward(grown, policy):
    """A learned router routes decoding, the teacher-forced forward and Trainer.evaluate alike, by the exit's
    hidden state (not its logits): the same tokens exit everywhere."""
    model = learned(grown(policy=policy, pos="rope"))
    out = generate(model, PROMPTS, routing=model.routing, max_new_tokens=12, decoder="routed", return_logits=True)
    assert 0.2 < out.exit_share < 0.8, f"test is vacuous: exit share {out.exit_share}"
    by_logits = model.routing
    for b, p in enumerate(PROMPTS):
        seq = torch.tensor([p + out.tokens[b]])
        expected, easy = teacher_forced_logits(model, seq, model.routing)
        torch.testing.assert_close(out.logits[b], expected[0, len(p) - 1:-1], atol=2e-5, rtol=1e-5)
        assert out.exited[b] == easy[0, len(p) - 1:-1].tolist()
        by_max_prob = replace(by_logits, probe=None)  # the same threshold on max_prob would route other tokens
        assert not torch.equal(teacher_forced_logits(model, seq, by_max_prob)[1], easy)
    x = torch.tensor([p + t for p, t in zip(PROMPTS, out.tokens)][:1])
    cfg = TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=model.routing.threshold, exit_layer=2,
                         upper_context=policy, router_probe=model.routing.probe)
    stats = Trainer(cfg, model.vocab_size, progress=False).evaluate(model, [(x[:, :-1], x[:, 1:])])
    exited = teacher_forced_logits(model, x[:, :-1], model.routing)[1]
    assert stats["shallow_ratio"] == pytest.approx(float(exited.float().mean()),
                                                   abs=0)


def test_adaptive_drafting_with_a_learned_router_keeps_dense_greedy(grown):
    model = learned(grown(pos="rope"))
    dense = generate(model, PROMPTS, routing=model.routing, max_new_tokens=14)
    spec = generate(model, PROMPTS, routing=model.routing, max_new_tokens=14, decoder="speculative", k=4, adaptive=True)
    assert spec.tokens == dense.tokens
