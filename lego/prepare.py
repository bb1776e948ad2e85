"""`lego-prepare`: tokenize text into llm.c-format shards that `lego-run data=shards` trains from.

    lego-prepare shards/mine --files 'texts/*.txt' --tokenizer bytes
    lego-prepare shards/gpt2 --files 'corpus/*.jsonl' --tokenizer gpt2/tokenizer.json --workers 16
    lego-prepare shards/stories --hf roneneldan/TinyStories --tokenizer gpt2/   # streams the hub (the network)
    lego-run data=shards data.shards.dir=shards/mine

Documents: each line of a .txt file (`--per-file`: each file), each row of a .jsonl / .parquet file or of a
Hugging Face dataset (column `--text-column`). The end-of-text token opens every document (llm.c's fineweb.py
does the same), so the stream reads EOT doc EOT doc ...; a tokenizer without `<|endoftext|>` gains it as its
next id (bytes: 256). Splits hold whole documents, spread evenly through the input: with
`--validation-fraction 0.01` every 100th document is a validation one (`split_of`), so an input ordered by
source still gives every split a share of each.

`--workers` processes tokenize chunks of documents; the shards come out in input order, the same bytes for
any worker count. The output directory gets `{train,validation,test}_000000.bin, ...` (llm.c's header;
uint16 ids when the vocabulary fits, else uint32), `tokenizer.json` and `shards.json` (the index: per split
documents, tokens, text bytes, each shard's token count and largest id). It is built in a temporary sibling
and renamed when complete: a killed prepare leaves no half-written directory that data=shards would read.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lego.config import SPLITS, ConfigError
from lego.progress import progress, progress_logging
from lego.shards import INDEX, ShardWriter
from lego.tokenizer import FILENAME, end_of_text_id, tokenizer_from_file

log = logging.getLogger("lego.prepare")

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
CHUNK_CHARS = 1 << 20  # text per task handed to a worker (~1 MB): large enough to amortise the pickling


def _bad(flag: str, problem: str, allowed: str):
    raise ConfigError(f"{flag}: {problem}; allowed: {allowed}")


# ----------------------------------------------------------------------------------- documents

def file_documents(paths: Sequence[Path], text_column: str, per_file: bool) -> Iterator[str]:
    """The non-empty documents of local files, in order: a line of .txt (or the whole file with `per_file`),
    a row of .jsonl/.json (one JSON object a line) or .parquet, column `text_column`."""
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            with open(path, encoding="utf-8") as f:
                texts = [f.read()] if per_file else (line.rstrip("\n") for line in f)
                yield from (t for t in texts if t.strip())
        elif suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            _bad("--files", f"{path} line {n} is not JSON ({e.msg})", "one JSON object a line")
                        if text_column not in row:
                            _bad("--text-column", f"{path} line {n} has no {text_column!r}", ", ".join(row))
                        if row[text_column]:
                            yield row[text_column]
        else:
            import pyarrow.parquet as pq  # installed with `datasets`

            pf = pq.ParquetFile(path)
            if text_column not in pf.schema_arrow.names:
                _bad("--text-column", f"{path} has no column {text_column!r}", ", ".join(pf.schema_arrow.names))
            for batch in pf.iter_batches(columns=[text_column]):
                yield from (t for t in batch.column(0).to_pylist() if t)


def hub_documents(path: str, name: Optional[str], split: str, text_column: str) -> Iterator[str]:
    """The rows of a Hugging Face dataset, streamed (nothing is downloaded whole; needs the network)."""
    try:
        import datasets
    except ImportError:
        _bad("--hf", "streaming a Hugging Face dataset needs the datasets package", "pip install datasets, "
             "or --files")
    for row in datasets.load_dataset(path, name, split=split, streaming=True):
        if text_column not in row:
            _bad("--text-column", f"{path} has no column {text_column!r}", ", ".join(row))
        if row[text_column]:
            yield row[text_column]


def split_of(i: int, validation: float, test: float) -> str:
    """The split of document i: validation when i * validation crosses an integer, else test when
    i * test + 0.5 does, else train; so each split's documents are spread evenly through the input."""
    if math.floor((i + 1) * validation) > math.floor(i * validation):
        return "validation"
    if math.floor((i + 1) * test + 0.5) > math.floor(i * test + 0.5):
        return "test"
    return "train"


def chunks(docs: Iterable[str]) -> Iterator[Tuple[int, List[str]]]:
    """(index of the first document, documents) of about CHUNK_CHARS characters each."""
    start, batch, size = 0, [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield start, batch
            start, batch, size = start + len(batch), [], 0
    if batch:
        yield start, batch


# ------------------------------------------------------------------------------------- workers

_WORKER: dict = {}  # the tokenizer and settings of this worker process (set once by _init_worker)


def _init_worker(tokenizer: str, eot: int, dtype: str, validation: float, test: float) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    tok = tokenizer_from_file(tokenizer)
    tok.backend.encode_special_tokens = True  # '<|endoftext|>' inside a text is text, never a separator
    _WORKER.update(tok=tok, eot=eot, dtype=np.dtype(dtype), validation=validation, test=test)


def _encode(job: Tuple[int, List[str]]) -> Dict[str, Tuple[np.ndarray, int, int]]:
    """{split: (its ids in this chunk, EOT before each document; documents; UTF-8 bytes of text)}."""
    start, texts = job
    w = _WORKER
    tok, eot = w["tok"], np.array([w["eot"]], dtype=w["dtype"])
    raw = [t.encode("utf-8") for t in texts]
    if tok.ids_are_bytes:  # the id is the byte: no tokenizer call
        ids = [np.frombuffer(b, dtype=np.uint8) for b in raw]
    else:
        ids = [np.asarray(doc, dtype=w["dtype"]) for doc in tok.encode_batch(texts)]
    out: Dict[str, list] = {s: [[], 0, 0] for s in SPLITS}
    for i, (b, doc) in enumerate(zip(raw, ids)):
        part = out[split_of(start + i, w["validation"], w["test"])]
        part[0] += [eot, doc.astype(w["dtype"], copy=False)]
        part[1] += 1
        part[2] += len(b)
    return {s: (np.concatenate(p[0]), p[1], p[2]) for s, p in out.items() if p[1]}


# ------------------------------------------------------------------------------------------ prepare

def prepare(out: Path, docs: Iterable[str], tokenizer: str = "bytes", *, shard_tokens: int = 100_000_000,
            validation: float = 0.005, test: float = 0.005, workers: int = 1, source: Optional[dict] = None,
            progress_interval_s: float = 30.0) -> dict:
    """Tokenize `docs` into llm.c shards under `out` (which must not exist or be empty); returns the index,
    also written to `out/shards.json`. `tokenizer`: bytes, or a tokenizer file (`tokenizer_from_file`)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _bad("OUT", f"{out} already holds files", "a new or empty directory")
    if shard_tokens < 1:
        _bad("--shard-tokens", f"{shard_tokens}", "an integer >= 1")
    if workers < 1:
        _bad("--workers", f"{workers}", "an integer >= 1")
    for flag, f in (("--validation-fraction", validation), ("--test-fraction", test)):
        if not 0.0 <= f < 1.0:
            _bad(flag, f"{f}", "a number in [0, 1)")
    if validation + test >= 1.0:
        _bad("--test-fraction", f"{validation} + {test} leaves no training document", "fractions summing below 1")
    try:
        tok = tokenizer_from_file(tokenizer)
    except ValueError as e:
        _bad("--tokenizer", str(e), "bytes, a tokenizer.json, or a directory with vocab.json + merges.txt")
    eot = end_of_text_id(tok)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the shards from the other users of a cluster
    try:
        tok.save(tmp)  # with the end-of-text token: what the workers encode with and data=shards decodes with
        worker_tok = "bytes" if tok.ids_are_bytes else str(tmp / FILENAME)  # bytes: the fast path
        index = _write(tmp, docs, (worker_tok, eot, dtype.name, validation, test), workers, shard_tokens,
                       progress_interval_s)
        index.update(format="llmc", version=1 if dtype == np.uint16 else 2, dtype=dtype.name,
                     vocab_size=tok.vocab_size, eot_id=eot, eot_token=tok.backend.id_to_token(eot),
                     eot_position="before each document", tokenizer=tokenizer, shard_tokens=shard_tokens,
                     fractions={"validation": validation, "test": test}, workers=workers, source=source or {},
                     created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        empty = [s for s in SPLITS if index["splits"][s]["documents"] == 0 and (s == "train" or index["fractions"][s])]
        if empty:
            flag = "--files" if empty[0] == "train" else f"--{empty[0]}-fraction"
            _bad(flag, f"no document went to the {empty[0]} split ({index['documents']} documents in all)",
                 "more documents, or a larger fraction (every 1/fraction-th document is held out)")
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _write(tmp: Path, docs: Iterable[str], settings: tuple, workers: int, shard_tokens: int,
           progress_interval_s: float) -> dict:
    """Encode `docs` with `workers` processes (in this one for 1) into shard writers; the index's counts."""
    writers = {s: ShardWriter(tmp, s, settings[2], shard_tokens) for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0, "text_bytes": 0} for s in SPLITS}
    t0 = time.perf_counter()
    if workers == 1:
        _init_worker(*settings)
        pool, results = None, map(_encode, chunks(docs))
    else:
        pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=settings)
        results = pool.imap(_encode, chunks(docs))  # in input order, whatever finishes first
    try:
        with progress_logging():
            bar = progress(results, desc="lego-prepare", unit="chunk", interval_s=progress_interval_s)
            for done in bar:
                for split, (ids, n_docs, n_bytes) in done.items():
                    writers[split].write(ids)
                    c = counts[split]
                    c["documents"] += n_docs
                    c["tokens"] += len(ids)
                    c["text_bytes"] += n_bytes
                total = sum(c["tokens"] for c in counts.values())
                bar.update_stats(tokens=total, tokens_per_s=total / max(time.perf_counter() - t0, 1e-9))
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - t0
    splits = {s: {**counts[s], "shards": writers[s].close()} for s in SPLITS}
    tokens, documents = (sum(c[k] for c in counts.values()) for k in ("tokens", "documents"))
    rate = tokens / max(seconds, 1e-9)
    log.info("lego-prepare: %s documents, %s tokens in %.1f s (%s tokens/s, %d worker(s)): %s", f"{documents:,}",
             f"{tokens:,}", seconds, f"{rate:,.0f}", workers,
             "; ".join(f"{s} {len(splits[s]['shards'])} shard(s) {counts[s]['tokens']:,} tokens" for s in SPLITS))
    return {"splits": splits, "documents": documents, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(rate)}


# ----------------------------------------------------------------------------------------- command

def _files(patterns: Sequence[str]) -> List[Path]:
    paths = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file())
        if not found:
            _bad("--files", f"no file matches {pattern!r}", "paths or globs of existing files")
        for p in found:
            if p.suffix.lower() not in SUFFIXES:
                _bad("--files", f"{str(p)!r} has an unsupported extension", ", ".join(SUFFIXES))
        paths += found
    return paths


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lego-prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Then: lego-run data=shards data.shards.dir=OUT")
    p.add_argument("out", metavar="OUT", type=Path, help="output directory (new or empty)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", nargs="+", metavar="PATH", help="local .txt/.jsonl/.parquet files or globs")
    src.add_argument("--hf", metavar="DATASET", help="a Hugging Face dataset, streamed (needs the network)")
    p.add_argument("--hf-config", default=None, help="--hf: the dataset's configuration name")
    p.add_argument("--hf-split", default="train", help="--hf: the split to read (default train)")
    p.add_argument("--text-column", default="text", help=".jsonl/.parquet/--hf: the text column (default text)")
    p.add_argument("--per-file", action="store_true", help=".txt: a whole file is one document (default: a line)")
    p.add_argument("--tokenizer", default="bytes",
                   help="bytes (default), a tokenizer.json, or a directory with vocab.json + merges.txt (GPT-2's)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="ids per shard (default 1e8, llm.c's)")
    p.add_argument("--validation-fraction", type=float, default=0.005, help="share of documents (default 0.005)")
    p.add_argument("--test-fraction", type=float, default=0.005, help="share of documents (default 0.005)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: cores)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: 0 when the shards are written; bad input: one line naming the flag, exit 2."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        if args.files:
            paths = _files(args.files)
            docs = file_documents(paths, args.text_column, args.per_file)
            source = {"files": [str(p) for p in paths], "per_file": args.per_file, "text_column": args.text_column}
        else:
            docs = hub_documents(args.hf, args.hf_config, args.hf_split, args.text_column)
            source = {"hf": args.hf, "config": args.hf_config, "split": args.hf_split, "text_column": args.text_column}
        prepare(args.out, docs, args.tokenizer, shard_tokens=args.shard_tokens, validation=args.validation_fraction,
                test=args.test_fraction, workers=args.workers, source=source)
    except ConfigError as e:
        print(f"lego-prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"shards: {args.out}  (lego-run data=shards data.shards.dir={args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
