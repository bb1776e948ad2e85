"""lego.data: corpora, tokenizers, the token cache, loaders. Offline; ~20 s on 2 cores.

    pytest tests/test_data.py
"""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

import lego.data as data
from lego.batches import make_loader
from lego.config import DataConfig
from lego.data import load_corpus, unigram_perplexity
from lego.tokenizer import byte_tokenizer, load_tokenizer
from conftest import load_script

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Every test gets its own token cache and Hugging Face datasets cache."""
    import datasets

    monkeypatch.setenv("LEGO_CACHE_DIR", str(tmp_path / "lego-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    cache = tmp_path_factory.mktemp("shakespeare-cache")
    return load_corpus(DataConfig(vocab_size=512, cache_dir=str(cache)))


def lines(split: str, n: int = 300) -> list:
    return [f"{split} line {i}: the {'quick' if i % 3 else 'slow'} brown fox {i * 7 % 13}."
            for i in range(n)]


def write_txt(directory: Path, rows_by_split: dict) -> dict:
    files = {}
    for split, rows in rows_by_split.items():
        files[f"{split}_files"] = [str(directory / f"{split}.txt")]
        Path(files[f"{split}_files"][0]).write_text("\n".join(rows) + "\n")
    return files


def window_hashes(tokens: np.ndarray, width: int) -> np.ndarray:
    """A 64-bit polynomial hash of every length-`width` window, at every offset."""
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.uint64), width)
    h = np.zeros(len(windows), dtype=np.uint64)
    for i in range(width):
        h = h * np.uint64(1_000_003) + windows[:, i]
    return h


# ------------------------------------------------------------------- built-in corpora

def test_shakespeare_splits_are_real_text_and_share_no_sequence(shakespeare):
    c = shakespeare
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.uint16
    assert len(c.train) > 10 * len(c.test) > 0 and len(c.validation) > 0
    assert c.vocab_size == c.tokenizer.vocab_size == 512
    assert int(max(c.train.max(), c.test.max())) < c.vocab_size
    head = c.tokenizer.decode(c.test[:40])  # test starts with Hamlet, markup stripped
    assert head.startswith("BERNARDO:\nWho's there?") and "**" not in head
    # No 32-token sequence the test loader yields occurs anywhere in the training stream.
    seq = 31
    train_h = window_hashes(c.train, seq + 1)
    inputs, targets = next(iter(make_loader(c.test, seq, 10_000, shuffle=False, seed=0)))
    test_seqs = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()
    test_h = window_hashes(test_seqs.reshape(-1), seq + 1)[:: seq + 1]
    assert len(test_h) == len(c.test) // (seq + 1)
    assert not np.isin(test_h, train_h).any()
    assert np.isin(window_hashes(c.train[5000:5100], seq + 1), train_h).all()  # the check can fire


def test_kjv_loads_by_whole_books(tmp_path):
    c = load_corpus(DataConfig(name="kjv", tokenizer="bytes", cache_dir=str(tmp_path)))
    text = {s: c.tokenizer.decode(getattr(c, s)) for s in data.SPLITS}
    assert text["test"].startswith("Judges\n\nNow after the death of Joshua")
    assert text["train"].startswith("Genesis\n\nIn the beginning God created")
    for book in data.KJV_HELD_OUT["validation"] + data.KJV_HELD_OUT["test"]:
        assert f"\n{book}\n\n" not in "\n" + text["train"]
    assert c.text_bytes["train"] == len(c.train)  # bytes tokenizer: one token per byte


def test_play_text_keeps_dialogue_and_drops_markup():
    markdown = ("# Play\n\n## ACT I\n\n_Enter A and B_\n\n**A**  \nFirst line,  \nsecond line.\n\n"
                "**B**  \n_\\[Aside]_  \nA \\-- dash.\n\n*Exit A*\n\nStill B.\n")
    assert data.play_text(markdown) == "A:\nFirst line,\nsecond line.\n\nB:\nA -- dash.\nStill B.\n"


# -------------------------------------------------------------- local files and the hub path

@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_text_files_round_trip(tmp_path, suffix):
    files = {}
    for split in data.SPLITS:
        path, rows = tmp_path / f"{split}{suffix}", lines(split)
        if suffix == ".txt":
            path.write_text("\n".join(rows) + "\n")
        elif suffix == ".jsonl":
            path.write_text("".join(json.dumps({"body": r, "id": i}) + "\n" for i, r in enumerate(rows)))
        else:
            pq.write_table(pa.table({"body": rows}), path)
        files[f"{split}_files"] = [str(path)]
    column = "text" if suffix == ".txt" else "body"
    c = load_corpus(DataConfig(name="text_files", tokenizer="bytes", text_column=column, seq_len=16,
                               **files))
    for split in data.SPLITS:
        assert c.tokenizer.decode(getattr(c, split)) == "".join(r + "\n" for r in lines(split))


def test_text_files_sliced_single_file(tmp_path):
    files = write_txt(tmp_path, {"train": lines("all", 1000)})
    cfg = DataConfig(name="text_files", tokenizer="bytes", seq_len=16, train_split="train[:80%]",
                     validation_split="train[80%:90%]", test_split="train[90%:]", **files)
    c = load_corpus(cfg)
    text = {s: c.tokenizer.decode(getattr(c, s)) for s in data.SPLITS}
    assert text["train"] + text["validation"] + text["test"] == "".join(r + "\n" for r in lines("all", 1000))
    assert text["test"].startswith("all line 900:")


def write_wikitext_mirror(root: Path) -> dict:
    """A local copy of the hub's Salesforce/wikitext layout: README configs + parquet shards."""
    rows = {}
    for split in data.SPLITS:
        rows[split] = ["", f" = {split.title()} article = \n", ""] + [f" {r} \n" for r in lines(split, 100)]
        shard = root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": rows[split]}), shard)
    configs = "".join(f"  - split: {s}\n    path: wikitext-2-raw-v1/{s}-*\n" for s in data.SPLITS)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n{configs}---\n")
    return rows


def test_wikitext_preset_on_a_local_mirror(tmp_path):
    rows = write_wikitext_mirror(tmp_path / "wikitext")
    c = load_corpus(DataConfig(name="wikitext2", path=str(tmp_path / "wikitext"), vocab_size=300,
                               seq_len=16))
    for split in data.SPLITS:  # empty rows dropped, every other row kept byte for byte
        assert c.tokenizer.decode(getattr(c, split)) == "".join(r for r in rows[split] if r)
    assert c.vocab_size <= 300
    with pytest.raises(ValueError, match=r"^data\.test_split: Unknown split"):
        load_corpus(DataConfig(name="wikitext2", path=str(tmp_path / "wikitext"), test_split="dev"))
    with pytest.raises(ValueError, match=r"^data\.config_name: "):
        load_corpus(DataConfig(name="hf", path=str(tmp_path / "wikitext"), config_name="nope"))


# ----------------------------------------------------------------------------- cache

def tiny_text_files(tmp_path, **overrides) -> DataConfig:
    files = write_txt(tmp_path, {s: lines(s) for s in data.SPLITS})
    return DataConfig(**{"name": "text_files", "vocab_size": 300, "seq_len": 16, **files, **overrides})


def test_second_load_is_served_from_cache(tmp_path, monkeypatch):
    cfg = tiny_text_files(tmp_path)
    first = load_corpus(cfg)

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenizer ran on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(data, "train_bpe", must_not_run)
        m.setattr(data.Tokenizer, "encode_batch", must_not_run)
        second = load_corpus(cfg)
    assert second.cache_key == first.cache_key
    for split in data.SPLITS:
        np.testing.assert_array_equal(getattr(second, split), getattr(first, split))
    assert str(tmp_path / "lego-cache") in str(second.train.filename)  # LEGO_CACHE_DIR honoured
    assert load_corpus(tiny_text_files(tmp_path, tokenizer="bytes")).cache_key != first.cache_key


def test_changed_text_gets_a_new_cache_entry(tmp_path):
    cfg = tiny_text_files(tmp_path)
    first = load_corpus(cfg)
    with open(cfg.test_files[0], "a") as f:
        f.write("one more line\n")
    second = load_corpus(cfg)
    assert second.cache_key != first.cache_key and len(second.test) > len(first.test)


def test_killed_build_leaves_no_trusted_cache(tmp_path, monkeypatch):
    cfg = tiny_text_files(tmp_path)
    real = data._write_tokens

    def dies_after_train(tok, rows, column, dtype, path, desc):
        n = real(tok, rows, column, dtype, path, desc)
        if path.stem != "train":
            raise KeyboardInterrupt  # as if killed halfway through tokenizing
        return n

    monkeypatch.setattr(data, "_write_tokens", dies_after_train)
    with pytest.raises(KeyboardInterrupt):
        load_corpus(cfg)
    # A stale temporary directory, as a SIGKILL would leave it, must not be read either.
    stale = tmp_path / "lego-cache" / ".text_files-bpe-0123.garbage.tmp"
    stale.mkdir(parents=True)
    (stale / "train.bin").write_bytes(b"\0" * 10)
    assert [p.name for p in (tmp_path / "lego-cache").iterdir() if not p.name.startswith(".")] == []
    monkeypatch.setattr(data, "_write_tokens", real)
    c = load_corpus(cfg)
    assert c.tokenizer.decode(c.test) == "".join(r + "\n" for r in lines("test"))


def test_concurrent_builds_of_one_cache(tmp_path, monkeypatch):
    """Another process publishes the same cache while this one is still building: the late
    rename fails and the finished cache is used; nothing half-written remains."""
    cfg = tiny_text_files(tmp_path)
    real_build, raced = data._build, []

    def build_while_another_finishes(cfg_, splits, meta, out, *labels):
        real_build(cfg_, splits, meta, out, *labels)
        if not raced:
            raced.append(True)
            load_corpus(cfg)  # the "other process" wins the race

    monkeypatch.setattr(data, "_build", build_while_another_finishes)
    c = load_corpus(cfg)
    entries = sorted(p.name for p in (tmp_path / "lego-cache").iterdir())
    assert raced and len(entries) == 1 and not entries[0].startswith(".")
    assert c.tokenizer.decode(c.validation) == "".join(r + "\n" for r in lines("validation"))


def test_max_train_tokens_caps_training_only(tmp_path):
    full = load_corpus(tiny_text_files(tmp_path))
    capped = load_corpus(tiny_text_files(tmp_path, max_train_tokens=100))
    assert len(capped.train) == 100 and len(capped.test) == len(full.test)
    np.testing.assert_array_equal(capped.train, full.train[:100])


# --------------------------------------------------------------------------- tokenizers

def test_tokenizers_round_trip_and_save(shakespeare, tmp_path):
    text = "Whát's in a name? 🌹\n  That which we call a rose"
    assert byte_tokenizer().encode(text) == list(text.encode("utf-8"))
    tok = shakespeare.tokenizer
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode("utf-8"))  # BPE merged something
    tok.save(tmp_path / "run")
    again = load_tokenizer(tmp_path / "run")
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    assert again.decode(tok.encode(" the")[:1]) == " the"  # one token reads as text (' the', not 'Ġthe')


def test_byte_tokenizer_encodes_as_its_backend_would():
    """byte_tokenizer() skips the Rust backend (id == UTF-8 byte): the ids are the backend's."""
    tok = byte_tokenizer()
    texts = ["Whát's in a name? 🌹\n  That which we call a rose", "", " \t\n\r x\x00\x7f\u00ff\u0100",
             data._shakespeare()["test"][0][:20000]]
    backend = [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == backend and [tok.encode(t) for t in texts] == backend


# ------------------------------------------------------------------------------ loaders

def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_windows_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = make_loader(tokens, 9, 4, shuffle=False, seed=0)
    got = batches(loader)
    assert len(got) == len(loader) == 25  # 100 windows of 10 tokens, 4 per batch
    x, y = got[0]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (4, 9)
    assert x[1].tolist() == list(range(10, 19)) and y[1].tolist() == list(range(11, 20))
    longer = np.arange(1039, dtype=np.uint16)  # 103 windows and 9 spare tokens
    assert [len(x) for x, _ in make_loader(longer, 9, 4, shuffle=False, seed=0)][-2:] == [4, 3]
    assert len(batches(make_loader(longer, 9, 4, shuffle=False, seed=0, drop_last=True))) == 25


def test_loader_seeding():
    tokens = np.arange(5000, dtype=np.uint16) % 251
    first = make_loader(tokens, 15, 8, shuffle=True, seed=1)
    epoch0, epoch1 = batches(first), batches(first)
    same = make_loader(tokens, 15, 8, shuffle=True, seed=1)
    for (x0, y0), (x1, y1) in zip(epoch0, batches(same)):
        torch.testing.assert_close(x0, x1)
        torch.testing.assert_close(y0, y1)
    other = batches(make_loader(tokens, 15, 8, shuffle=True, seed=2))
    assert not torch.equal(epoch0[0][0], other[0][0])
    assert not torch.equal(epoch0[0][0], epoch1[0][0])  # a new epoch reshuffles
    rows = lambda bs: sorted(tuple(r) for x, _ in bs for r in x.tolist())  # noqa: E731
    assert rows(epoch0) == rows(epoch1) == rows(other)  # every window exactly once per epoch
    same.sampler.set_epoch(1)
    torch.testing.assert_close(batches(same)[3][0], epoch1[3][0])  # resume replays epoch 1


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, key", [
    (dict(name="tiny_shakespeare"), "name"),
    (dict(tokenizer="sentencepiece"), "tokenizer"),
    (dict(vocab_size=200), "vocab_size"),
    (dict(tokenizer="pretrained"), "pretrained_name"),
    (dict(seq_len=1), "seq_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(eval_batch_size=0), "eval_batch_size"),
    (dict(max_train_tokens=10), "max_train_tokens"),
    (dict(name="hf"), "path"),
    (dict(name="hf", path="x", validation_split="train[90%:]"), "train_split"),
    (dict(name="text_files"), "train_files"),
    (dict(name="text_files", train_files=["/no/such/file.txt"]), "train_files"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError) as e:
        DataConfig(**overrides)
    message = str(e.value)
    assert message.startswith(f"data.{key}: ") and "allowed: " in message and "\n" not in message


def test_bad_text_names_the_key(tmp_path):
    files = write_txt(tmp_path, {"train": lines("train"), "validation": lines("validation"), "test": []})
    Path(files["test_files"][0]).write_text("\n\n")
    with pytest.raises(ValueError, match=r"^data\.test_files: the test split .* has no text; allowed"):
        load_corpus(DataConfig(name="text_files", tokenizer="bytes", **files))
    short = write_txt(tmp_path, {"train": lines("train"), "validation": ["a few words"],
                                 "test": lines("test")})
    with pytest.raises(ValueError, match=r"^data\.seq_len: 64 needs 65 tokens .* validation split"):
        load_corpus(DataConfig(name="text_files", tokenizer="bytes", seq_len=64, **short))
    with pytest.raises(ValueError, match=r"^data\.text_column: 'body' is not a column"):
        load_corpus(DataConfig(name="text_files", tokenizer="bytes", text_column="body", **short))
    with pytest.raises(ValueError, match=r"^data\.seq_len: .*allowed"):
        make_loader(np.arange(10, dtype=np.uint16), 10, 1, shuffle=False, seed=0)
    with pytest.raises(ValueError, match=r"^data\.batch_size: "):
        make_loader(np.arange(100, dtype=np.uint16), 10, 0, shuffle=False, seed=0)


# ------------------------------------------------------------------ configs and baseline

@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_data_configs(path):
    text = path.read_text()
    assert text.startswith("# ") and "lego-run" in text.split("\nname:")[0]
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path))
    assert cfg.name == path.stem
    if path.stem in ("hf", "text_files", "shards"):  # need the user's dataset, files or shards
        with pytest.raises(ValueError, match=r"^data\.(path|train_files|shards\.dir): "):
            OmegaConf.to_object(cfg)
    else:
        assert isinstance(OmegaConf.to_object(cfg), DataConfig)


def test_unigram_perplexity():
    # counts with add-one: token 0 -> 3, token 1 -> 2; p(0) = 0.6
    assert unigram_perplexity(np.array([0, 0, 1]), np.array([0]), 2) == pytest.approx(1 / 0.6)
    uniform = np.arange(1000) % 10
    assert unigram_perplexity(uniform, uniform, 10) == pytest.approx(10.0)


def test_corpus_stats_script_prints_the_table(tmp_path, capsys):
    module = load_script("corpus_stats")
    files = write_txt(tmp_path, {s: lines(s) for s in data.SPLITS})
    module.main(["--data", "text_files", "--tokenizer", "bytes", "seq_len=16",
                 *(f"{k}=[{v[0]}]" for k, v in files.items())])
    out = capsys.readouterr().out
    test_row = next(line.split() for line in out.splitlines() if line.startswith("test "))
    n_test = len("".join(r + "\n" for r in lines("test")))
    assert "vocab_size=256" in out and test_row[1] == f"{n_test:,}"
    assert 1 < float(test_row[4]) < 256  # unigram perplexity of bytes: above 1, below uniform
