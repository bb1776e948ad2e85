"""data=chains (lego.chains): programs whose every byte carries the number of lookups it needs, labels that
follow every window, batch and shard, and the one-line answers to bad settings."""

import os
import random

import numpy as np
import pytest
import torch
from conftest import lego_run

from lego.batches import make_loader
from lego.chains import FORMAT, TEXT, UNPREDICTABLE, generate, label_name, program, split_rng
from lego.config import ChainsConfig, ConfigError, DataConfig
from lego.data import load_corpus

SMALL = dict(num_vars=6, depth_probs=[0.2, 0.3, 0.3, 0.2], queries=1, train_lines=300, eval_lines=60)


def resolve(line: str, assign: str = "="):
    """Brute force, from the text alone: per character, (the label it should carry, the answer when it is one).
    A query's answer is found by following `name=name` bindings to a value, counting the hops."""
    eq = [(assign, FORMAT)] if assign else []
    body = line.rstrip("\n")
    env, out = {}, []
    for n, stmt in enumerate(body.split(";")):
        sep = [(";", FORMAT)] if n + 1 < len(body.split(";")) else [("\n", FORMAT)]
        if stmt.startswith("?"):
            name, answer = stmt[1], stmt[-1]
            assert len(stmt) == 3 + len(assign) and stmt[2:2 + len(assign)] == assign, line
            hops, x = 1, env[name]
            while x in env:
                x, hops = env[x], hops + 1
            assert x == answer, (line, name, x, answer)
            out += [("?", FORMAT), (name, UNPREDICTABLE), *eq, (answer, hops)]
        else:
            assert len(stmt) == 2 + len(assign) and stmt[1:1 + len(assign)] == assign, line
            lhs, rhs = stmt[0], stmt[-1]
            assert lhs not in env and (len(rhs) == 1), line  # every variable is bound once
            env[lhs] = rhs
            out += [(lhs, UNPREDICTABLE), *eq, (rhs, UNPREDICTABLE)]
        out += sep
    return out


def test_generator_is_deterministic_per_seed_and_split():
    c = ChainsConfig(**SMALL)
    assert generate(c, "train")[0] == generate(c, "train")[0]
    assert np.array_equal(generate(c, "train")[1], generate(c, "train")[1])
    assert generate(c, "train")[0][:50] != generate(c, "validation")[0][:50]
    assert generate(c, "validation")[0] != generate(c, "test")[0]
    assert generate(ChainsConfig(**{**SMALL, "seed": 1}), "train")[0] != generate(c, "train")[0]


@pytest.mark.parametrize("settings", [SMALL, dict(num_vars=8, depth_probs=[0, 0.5, 0, 0.5], queries=2,
                                                   values="xyz", names="ABCDEFGH", train_lines=200, eval_lines=10),
                                      dict(SMALL, assign="")])
def test_brute_force_resolver_matches_every_label(settings):
    c = ChainsConfig(**settings)
    rows, labels = generate(c, "train")
    assert len(labels) == sum(len(r.encode()) for r in rows)
    at, hops_seen = 0, set()
    for row in rows:
        expected = resolve(row, c.assign)
        assert "".join(ch for ch, _ in expected) == row
        got = labels[at:at + len(row)].tolist()
        assert got == [lab for _, lab in expected], row
        bound = {stmt[0] for stmt in row.rstrip("\n").split(";") if not stmt.startswith("?")}
        assert len(bound) == c.num_vars and ("=" in row) == (c.assign == "=")  # num_vars distinct variables bound
        assert row.count("?") == c.queries
        hops_seen |= {lab for lab in got if lab > 0}
        at += len(row)
    allowed = {i + 1 for i, p in enumerate(c.depth_probs) if p > 0}
    assert hops_seen == allowed  # every drawable depth occurs, no other


def test_depths_follow_the_distribution():
    c = ChainsConfig(num_vars=4, depth_probs=[0.1, 0.2, 0.3, 0.4], queries=1, train_lines=4000)
    _, labels = generate(c, "train")
    share = np.bincount(labels[labels > 0], minlength=5)[1:] / (labels > 0).sum()
    np.testing.assert_allclose(share, c.depth_probs, atol=0.03)


def test_text_fraction_interleaves_text_lines():
    c = ChainsConfig(**{**SMALL, "text_fraction": 0.5})
    lines = ["To be, or not to be", "", "that is the question"]
    rows, labels = generate(c, "train", lines)
    text_rows = [r for r in rows if "?" not in r]
    assert 0.35 < len(text_rows) / len(rows) < 0.65
    assert text_rows[:3] == ["To be, or not to be\n", "that is the question\n", "To be, or not to be\n"]
    at = 0
    for r in rows:
        n = len(r.encode())
        assert (labels[at:at + n] == TEXT).all() == (r in text_rows)
        at += n
    assert label_name(TEXT) == "text" and label_name(3) == "3 hops"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(DataConfig(name="chains", tokenizer="bytes", seq_len=16,
                                  cache_dir=str(tmp_path_factory.mktemp("cache")), chains=ChainsConfig(**SMALL)))


def test_labels_survive_tokenization_and_the_cache(corpus, tmp_path):
    c = ChainsConfig(**SMALL)
    for split in ("train", "validation", "test"):
        rows, labels = generate(c, split)
        assert bytes(np.asarray(corpus.__dict__[split], dtype=np.uint8)) == "".join(rows).encode()
        assert np.array_equal(corpus.labels[split], labels)
    again = load_corpus(DataConfig(name="chains", tokenizer="bytes", seq_len=16, cache_dir=corpus_cache(corpus),
                                   chains=c, max_train_tokens=100, max_eval_tokens=50))
    assert again.cache_key == corpus.cache_key and len(again.labels["train"]) == 100 == len(again.train)
    assert len(again.labels["test"]) == 50
    other = load_corpus(DataConfig(name="chains", tokenizer="bytes", seq_len=16, cache_dir=str(tmp_path),
                                   chains=ChainsConfig(**{**SMALL, "seed": 3})))
    assert other.cache_key != corpus.cache_key


def corpus_cache(corpus) -> str:
    return str(os.path.dirname(os.path.dirname(corpus.train.filename)))


def _stream_label(corpus, split):
    """{(token position in the stream) -> label}: what every batch must agree with."""
    return np.asarray(corpus.labels[split])


def test_labels_follow_windows_shuffling_epochs_and_shards(corpus):
    tokens, labels = corpus.train, _stream_label(corpus, "train")
    T, W = 16, 17
    kw = dict(shuffle=True, seed=5)
    plain = make_loader(tokens, T, 4, **kw)
    lab = make_loader(tokens, T, 4, labels=labels, **kw)
    for epoch in (0, 3):
        plain.sampler.set_epoch(epoch)
        lab.sampler.set_epoch(epoch)
        for (x0, y0), (x, y, z) in zip(plain, lab):
            assert torch.equal(x0, x) and torch.equal(y0, y) and z.dtype == torch.int8 and z.shape == y.shape
            # each row is a window of the stream: find it by its tokens, check its labels
            for row_x, row_z in zip(x, z):
                starts = [i * W for i in range(len(tokens) // W)
                          if np.array_equal(np.asarray(tokens[i * W:i * W + T]), row_x.numpy())]
                assert any(np.array_equal(labels[s + 1:s + W], row_z.numpy()) for s in starts)
            break
    # torchrun sharding: the ranks' batches are exactly the single process's, labels included
    whole = list(make_loader(tokens, T, 4, labels=labels, **kw))
    shards = [list(make_loader(tokens, T, 4, labels=labels, rank=r, world_size=2, **kw)) for r in (0, 1)]
    merged = [b for pair in zip(*shards) for b in pair] + shards[0][len(shards[1]):]
    assert len(merged) == len(whole)
    for a, b in zip(whole, merged):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    # resume: a fresh loader set to epoch e replays epoch e
    fresh = make_loader(tokens, T, 4, labels=labels, **kw)
    fresh.sampler.set_epoch(2)
    replay = make_loader(tokens, T, 4, labels=labels, **kw)
    for _ in range(3):
        last = list(replay)
    assert all(torch.equal(u, v) for a, b in zip(list(fresh), last) for u, v in zip(a, b))


def test_loaders_of_other_corpora_are_unchanged():
    tokens = np.arange(200) % 16
    batch = next(iter(make_loader(tokens, 8, 4, shuffle=False, seed=0)))
    assert len(batch) == 2
    with pytest.raises(ValueError, match="labels: 3 for 200 tokens"):
        make_loader(tokens, 8, 4, shuffle=False, seed=0, labels=np.zeros(3, dtype=np.int8))


BAD = [
    (dict(num_vars=0), "data.chains.num_vars: 0"),
    (dict(depth_probs=[0.5, 0.4]), "data.chains.depth_probs: [0.5, 0.4] (sum 0.9)"),
    (dict(depth_probs=[0.5, -0.1, 0.6]), "data.chains.depth_probs"),
    (dict(num_vars=3, depth_probs=[0, 0, 0, 1], queries=1), "data.chains.depth_probs: 4 hops x 1 queries need 4"),
    (dict(num_vars=6, depth_probs=[0, 0, 0, 1], queries=2), "data.chains.depth_probs: 4 hops x 2 queries"),
    (dict(text_fraction=1.5), "data.chains.text_fraction: 1.5"),
    (dict(text_fraction=-0.1), "data.chains.text_fraction: -0.1"),
    (dict(assign=":"), "data.chains.assign: ':'"),
    (dict(values="01a"), "data.chains.values: 'a' also in data.chains.names"),
    (dict(values="0;"), "data.chains.values"),
    (dict(num_vars=27), "data.chains.num_vars: 27 variables"),
]


@pytest.mark.parametrize("settings,line", BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_settings_name_the_key(settings, line):
    with pytest.raises(ConfigError) as e:
        DataConfig(name="chains", tokenizer="bytes", chains=ChainsConfig(**settings))
    assert str(e.value).startswith(line) and "allowed: " in str(e.value) and "\n" not in str(e.value)


def test_chains_needs_byte_tokens():
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*allowed: bytes$"):
        DataConfig(name="chains", tokenizer="bpe")
    DataConfig(name="shakespeare", chains=ChainsConfig(num_vars=0))  # other corpora ignore the chains keys


@pytest.mark.parametrize("override,key", [("data.chains.num_vars=0", "data.chains.num_vars"),
                                          ("data.chains.depth_probs=[0.5,0.2]", "data.chains.depth_probs"),
                                          ("data.chains.text_fraction=2", "data.chains.text_fraction")])
def test_lego_run_exits_2_with_one_line(tmp_path, override, key):
    res = lego_run(["debug=tiny", "data=chains", override, f"hydra.run.dir={tmp_path / 'run'}"],
                   env={"LEGO_CACHE_DIR": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith(f"lego-run: error: {key}: "), lines


def test_program_shape():
    line, labels = program(ChainsConfig(num_vars=5, depth_probs=[0, 0, 0, 1], queries=1), random.Random(1))
    assert len(line) == len(labels) and line.endswith("\n") and labels.count(4) == 1


def test_chains_keys_enter_the_science_config_only_when_used():
    from lego.config import ASHEMConfig
    from lego.pipeline.science import science_config

    cfg = ASHEMConfig()
    d = science_config(cfg)
    assert "chains" not in d["data"] and "learned_router" not in d["eval"]  # older run dirs and cache keys hold
    cfg.data.name, cfg.data.tokenizer, cfg.eval.learned_router = "chains", "bytes", True
    d = science_config(cfg)
    assert d["data"]["chains"]["num_vars"] == 8 and d["eval"]["learned_router"] is True


def test_guess_accuracy_is_the_mean_inverse_count_of_values_and_deterministic():
    from lego.chains import guess_accuracy

    c = ChainsConfig(num_vars=4, queries=2, depth_probs=[0.5, 0.5], assign="")
    got = guess_accuracy(c, "validation", 2000)
    assert got == guess_accuracy(c, "validation", 2000) and set(got) == {"1 hops", "2 hops"}
    # by hand: one program, its distinct values, one over their count for each answer
    tiny = ChainsConfig(num_vars=2, queries=2, depth_probs=[1.0], values="01")
    line, _ = program(tiny, split_rng(tiny, "train"))
    assert guess_accuracy(tiny, "train", 1) == {"1 hops": 1 / len({line[2], line[6]})}  # `a=0;b=1;...`
    # 2-hop answers come from programs with fewer distinct values: guessing does better there
    assert 0.33 < got["1 hops"] < got["2 hops"] < 0.5
