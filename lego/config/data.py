"""The `data` group: which text, which tokenizer, how it is cut into batches, and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from lego.config.values import (DATA_NAMES, DEFAULT_CACHE_DIR, FILE_BUILDERS, HF_PRESETS, SHARD_DTYPES, SHARD_FORMATS,
                                SPLITS, TOKENIZERS, _fail)


@dataclass
class ChainsConfig:
    """data=chains: seeded variable-binding programs such as `m=4;y=7;b=m;i=b;z=i;?z=4` (lego.chains)."""

    num_vars: int = 8  # variables per program: an integer in [1, len(names)], >= queries x the deepest hop
    # P(1 hop), P(2 hops), ...: numbers >= 0 that sum to 1
    depth_probs: List[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])
    queries: int = 2  # queried chains per program: an integer >= 1
    values: str = "0123456789"  # value alphabet: distinct one-byte characters, none in names or '=;?' or a newline
    names: str = "abcdefghijklmnopqrstuvwxyz"  # variable names: distinct one-byte characters, none in values
    assign: str = "="  # between a name and what it is bound to: '=' (`z=4;?z=4`) or '' (`z4;?z4`: one lookup is
    # the classic induction pattern, the token after the earlier occurrence of the current one)
    text_fraction: float = 0.0  # share of lines that are Shakespeare (data=shakespeare's split): a number in [0, 1]
    train_lines: int = 20000  # lines (programs or text) in the train split: an integer >= 1
    eval_lines: int = 2000  # lines in the validation split, and in the test split: an integer >= 1
    seed: int = 0  # generator seed; train, validation and test draw from (seed, split)


@dataclass
class ShardsConfig:
    """data=shards: pre-tokenized shards, llm.c's header format or nanoGPT's raw .bin, memory-mapped (lego.shards)."""

    dir: Optional[str] = None  # the shards' directory (what lego-prepare wrote); required with data=shards
    train: str = "*train*.bin"  # glob of the train split's shards, relative to dir (or absolute); read in name order
    validation: str = "*val*.bin"  # glob of the validation shards (lego-prepare's validation_*, nanoGPT's val.bin)
    test: str = "*test*.bin"  # glob of the test shards
    format: str = "auto"  # auto (llmc when the first shard opens with llm.c's magic 20240520, else raw) | llmc | raw
    dtype: str = "uint16"  # format=raw: the token width, uint16 (nanoGPT) | uint32; llm.c shards carry theirs
    # decodes the ids: null = dir/tokenizer.json; a tokenizer.json, a directory with one or with vocab.json +
    # merges.txt (GPT-2's files), or bytes
    tokenizer: Optional[str] = None
    # ids the model embeds: null = dir/shards.json's (lego-prepare), else the tokenizer's; every id must lie below it
    vocab_size: Optional[int] = None


@dataclass
class DataConfig:
    """Which text, which tokenizer, how it is cut into batches (Hydra group `data`)."""

    name: str = "shakespeare"
    """Corpus: shakespeare | kjv | wikitext2 | wikitext103 | hf | text_files | chains | shards."""
    tokenizer: str = "bpe"
    """bpe (byte-level, trained on the train split) | bytes (vocab 256) | pretrained."""
    vocab_size: int = 2048
    """BPE vocabulary size in tokens: an integer >= 257 (ignored for bytes and pretrained)."""
    pretrained_name: Optional[str] = None
    """Hub tokenizer name for tokenizer=pretrained, e.g. 'gpt2'."""
    seq_len: int = 128
    """Tokens per training sequence (the model's context): an integer >= 2, at most model.max_seq_len."""
    batch_size: int = 32
    """Sequences per training batch: an integer >= 1."""
    eval_batch_size: int = 64
    """Sequences per evaluation batch: an integer >= 1."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Directory of tokenized corpora, tokenizers and the model cache (not empty); env LEGO_CACHE_DIR replaces
    the default."""
    path: Optional[str] = None
    """data=hf: `datasets.load_dataset` path, e.g. 'wikitext' or a local directory."""
    config_name: Optional[str] = None
    """data=hf: dataset configuration, e.g. 'wikitext-2-raw-v1'."""
    text_column: str = "text"
    """Column holding the text (hf, text_files with .jsonl/.parquet)."""
    train_split: str = "train"
    """Split (or slice, e.g. 'train[:90%]') used for training."""
    validation_split: str = "validation"
    """Split (or slice, e.g. 'train[90%:95%]') used for validation."""
    test_split: str = "test"
    """Split (or slice, e.g. 'train[95%:]') used for the final test."""
    train_files: List[str] = field(default_factory=list)
    """data=text_files: training files (.txt: one row per line; .jsonl; .parquet)."""
    validation_files: List[str] = field(default_factory=list)
    """data=text_files: validation files (may be empty if validation_split slices train)."""
    test_files: List[str] = field(default_factory=list)
    """data=text_files: test files (may be empty if test_split slices train)."""
    max_train_tokens: Optional[int] = None
    """Use only the first this-many training tokens (quick runs): an integer >= seq_len + 1; None uses all."""
    max_eval_tokens: Optional[int] = None
    """Use only the first this-many validation and test tokens (quick runs): an integer >= seq_len + 1; None
    uses all."""
    val_check_tokens: Optional[int] = None
    """Validation tokens scored at each validation during training (the first this-many of the validation
    split): an integer >= seq_len + 1; None scores all. Calibration and the frontier's choice always use the whole
    split."""
    chains: ChainsConfig = field(default_factory=ChainsConfig)
    """data=chains: the program generator's settings (ignored by the other corpora)."""
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    """data=shards: where the token shards are and how to read them (ignored by the other corpora); the
    tokenizer keys above do not apply, the shards are tokens already."""

    def __post_init__(self):
        if isinstance(self.chains, dict):  # DataConfig(**a JSON record)
            self.chains = ChainsConfig(**self.chains)
        if isinstance(self.shards, dict):
            self.shards = ShardsConfig(**self.shards)
        validate_data_config(self)


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ConfigError('data.<key>: <problem>; allowed: <values>') for the first bad key.
    Checks values and that data=text_files names existing files; the text itself is
    checked by `load_corpus`."""
    if cfg.name not in DATA_NAMES:
        _fail("name", f"unknown corpus {cfg.name!r}", ", ".join(DATA_NAMES))
    if cfg.tokenizer not in TOKENIZERS:
        _fail("tokenizer", f"unknown tokenizer {cfg.tokenizer!r}", ", ".join(TOKENIZERS))
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        _fail("vocab_size", f"{cfg.vocab_size} leaves no room for merges over 256 bytes",
              "an integer >= 257")
    if cfg.tokenizer == "pretrained" and not cfg.pretrained_name:
        _fail("pretrained_name", "tokenizer=pretrained needs a hub tokenizer name",
              "a name such as 'gpt2'")
    for key in ("seq_len", "batch_size", "eval_batch_size"):
        least = 2 if key == "seq_len" else 1
        if getattr(cfg, key) < least:
            _fail(key, f"{getattr(cfg, key)} is too small", f"an integer >= {least}")
    if cfg.max_eval_tokens is not None and cfg.max_eval_tokens < cfg.seq_len + 1:
        _fail("max_eval_tokens", f"{cfg.max_eval_tokens} holds no sequence of {cfg.seq_len + 1} tokens",
              f"an integer >= {cfg.seq_len + 1}, or null")
    if cfg.val_check_tokens is not None and cfg.val_check_tokens < cfg.seq_len + 1:
        _fail("val_check_tokens", f"{cfg.val_check_tokens} holds no sequence of {cfg.seq_len + 1} tokens",
              f"an integer >= {cfg.seq_len + 1}, or null")
    if cfg.max_train_tokens is not None and cfg.max_train_tokens < cfg.seq_len + 1:
        _fail("max_train_tokens", f"{cfg.max_train_tokens} holds no sequence of "
              f"seq_len + 1 = {cfg.seq_len + 1} tokens", f"None or >= {cfg.seq_len + 1}")
    if not cfg.cache_dir:
        _fail("cache_dir", "empty", "a directory path")
    if cfg.name == "hf" and not cfg.path:
        _fail("path", "data=hf needs a dataset path", "a hub name such as 'wikitext' or a directory")
    if cfg.name in ("hf", "text_files", *HF_PRESETS):
        _check_split_specs(cfg)
    if cfg.name == "text_files":
        _check_files(cfg)
    if cfg.name == "chains":
        _check_chains(cfg)
    if cfg.name == "shards":
        _check_shards(cfg.shards)


def _check_shards(s: ShardsConfig) -> None:
    """The values; the files themselves are checked when `lego.shards.open_shards` opens them."""
    if not s.dir:
        _fail("shards.dir", "data=shards needs the directory of the shards", "a directory path, e.g. the one "
              "lego-prepare wrote")
    for split in SPLITS:
        if not getattr(s, split):
            _fail(f"shards.{split}", "empty", f"a glob of .bin files, e.g. '*{split[:3]}*.bin'")
    if s.format not in SHARD_FORMATS:
        _fail("shards.format", f"unknown format {s.format!r}", ", ".join(SHARD_FORMATS))
    if s.dtype not in SHARD_DTYPES:
        _fail("shards.dtype", f"unknown dtype {s.dtype!r}", ", ".join(SHARD_DTYPES))
    if s.vocab_size is not None and (isinstance(s.vocab_size, bool) or not isinstance(s.vocab_size, int)
                                     or s.vocab_size < 1):
        _fail("shards.vocab_size", f"{s.vocab_size!r}", "an integer >= 1, or null")


def _check_chains(cfg: DataConfig) -> None:
    c = cfg.chains
    if cfg.tokenizer != "bytes":
        _fail("tokenizer", f"data=chains labels every byte; {cfg.tokenizer!r} merges them", "bytes")
    for key in ("num_vars", "queries", "train_lines", "eval_lines"):
        value = getattr(c, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"chains.{key}", f"{value!r} is too small", "an integer >= 1")
    for key in ("names", "values"):
        chars = getattr(c, key)
        if not chars or len(set(chars)) != len(chars) or any(len(ch.encode()) != 1 or ch in "=;?\n" for ch in chars):
            _fail(f"chains.{key}", f"{chars!r}",
                          "distinct one-byte characters other than '=', ';', '?' and a newline")
    if c.assign not in ("=", ""):
        _fail("chains.assign", f"{c.assign!r}", "'=' or '' (none)")
    if set(c.names) & set(c.values):
        _fail("chains.values", f"{''.join(sorted(set(c.names) & set(c.values)))!r} also in data.chains.names",
              "characters that are not variable names")
    if c.num_vars > len(c.names):
        _fail("chains.num_vars", f"{c.num_vars} variables need as many names, data.chains.names has {len(c.names)}",
              f"an integer in [1, {len(c.names)}]")
    p = list(c.depth_probs)
    if not p or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 for x in p) \
            or abs(sum(p) - 1.0) > 1e-6:
        _fail("chains.depth_probs", f"{p} (sum {sum(x for x in p if isinstance(x, (int, float))):.6g})",
              "probabilities of 1, 2, ... hops: numbers >= 0 that sum to 1")
    deepest = max(i + 1 for i, x in enumerate(p) if x > 0)
    if deepest * c.queries > c.num_vars:
        _fail("chains.depth_probs", f"{deepest} hops x {c.queries} queries need {deepest * c.queries} variables, "
              f"data.chains.num_vars is {c.num_vars}", f"at most {c.num_vars // c.queries} hops with nonzero "
              "probability (or more num_vars, fewer queries)")
    if isinstance(c.text_fraction, bool) or not isinstance(c.text_fraction, (int, float)) \
            or not 0.0 <= c.text_fraction <= 1.0:
        _fail("chains.text_fraction", f"{c.text_fraction!r}", "a number in [0, 1]")


def _split_base(spec: str) -> str:
    """'train[:90%]' -> 'train'."""
    return spec.split("[", 1)[0].strip()


def _check_split_specs(cfg: DataConfig) -> None:
    # Two splits slicing the same source split must both be slices; a bare 'train' next to
    # 'train[90%:]' would put the validation rows into training.
    specs = {s: getattr(cfg, f"{s}_split") for s in SPLITS}
    for split, spec in specs.items():
        if not spec or not _split_base(spec):
            _fail(f"{split}_split", "empty", "a split name or slice such as 'train[:90%]'")
        for other, other_spec in specs.items():
            if other != split and _split_base(other_spec) == spec:
                _fail(f"{split}_split", f"{spec!r} also feeds data.{other}_split={other_spec!r}",
                      f"a slice that does not overlap it, e.g. '{spec}[:90%]'")


def _check_files(cfg: DataConfig) -> None:
    if not cfg.train_files:
        _fail("train_files", "data=text_files needs at least one training file",
              "a list of .txt/.jsonl/.parquet paths")
    builders = set()
    for split in SPLITS:
        for f in getattr(cfg, f"{split}_files"):
            suffix = Path(f).suffix.lower()
            if suffix not in FILE_BUILDERS:
                _fail(f"{split}_files", f"{f!r} has an unsupported extension",
                      ", ".join(FILE_BUILDERS))
            if not Path(f).expanduser().is_file():
                _fail(f"{split}_files", f"no such file {f!r}", "paths of existing files")
            if Path(f).expanduser().stat().st_size == 0:
                _fail(f"{split}_files", f"{f!r} is empty", "files that hold text")
            builders.add(FILE_BUILDERS[suffix])
    if len(builders) > 1:
        _fail("train_files", f"files of different formats ({', '.join(sorted(builders))})",
              "one format across all splits")
    with_files = [s for s in SPLITS if getattr(cfg, f"{s}_files")]
    for split in SPLITS:
        spec = getattr(cfg, f"{split}_split")
        if _split_base(spec) not in with_files:
            _fail(f"{split}_files", f"no files, and data.{split}_split={spec!r} names no split "
                  "that has files", f"files, or a slice of {', '.join(with_files)} such as "
                  f"'{with_files[0]}[90%:95%]' (with data.train_split sliced too)")
