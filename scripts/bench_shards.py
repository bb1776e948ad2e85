"""Data at scale: lego-prepare's throughput, and whether training from shards is as fast as from memory.

    python scripts/bench_shards.py                        # 20 M tokens, workers 1 and 2 (~4 min on 2 cores)
    python scripts/bench_shards.py --tokens 2000000 --steps 50 --model-steps 10 --out bench_shards.json

Text: the lines of Shakespeare's training plays (the packaged corpus), repeated to --tokens bytes, one
document a line. Rows:
  - prepare: `lego.prepare.prepare` on that .txt with the bytes tokenizer, per --workers (tokens/s counts
    the ids written, EOT included: reading, tokenizing, writing shards of --shard-tokens); and with a
    byte-level BPE of --bpe-vocab ids (trained beforehand, not timed) on the first --bpe-chars characters;
  - loader: batches/s of `make_loader` alone (shuffled windows, the first pass) over the train split as
    lego-prepare's shards (a ShardedTokens over several memmaps), as one memmap (the token cache's path),
    and as an array in RAM;
  - train: optimizer steps of a dense model (loss at its last layer, AdamW) on the same batches: --steps
    for the debug=tiny shape from each of the three, --model-steps for model=tiny from shards and RAM; tokens/s.
Cases alternate round by round (--rounds), so load from other processes lands on each alike; a row gives
the median over rounds, its "vs RAM" the median of the within-round ratios. The page cache holds the shards (they were just written): a cold disk reads slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lego.batches import make_loader
from lego.config import DataConfig, ShardsConfig
from lego.data import _shakespeare, load_corpus
from lego.model import Model, ModelArgs
from lego.prepare import file_documents, prepare
from lego.tokenizer import train_bpe

SHAPES = {"debug=tiny": dict(dim=16, num_heads=2, layers=2, seq_len=16, batch=16),
          "model=tiny": dict(dim=128, num_heads=4, layers=2, seq_len=128, batch=32)}


def write_text(path: Path, chars: int) -> int:
    """The training plays' lines, repeated until `chars` characters; returns the lines written."""
    lines = [ln for play in _shakespeare()["train"] for ln in play.splitlines() if ln.strip()]
    n, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < chars:
            line = lines[n % len(lines)]
            f.write(line + "\n")
            size, n = size + len(line) + 1, n + 1
    return n


def loader_rate(tokens, seq_len: int, batch: int, batches: int) -> float:
    """Batches per second of a shuffled loader's first `batches` batches."""
    loader = iter(make_loader(tokens, seq_len, batch, shuffle=True, seed=0))
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches / (time.perf_counter() - t0)


def train_rate(tokens, shape: dict, steps: int, vocab: int) -> float:
    """Tokens per second of `steps` optimizer steps of a dense model reading shuffled batches of `tokens`."""
    torch.manual_seed(0)
    model = Model(ModelArgs(vocab, shape["dim"], shape["layers"], shape["num_heads"], max_seq_len=shape["seq_len"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = iter(make_loader(tokens, shape["seq_len"], shape["batch"], shuffle=True, seed=0))
    L = shape["layers"]
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(loader)
        logits = model.logits_at(model.run_layers(model.embed(x), 0, L), L)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * shape["batch"] * shape["seq_len"] / (time.perf_counter() - t0)


def ratio(rates: list, reference: list) -> float:
    """The median over rounds of rate / the reference's rate in the same round (load hits both alike)."""
    return statistics.median(a / b for a, b in zip(rates, reference))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20_000_000, help="characters of text (= byte tokens, before EOT)")
    p.add_argument("--shard-tokens", type=int, default=5_000_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--bpe-vocab", type=int, default=2048)
    p.add_argument("--bpe-chars", type=int, default=2_000_000)
    p.add_argument("--batches", type=int, default=2000, help="loader rows: batches per case and round")
    p.add_argument("--steps", type=int, default=300, help="train debug=tiny: optimizer steps per case and round")
    p.add_argument("--model-steps", type=int, default=60, help="train model=tiny: steps per case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        tmp = Path(tmp)
        docs_written = write_text(tmp / "text.txt", args.tokens)
        paths = [tmp / "text.txt"]
        for w in args.workers:
            index = prepare(tmp / f"shards-w{w}", file_documents(paths, "text", False), "bytes",
                            shard_tokens=args.shard_tokens, workers=w, progress_interval_s=3600)
            rows.append({"case": f"prepare bytes, {w} worker(s)", "tokens": index["tokens"],
                         "seconds": index["seconds"], "tokens_per_s": index["tokens_per_s"]})
        sample = tmp / "sample.txt"
        with open(paths[0], encoding="utf-8") as f:
            sample.write_text(f.read(args.bpe_chars), encoding="utf-8")
        bpe = train_bpe(file_documents([sample], "text", False), args.bpe_vocab)
        bpe.save(tmp / "bpe")
        for w in args.workers:
            index = prepare(tmp / f"bpe-w{w}", file_documents([sample], "text", False), str(tmp / "bpe"),
                            shard_tokens=args.shard_tokens, workers=w, progress_interval_s=3600)
            rows.append({"case": f"prepare BPE {args.bpe_vocab}, {w} worker(s)", "tokens": index["tokens"],
                         "seconds": index["seconds"], "tokens_per_s": index["tokens_per_s"]})

        shards_dir = tmp / f"shards-w{args.workers[0]}"
        corpus = load_corpus(DataConfig(name="shards", shards=ShardsConfig(dir=str(shards_dir))))
        ram = np.asarray(corpus.train)  # (N,) uint16, in memory
        ram.tofile(tmp / "one.bin")
        sources = {"shards": corpus.train, "one memmap": np.memmap(tmp / "one.bin", dtype=ram.dtype, mode="r"),
                   "RAM": ram}
        n_shards = len(list(shards_dir.glob("train_*.bin")))
        loader = {name: [] for name in sources}
        # model=tiny is compute-bound: shards against RAM; debug=tiny shows any cost of reading, memmap included
        train = {(shape, name): [] for shape in SHAPES
                 for name in (sources if shape == "debug=tiny" else ("shards", "RAM"))}
        for _ in range(args.rounds):
            for name, tokens in sources.items():
                loader[name].append(loader_rate(tokens, 128, 32, args.batches))
            for shape, name in train:
                steps = args.steps if shape == "debug=tiny" else args.model_steps
                train[(shape, name)].append(train_rate(sources[name], SHAPES[shape], steps, corpus.vocab_size))
        for name, rates in loader.items():
            rows.append({"case": f"loader 32x128, {name}", "batches_per_s": statistics.median(rates),
                         "tokens_per_s": statistics.median(rates) * 32 * 128, "vs_RAM": ratio(rates, loader["RAM"])})
        for (shape, name), rates in train.items():
            rows.append({"case": f"train {shape}, {name}", "tokens_per_s": statistics.median(rates),
                         "vs_RAM": ratio(rates, train[(shape, "RAM")]), "rounds": rates})
    result = {"rows": rows, "train_tokens": len(ram), "train_shards": n_shards, "documents": docs_written,
              "args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
              "cpus": os.cpu_count(), "torch": torch.__version__}
    print(format_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    lines = [f"train split: {result['train_tokens']:,} tokens in {result['train_shards']} shards; "
             f"{result['cpus']} CPUs; {result['machine']}",
             f"| {'case':<36} | {'tokens/s':>12} | {'vs RAM':>7} |", f"|{'-' * 38}|{'-' * 14}|{'-' * 9}|"]
    for r in result["rows"]:
        ratio = f"{r['vs_RAM']:.2f}" if "vs_RAM" in r else ""
        lines.append(f"| {r['case']:<36} | {r['tokens_per_s']:>12,.0f} | {ratio:>7} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
