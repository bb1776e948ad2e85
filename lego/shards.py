"""Pre-tokenized shards, memory-mapped: llm.c's header format and nanoGPT's plain `.bin` (`data=shards`).

    lego-prepare shards/tiny --files corpus.txt --tokenizer bytes    # writes them (lego.prepare)
    lego-run data=shards data.shards.dir=shards/tiny                 # trains from them

A shard is a flat array of token ids. llm.c's format (its dev/data/data_common.py) opens with 256 int32:
magic 20240520, version (1: uint16 tokens, 2: uint32), token count; the tokens follow. nanoGPT's
`train.bin` / `val.bin` are the uint16 tokens alone (`data.shards.format=raw`, `data.shards.dtype`). A split
is every shard its glob matches, in name order, read as one stream: the shard's memmap when there is one,
else a `ShardedTokens` over them; nothing is copied or read whole.

The corpus key hashes each shard's name, size, mtime and header, the index `shards.json` (lego-prepare's)
and the tokenizer: never the tokens, so opening a corpus of billions of tokens takes no pass over it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from lego.config import SPLITS, ShardsConfig, _fail
from lego.tokenizer import FILENAME, Tokenizer, tokenizer_from_file

logger = logging.getLogger(__name__)

MAGIC = 20240520  # llm.c's shard magic
HEADER_INTS = 256  # the header: 256 little-endian int32, 1024 bytes
HEADER_BYTES = 4 * HEADER_INTS
VERSIONS = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}  # llm.c header version -> token dtype
INDEX = "shards.json"  # lego-prepare's index: vocabulary, end-of-text id, per shard tokens and largest id
KEY_VERSION = 1  # bump when what the corpus key hashes changes
CHECK_TOKENS = 1 << 16  # without an index, the first this-many ids of each shard are checked against the vocabulary


# ------------------------------------------------------------------------------------------ format

def llmc_header(num_tokens: int, dtype) -> bytes:
    """The 1024-byte llm.c header of a shard of `num_tokens` ids of `dtype` (uint16: version 1, uint32: 2)."""
    version = {d: v for v, d in VERSIONS.items()}[np.dtype(dtype)]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, version, num_tokens
    return header.tobytes()


def write_shard(path: Union[str, Path], tokens: np.ndarray, fmt: str = "llmc") -> None:
    """Write `tokens` (uint16 or uint32) as one shard: llm.c's header then the ids, or (fmt="raw") the ids alone."""
    tokens = np.ascontiguousarray(tokens)
    with open(path, "wb") as f:
        if fmt == "llmc":
            f.write(llmc_header(len(tokens), tokens.dtype))
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())


class ShardWriter:
    """Appends ids to llm.c shards `<directory>/<prefix>_000000.bin`, `..._000001.bin`, ... of `shard_tokens`
    ids each (the last one shorter); `close()` returns one record per shard: file, tokens, largest id."""

    def __init__(self, directory: Path, prefix: str, dtype, shard_tokens: int):
        self.directory, self.prefix, self.dtype = Path(directory), prefix, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.records: List[dict] = []
        self.f = None

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.records):06d}.bin"
        self.f = open(self.directory / name, "wb")
        self.f.write(llmc_header(0, self.dtype))  # rewritten with the count when the shard is full
        self.records.append({"file": name, "tokens": 0, "max_id": -1})

    def _finish(self) -> None:
        rec = self.records[-1]
        self.f.seek(0)
        self.f.write(llmc_header(rec["tokens"], self.dtype))
        self.f.close()
        self.f = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self.f is None:
                self._open()
            rec = self.records[-1]
            part, ids = ids[: self.shard_tokens - rec["tokens"]], ids[self.shard_tokens - rec["tokens"]:]
            self.f.write(part.tobytes())
            rec["tokens"] += len(part)
            rec["max_id"] = max(rec["max_id"], int(part.max()))
            if rec["tokens"] == self.shard_tokens:
                self._finish()

    def close(self) -> List[dict]:
        if self.f is not None:
            self._finish()
        return self.records


@dataclass(frozen=True)
class Shard:
    """Where one shard's ids lie in its file."""

    path: Path
    dtype: np.dtype
    offset: int  # bytes before the first id: 1024 (llm.c) or 0 (raw)
    tokens: int
    header: tuple = ()  # llm.c: (version, token count); raw: ()

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype.newbyteorder("<"), mode="r", offset=self.offset,
                         shape=(self.tokens,))


def read_shard(path: Path, fmt: str, raw_dtype: str) -> Shard:
    """The layout of the shard at `path` in format `fmt` (llmc | raw), from its size and first 1024 bytes.
    A wrong magic, an unknown version, a size that disagrees with the header: ConfigError naming the key."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    magic = int.from_bytes(head[:4], "little") if len(head) >= 4 else None
    if fmt == "raw":
        if magic == MAGIC:
            _fail("shards.format", f"{path} opens with llm.c's header; read as raw its header would be tokens",
                  "llmc (or auto) for llm.c shards")
        dtype = np.dtype(raw_dtype)
        if size == 0 or size % dtype.itemsize:
            _fail("shards.dtype", f"{path} holds {size} bytes, not a whole number of {raw_dtype} ids",
                  "uint16 (nanoGPT) or uint32 to match how the file was written")
        return Shard(path, dtype, 0, size // dtype.itemsize)
    if magic != MAGIC or len(head) < HEADER_BYTES:
        _fail("shards.format", f"{path} opens with {magic}, not llm.c's magic {MAGIC}",
              "llm.c shards (lego-prepare writes them), or format=raw with dtype for headerless .bin files")
    header = np.frombuffer(head, dtype="<i4")
    version, n = int(header[1]), int(header[2])
    if version not in VERSIONS:
        _fail("shards.format", f"{path} is llm.c version {version}", "1 (uint16 ids) or 2 (uint32 ids)")
    dtype = VERSIONS[version]
    if n < 1 or size != HEADER_BYTES + n * dtype.itemsize:
        _fail("shards.dir", f"{path} holds {size - HEADER_BYTES} bytes of ids, its header says {n} x "
              f"{dtype.itemsize} bytes", "complete shards (a killed writer leaves a short one: write it again)")
    return Shard(path, dtype, HEADER_BYTES, n, (version, n))


# ------------------------------------------------------------------------------------- one stream

class ShardedTokens:
    """Several token arrays read as one stream, lazily: `len`, slicing (a view over the parts it covers; one
    part comes back as that part's memmap slice), an int index, iteration, `np.asarray` (reads what it
    covers), and `windows`, the reads of `lego.batches`."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [np.asarray(p) for p in parts if len(p)]  # plain views of the memmaps: no read, less overhead
        self.lens = np.array([len(p) for p in self.parts], dtype=np.int64)  # (P,)
        self.ends = np.cumsum(self.lens)  # (P,) stream offset after each part
        self.dtype = np.result_type(*self.parts) if self.parts else np.dtype(np.uint16)
        self._windows: Dict[int, list] = {}  # width -> per part, its (len - width + 1, width) strided view

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _slice(self, start: int, stop: int):
        pieces = []
        for part, end in zip(self.parts, self.ends):
            begin = int(end) - len(part)
            lo, hi = max(start, begin), min(stop, int(end))
            if lo < hi:
                pieces.append(part[lo - begin:hi - begin])
        if len(pieces) == 1:
            return pieces[0]
        return ShardedTokens(pieces) if pieces else np.empty(0, self.dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens: slices take no step")
            return self._slice(start, max(start, stop))
        i = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        k = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[k][i - (int(self.ends[k]) - len(self.parts[k]))]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.parts) if self.parts else np.empty(0, self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self):
        return iter(np.asarray(self))

    def windows(self, rows: Sequence[int], width: int) -> np.ndarray:
        """(len(rows), width): row r is the stream's ids [r * width, (r + 1) * width). Rows inside one part
        are gathered from it at once; the few that straddle two parts are read piece by piece."""
        if width not in self._windows:  # every window of each part, a strided view (no copy)
            self._windows[width] = [np.lib.stride_tricks.as_strided(p, shape=(max(len(p) - width + 1, 0), width),
                                                                    strides=p.strides * 2, writeable=False)
                                    for p in self.parts]
        starts = np.asarray(rows, dtype=np.int64) * width  # (R,)
        part_of = np.searchsorted(self.ends, starts, side="right")  # (R,) the part holding each row's first id
        local = starts - (self.ends - self.lens)[part_of]  # (R,) where in that part
        fits = local + width <= self.lens[part_of]
        out = np.empty((len(starts), width), dtype=self.dtype)
        for k in set(part_of[fits].tolist()):
            sel = fits & (part_of == k)
            out[sel] = self._windows[width][k][local[sel]]  # (r, width) rows of the view: one gather
        for i in np.flatnonzero(~fits):
            out[i] = np.asarray(self[int(starts[i]):int(starts[i]) + width])
        return out


def stream(parts: Sequence[np.ndarray]):
    """One array for one part (the memmap itself: the in-memory corpora's path), else a ShardedTokens."""
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)


# ------------------------------------------------------------------------------------------ open

@dataclass
class ShardSet:
    """What `open_shards` found: one token stream per split and what reads them."""

    splits: Dict[str, object]  # split -> np.memmap or ShardedTokens
    tokenizer: Tokenizer
    vocab_size: int
    key: str  # sha256 hex over the shards' metadata, the index, the tokenizer and the read settings
    shards: Dict[str, List[Shard]] = field(default_factory=dict)
    text_bytes: Dict[str, int] = field(default_factory=dict)  # from the index; empty without one


def _files(s: ShardsConfig) -> Dict[str, List[Path]]:
    """{split: shard paths in name order}; a missing directory, a glob matching nothing or a file matched
    by two splits: ConfigError naming the key."""
    root = Path(s.dir).expanduser()
    if not root.is_dir():
        _fail("shards.dir", f"no such directory {s.dir!r}", "the directory lego-prepare wrote, or one holding "
              ".bin shards")
    found, owner = {}, {}
    for split in SPLITS:
        pattern = getattr(s, split)
        paths = sorted(Path(p) for p in glob.glob(str(root / pattern)) if Path(p).is_file())
        if not paths:
            _fail(f"shards.{split}", f"no file matches {pattern!r} in {root}",
                  f"a glob of this split's .bin shards, relative to data.shards.dir or absolute (lego-prepare "
                  f"writes {split}_000000.bin, ...)")
        for p in paths:
            if p in owner:
                _fail(f"shards.{split}", f"{p.name} also matches data.shards.{owner[p]}={getattr(s, owner[p])!r}",
                      "globs that share no file")
            owner[p] = split
        found[split] = paths
    return found


def _tokenizer(s: ShardsConfig) -> Tokenizer:
    spec = s.tokenizer or str(Path(s.dir).expanduser() / FILENAME)
    try:
        return tokenizer_from_file(spec)
    except ValueError as e:
        _fail("shards.tokenizer", str(e), f"null (data.shards.dir/{FILENAME}), the path of a {FILENAME}, a "
              "directory with vocab.json + merges.txt, or bytes")


def _check_ids(shards: Dict[str, List[Shard]], index: dict, vocab_size: int) -> None:
    """Every id below `vocab_size`: exactly, from the index's largest id per shard; else from each shard's
    first CHECK_TOKENS ids (the cheap check; an id beyond it fails later in the embedding)."""
    known = {r["file"]: r["max_id"] for split in index.get("splits", {}).values() for r in split.get("shards", [])}
    for split, items in shards.items():
        for sh in items:
            top = known.get(sh.path.name)
            where = "shards.json" if top is not None else f"its first {CHECK_TOKENS:,} ids"
            if top is None:
                top = int(np.max(sh.open()[:CHECK_TOKENS]))
            if top >= vocab_size:
                _fail("shards.vocab_size", f"{vocab_size} is too small: {sh.path.name} holds id {top} ({where})",
                      f"an integer > {top}, or null (shards.json's, else the tokenizer's)")


def _key(s: ShardsConfig, shards: Dict[str, List[Shard]], index_bytes: Optional[bytes], tok: Tokenizer,
         vocab_size: int) -> str:
    """sha256 over each shard's name, size, mtime and header, the index, the tokenizer and the vocabulary:
    a shard rewritten (new size or mtime) gets a new key, and no id is read to compute it."""
    files = {split: [[sh.path.name, os.stat(sh.path).st_size, os.stat(sh.path).st_mtime_ns, list(sh.header),
                      sh.dtype.name, sh.offset] for sh in items] for split, items in shards.items()}
    src = {"version": KEY_VERSION, "files": files, "vocab_size": vocab_size,
           "index": hashlib.sha256(index_bytes).hexdigest() if index_bytes is not None else None,
           "tokenizer": hashlib.sha256(tok.backend.to_str().encode()).hexdigest()}
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()


def open_shards(s: ShardsConfig) -> ShardSet:
    """The three splits of the shards `s` names, memory-mapped, with their tokenizer and vocabulary. The
    format is the first train shard's under format=auto, and every shard must share it; ConfigError names
    the key of anything wrong (directory, glob, format, header, tokenizer, an id beyond the vocabulary)."""
    paths = _files(s)
    fmt = s.format
    if fmt == "auto":
        with open(paths["train"][0], "rb") as f:
            fmt = "llmc" if int.from_bytes(f.read(4), "little") == MAGIC else "raw"
    shards = {split: [read_shard(p, fmt, s.dtype) for p in ps] for split, ps in paths.items()}
    index_path = Path(s.dir).expanduser() / INDEX
    index_bytes = index_path.read_bytes() if index_path.is_file() else None
    index = json.loads(index_bytes) if index_bytes is not None else {}
    tok = _tokenizer(s)
    vocab_size = s.vocab_size or index.get("vocab_size") or tok.vocab_size
    if vocab_size < tok.vocab_size:
        _fail("shards.vocab_size", f"{vocab_size} is below the tokenizer's {tok.vocab_size} ids",
              f"an integer >= {tok.vocab_size}, or null")
    _check_ids(shards, index, vocab_size)
    splits = {split: stream([sh.open() for sh in items]) for split, items in shards.items()}
    text_bytes = {split: index["splits"][split]["text_bytes"] for split in SPLITS
                  if split in index.get("splits", {})}
    logger.info("data=shards %s (%s): %s", s.dir, fmt, "; ".join(
        f"{split} {len(items)} shard(s) {sum(sh.tokens for sh in items):,} tokens" for split, items in shards.items()))
    return ShardSet(splits=splits, tokenizer=tok, vocab_size=vocab_size,
                    key=_key(s, shards, index_bytes, tok, vocab_size), shards=shards, text_bytes=text_bytes)
