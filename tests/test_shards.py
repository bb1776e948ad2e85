"""data=shards and lego-prepare: llm.c / nanoGPT shards, memory-mapped; the prepare command. Offline; ~30 s on 2 cores.

    pytest tests/test_shards.py
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lego.batches import make_loader
from lego.config import ConfigError, DataConfig, ShardsConfig
from lego.data import load_corpus
from lego.prepare import file_documents, main as prepare_main, prepare, split_of
from lego.shards import MAGIC, ShardedTokens, write_shard
from lego.tokenizer import END_OF_TEXT, tokenizer_from_file, train_bpe
from conftest import load_script


def documents(n: int = 120) -> list:
    return [f"document {i}: the {'quick' if i % 3 else 'slow'} brown fox jumps {i * 7 % 13} times." for i in range(n)]


def write_lines(path: Path, docs) -> Path:
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def split_at(tokens: np.ndarray, eot: int) -> list:
    """The documents of a stream that opens every document with `eot`."""
    tokens = np.asarray(tokens)
    assert tokens[0] == eot
    cuts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1:b] for a, b in zip(cuts, [*cuts[1:], len(tokens)])]


def corpus_of(directory, **keys):
    return load_corpus(DataConfig(name="shards", seq_len=8, shards=ShardsConfig(dir=str(directory), **keys)))


@pytest.fixture
def byte_shards(tmp_path):
    """120 line documents through `lego-prepare --tokenizer bytes`, shards of 500 ids, a fifth held out each."""
    docs = documents()
    out = tmp_path / "shards"
    index = prepare(out, docs, "bytes", shard_tokens=500, validation=0.2, test=0.2)
    return out, docs, index


# ---------------------------------------------------------------------------------------- prepare

def test_prepared_shards_round_trip_documents_and_eot(byte_shards):
    out, docs, index = byte_shards
    assert index["eot_id"] == 256 and index["vocab_size"] == 257 and index["dtype"] == "uint16"
    expected = {s: [d for i, d in enumerate(docs) if split_of(i, 0.2, 0.2) == s]
                for s in ("train", "validation", "test")}
    assert [len(v) for v in expected.values()] == [72, 24, 24]
    corpus = corpus_of(out)
    assert corpus.vocab_size == 257 and corpus.tokenizer.decode([256]) == END_OF_TEXT
    for split, want in expected.items():
        tokens = getattr(corpus, split)
        got = [bytes(d.astype(np.uint8)).decode() for d in split_at(tokens, 256)]
        assert got == want, split
        rec = index["splits"][split]
        assert rec["documents"] == len(want) and rec["tokens"] == len(tokens) == sum(len(d.encode()) + 1 for d in want)
        assert rec["text_bytes"] == sum(len(d.encode()) for d in want) == corpus.text_bytes[split]
        # llm.c shards of 500 ids, the last one shorter; each header: magic, version 1 (uint16), count
        sizes = [r["tokens"] for r in rec["shards"]]
        assert all(s == 500 for s in sizes[:-1]) and 0 < sizes[-1] <= 500 and sum(sizes) == len(tokens)
        for r in rec["shards"]:
            header = np.fromfile(out / r["file"], dtype="<i4", count=256)
            assert list(header[:3]) == [MAGIC, 1, r["tokens"]] and not header[3:].any()
    assert isinstance(corpus.train, ShardedTokens)  # several shards, one stream


def test_workers_write_the_same_bytes(tmp_path):
    docs = documents(400)
    one = prepare(tmp_path / "one", docs, "bytes", shard_tokens=3000, validation=0.1, test=0.1, workers=1)
    two = prepare(tmp_path / "two", docs, "bytes", shard_tokens=3000, validation=0.1, test=0.1, workers=2)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.bin"))
    assert files == sorted(p.name for p in (tmp_path / "two").glob("*.bin")) and len(files) >= 4
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert one["splits"] == two["splits"]


def test_gpt2_style_bpe_from_local_files(tmp_path):
    """A tiny byte-level BPE saved as tokenizer.json and as vocab.json + merges.txt (GPT-2's two layouts)."""
    docs = documents(60) + ["a text that quotes <|endoftext|> inside it"]
    bpe = train_bpe(iter(docs * 3), vocab_size=300)
    bpe.save(tmp_path / "json")
    (tmp_path / "merges").mkdir()
    bpe.backend.model.save(str(tmp_path / "merges"))
    from_json, from_merges = tokenizer_from_file(str(tmp_path / "json" / "tokenizer.json")), \
        tokenizer_from_file(str(tmp_path / "merges"))
    assert from_json.encode_batch(docs) == from_merges.encode_batch(docs) == bpe.encode_batch(docs)
    index = prepare(tmp_path / "out", docs, str(tmp_path / "merges"), validation=0.1, test=0.1, workers=1)
    assert index["eot_id"] == 300 and index["vocab_size"] == 301  # '<|endoftext|>' added as the next id
    corpus = corpus_of(tmp_path / "out")
    texts = [corpus.tokenizer.decode(d.tolist()) for s in ("train", "validation", "test")
             for d in split_at(getattr(corpus, s), 300)]
    assert sorted(texts) == sorted(docs)  # the quoted '<|endoftext|>' stayed text: no extra document


def test_file_documents_by_line_file_and_row(tmp_path):
    write_lines(tmp_path / "a.txt", ["one", "", "two"])
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n{"text": ""}\n{"text": "four"}\n')
    both = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    assert list(file_documents(both, "text", False)) == ["one", "two", "three", "four"]
    assert list(file_documents([tmp_path / "a.txt"], "text", True)) == ["one\n\ntwo\n"]


def test_hub_source_streams(tmp_path, monkeypatch, capsys):
    """--hf hands load_dataset streaming=True and reads the text column (a stand-in; nothing downloads)."""
    import datasets

    seen = {}

    def fake_load(path, name, split, streaming):
        seen.update(path=path, name=name, split=split, streaming=streaming)
        return iter([{"text": d} for d in documents(50)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert prepare_main([str(tmp_path / "out"), "--hf", "some/dataset", "--hf-split", "train",
                         "--validation-fraction", "0.1", "--test-fraction", "0.1", "--workers", "1"]) == 0
    assert seen == dict(path="some/dataset", name=None, split="train", streaming=True)
    assert json.loads((tmp_path / "out" / "shards.json").read_text())["documents"] == 50


# ------------------------------------------------------------------------------------ formats

def test_llmc_uint32_and_nanogpt_raw_read_alike(tmp_path):
    rng = np.random.default_rng(0)
    ids = {s: rng.integers(0, 256, n).astype(np.uint32) for s, n in (("train", 3000), ("val", 500), ("test", 400))}
    (tmp_path / "llmc").mkdir()
    (tmp_path / "raw").mkdir()
    for split, t in ids.items():
        write_shard(tmp_path / "llmc" / f"c_{split}_000000.bin", t)  # version 2: uint32
        write_shard(tmp_path / "raw" / f"{split}.bin", t.astype(np.uint16), fmt="raw")  # nanoGPT's train.bin
    assert np.fromfile(tmp_path / "llmc" / "c_train_000000.bin", dtype="<i4", count=3)[1] == 2
    a = corpus_of(tmp_path / "llmc", tokenizer="bytes")
    b = corpus_of(tmp_path / "raw", tokenizer="bytes")  # auto: no magic, so raw uint16
    c = corpus_of(tmp_path / "raw", tokenizer="bytes", format="raw", dtype="uint16")
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        np.testing.assert_array_equal(getattr(a, split), ids[name])
        np.testing.assert_array_equal(getattr(b, split), ids[name])
        np.testing.assert_array_equal(getattr(c, split), ids[name])
    assert a.train.dtype == np.uint32 and b.train.dtype == np.uint16 and a.vocab_size == 256
    assert isinstance(a.train, np.memmap)  # a split of one shard is its memmap, the in-memory corpora's path


def test_sharded_tokens_read_as_one_stream():
    parts = [np.arange(0, 7, dtype=np.uint16), np.arange(7, 10, dtype=np.uint16), np.arange(10, 25, dtype=np.uint16)]
    s, ref = ShardedTokens(parts), np.arange(25)
    assert len(s) == 25 and s[8] == 8 and s[-1] == 24 and list(s[5:12]) == list(range(5, 12))
    assert isinstance(s[11:20], np.ndarray) and list(s[11:20]) == list(range(11, 20))  # inside one part
    np.testing.assert_array_equal(np.asarray(s[3:]), ref[3:])
    np.testing.assert_array_equal(s.windows([0, 2, 3], 6), ref[:24].reshape(4, 6)[[0, 2, 3]])
    np.testing.assert_array_equal(s.windows([5, 1, 2, 0], 4), ref[:24].reshape(6, 4)[[5, 1, 2, 0]])  # 1, 2 straddle
    # a loader over the shards gives the batches of a loader over their concatenation
    for shuffle in (False, True):
        a = list(make_loader(s, 4, 2, shuffle=shuffle, seed=1))
        b = list(make_loader(ref.astype(np.uint16), 4, 2, shuffle=shuffle, seed=1))
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------------- corpus key

def test_corpus_key_follows_shard_metadata_not_tokens(byte_shards):
    out, _, _ = byte_shards
    key = corpus_of(out).cache_key
    assert corpus_of(out).cache_key == key
    shard = out / "train_000001.bin"
    st = shard.stat()
    # an id changed in place, size and mtime put back: the key reads no id, so it cannot see this
    with open(shard, "r+b") as f:
        f.seek(1024 + 10)
        f.write(b"x")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert corpus_of(out).cache_key == key
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten: a new mtime
    assert corpus_of(out).cache_key != key
    (out / "train_000001.bin").rename(out / "train_000009.bin")  # the shard index (names, order) counts too
    assert corpus_of(out).cache_key != key


# ------------------------------------------------------------------------------------ bad input

def test_bad_shards_name_the_key(tmp_path, byte_shards):
    out, _, _ = byte_shards

    def fails(key, directory=out, **keys):
        with pytest.raises(ConfigError) as e:
            corpus_of(directory, **keys)
        msg = str(e.value)
        assert msg.startswith(f"data.shards.{key}: ") and "allowed: " in msg and "\n" not in msg, msg

    fails("dir", tmp_path / "nowhere")
    fails("test", test="*nothing*.bin")
    fails("validation", validation="*.bin")  # shares files with the train glob
    fails("format", format="raw")  # llm.c headers read as raw
    fails("vocab_size", vocab_size=200)  # below the tokenizer's 257
    fails("tokenizer", tokenizer=str(tmp_path / "no-tokenizer.json"))
    with pytest.raises(ConfigError, match=r"^data\.shards\.format: unknown format 'npy'; allowed: auto, llmc, raw$"):
        DataConfig(name="shards", shards=ShardsConfig(dir=str(out), format="npy"))
    with pytest.raises(ConfigError, match=r"^data\.shards\.dir: data=shards needs"):
        DataConfig(name="shards")
    # a wrong magic in an llm.c set, a truncated shard, an id beyond the vocabulary (no index to read it from)
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "val", "test"):
        write_shard(bad / f"{split}.bin", np.arange(300, dtype=np.uint16) % 250)
    fails("vocab_size", bad, tokenizer="bytes", vocab_size=100)
    raw = np.arange(300, dtype=np.uint16).tobytes()
    (bad / "val.bin").write_bytes(np.array([MAGIC + 1, 1, 300], "<i4").tobytes() + bytes(1012) + raw)
    fails("format", bad, tokenizer="bytes")
    (bad / "val.bin").write_bytes(np.array([MAGIC, 1, 301], "<i4").tobytes() + bytes(1012) + raw)
    fails("dir", bad, tokenizer="bytes")
    (bad / "val.bin").write_bytes(np.array([MAGIC, 3, 300], "<i4").tobytes() + bytes(1012) + raw)
    fails("format", bad, tokenizer="bytes")


def test_lego_run_bad_shards_is_one_line_exit_2(tmp_path):
    from conftest import TINY, lego_run

    res = lego_run([*TINY, "data=shards", f"data.shards.dir={tmp_path / 'nowhere'}", "hydra.run.dir=run"],
                   cwd=tmp_path, env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 2
    assert "data.shards.dir: no such directory" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args, flag", [
    (["--files", "{tmp}/none/*.txt"], "--files"),
    (["--files", "{tmp}/a.txt", "--tokenizer", "{tmp}/missing.json"], "--tokenizer"),
    (["--files", "{tmp}/a.txt", "--validation-fraction", "1.5"], "--validation-fraction"),
    (["--files", "{tmp}/a.txt", "--validation-fraction", "0.001"], "--validation-fraction"),  # 40 documents
    (["--files", "{tmp}/a.csv"], "--files"),
])
def test_prepare_bad_input_is_one_line_exit_2(tmp_path, capsys, args, flag):
    write_lines(tmp_path / "a.txt", documents(40))
    (tmp_path / "a.csv").write_text("x\n")
    assert prepare_main([str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in args], "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lego-prepare: error: {flag}: ") and "allowed: " in err and "\n" not in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_prepare_refuses_a_directory_with_files(tmp_path, capsys):
    write_lines(tmp_path / "a.txt", documents(40))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.bin").write_bytes(b"1")
    assert prepare_main([str(tmp_path / "out"), "--files", str(tmp_path / "a.txt"), "--workers", "1"]) == 2
    assert capsys.readouterr().err.startswith("lego-prepare: error: OUT: ")


# ------------------------------------------------------------------------------------ a whole run

@pytest.mark.slow
def test_lego_run_trains_from_prepared_shards(tmp_path):
    """`lego-prepare` on Shakespeare's lines, then `lego-run data=shards debug=tiny model.vocab_multiple=64`."""
    from conftest import TINY, lego_run
    from lego.data import _shakespeare

    lines = [ln for play in _shakespeare()["train"][:3] for ln in play.splitlines() if ln.strip()]
    write_lines(tmp_path / "plays.txt", lines)
    assert prepare_main([str(tmp_path / "shards"), "--files", str(tmp_path / "plays.txt"), "--shard-tokens", "20000",
                         "--validation-fraction", "0.1", "--test-fraction", "0.1", "--workers", "2"]) == 0
    assert len(list((tmp_path / "shards").glob("train_*.bin"))) > 1  # the run reads several shards as one stream
    res = lego_run([*TINY, "data=shards", f"data.shards.dir={tmp_path / 'shards'}", "model.vocab_multiple=64",
                    "eval.standard_baseline=false", "hydra.run.dir=run"],
                   cwd=tmp_path, env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["ppl"]) and metrics["ppl"] < 257  # learned something beyond uniform over 257 ids
    state = torch.load(tmp_path / "run" / "phase1" / "model.pt", map_location="cpu", weights_only=False)
    assert state["model_args"]["vocab_size"] == 320  # 257 padded to a multiple of 64
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["science_config"]["data"]["shards"]["dir"] == str(tmp_path / "shards")


def test_bench_shards_script_prints_its_table(tmp_path, capsys):
    """scripts/bench_shards.py at toy sizes (a smoke test; benchmarks are never timed assertions)."""
    bench = load_script("bench_shards")
    result = bench.main(["--tokens", "200000", "--shard-tokens", "60000", "--workers", "1", "--bpe-vocab", "300",
                         "--bpe-chars", "50000", "--batches", "3", "--steps", "2", "--model-steps", "1",
                         "--rounds", "1", "--out", str(tmp_path / "b.json")])
    cases = [r["case"] for r in result["rows"]]
    assert cases[:2] == ["prepare bytes, 1 worker(s)", "prepare BPE 300, 1 worker(s)"]
    assert {"loader 32x128, shards", "train debug=tiny, shards", "train model=tiny, RAM"} <= set(cases)
    assert result["train_shards"] > 1 and json.loads((tmp_path / "b.json").read_text())["rows"]
    assert "| train model=tiny, shards" in capsys.readouterr().out


def test_gpt2_small_preset_runs_two_steps_on_cpu_shrunk(tmp_path):
    """`experiment=gpt2_small` (12 x 768, T 1024, bf16 + compile on CUDA) composes, and with the shape, context and
    device shrunk on the command line trains from prepared shards: 2 phase-1 steps of 2 micro-batches each."""
    from conftest import compose_config, lego_run

    from lego.cli import to_config

    cfg = to_config(compose_config(["experiment=gpt2_small", "data.shards.dir=somewhere"]))
    assert (cfg.model.dim, cfg.model.num_heads, cfg.model.max_seq_len, cfg.blocks) == (768, 12, 1024, [6, 12])
    assert (cfg.model.precision, cfg.model.compile, cfg.model.vocab_multiple, cfg.device) == ("bf16", True, 64, "cuda")
    assert cfg.data.batch_size * cfg.data.seq_len * cfg.phase1.grad_accum == 524_288
    prepare(tmp_path / "shards", documents(400), "bytes", shard_tokens=4000, validation=0.1, test=0.1)
    shrunk = ["experiment=gpt2_small", f"data.shards.dir={tmp_path / 'shards'}", "device=cpu", "num_threads=1",
              "model.precision=fp32", "model.compile=false", "model.dim=32", "model.num_heads=2",
              "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=2", "data.eval_batch_size=8",
              "data.val_check_tokens=512", "data.max_eval_tokens=2048", "blocks=[1,2]", "phase1.grad_accum=2",
              "phase2.grad_accum=2", "phase1.max_epochs=1", "phase1.epoch_steps=2", "phase1.budget_fraction=null",
              "phase1.warmup_steps=1", "phase2.max_epochs=1", "phase2.epoch_steps=2", "phase2.warmup_steps=1",
              "eval.standard_baseline=false", "stages=[phase1]", "progress=false", "hydra.run.dir=run"]
    res = lego_run(shrunk, cwd=tmp_path, env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "phase1" / "result.json").read_text())
    assert result["steps"] == 2 and result["tokens"] == 2 * 2 * 2 * 32  # steps x grad_accum x batch x T
