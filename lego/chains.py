"""Variable-binding programs whose every byte carries a label: how many lookups its prediction needs.

    lego-run data=chains                          # the corpus (lego/conf/data/chains.yaml)
    rows, labels = generate(ChainsConfig(), "train")   # lines, and one int8 label per UTF-8 byte

A program binds `num_vars` one-letter variables, each to a fresh value or to an earlier variable,
then asks for some of them: `m=4;y=7;b=m;i=b;z=i;?z=4`. The answer after `?z=` needs a chain of
lookups z -> i -> b -> m -> 4: 4 hops, the number of variables on z's chain. The variables form
disjoint chains: `queries` queried ones, whose depths are drawn from `depth_probs`, and unqueried
distractors of the same depths (truncated to the variables left), their statements interleaved
uniformly at random, each chain in order. The label of a byte describes it as a target:

    k >= 1         an answer that needs k hops
    UNPREDICTABLE  a freshly drawn name or value (a statement's two sides, the queried name)
    FORMAT         '=', ';', '?', the newline: predictable from the format alone
With data.chains.assign='' the same program reads `m4;y7;bm;ib;zi;?z4`.
    TEXT           a line of Shakespeare (data.chains.text_fraction of the lines)
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from lego.config import ChainsConfig

FORMAT, UNPREDICTABLE, TEXT = 0, -1, -2
LABEL_VERSION = 1  # bump when labels change for the same text, so cached labels are not trusted
_NAMES = {FORMAT: "format", UNPREDICTABLE: "unpredictable", TEXT: "text"}


def label_name(code: int) -> str:
    """'format', 'unpredictable', 'text', or 'k hops' for an answer."""
    return _NAMES.get(int(code), f"{int(code)} hops")


def split_rng(c: ChainsConfig, split: str) -> random.Random:
    """The generator of one split: seeded by (seed, split), so the three splits never share a draw."""
    digest = hashlib.sha256(f"chains:{c.seed}:{split}".encode()).digest()[:8]
    return random.Random(int.from_bytes(digest, "little"))


def program(c: ChainsConfig, rng: random.Random) -> Tuple[str, List[int]]:
    """One program line (newline included) and the label of each of its characters (all one byte)."""
    depths = list(range(1, len(c.depth_probs) + 1))
    names = iter(rng.sample(c.names, c.num_vars))
    chains = [[next(names) for _ in range(d)] for d in rng.choices(depths, weights=c.depth_probs, k=c.queries)]
    left = c.num_vars - sum(map(len, chains))
    while left:  # distractors: chains like the queried ones, never asked for
        d = min(rng.choices(depths, weights=c.depth_probs)[0], left)
        chains.append([next(names) for _ in range(d)])
        left -= d
    value = [rng.choice(c.values) for _ in chains]
    order = [i for i, chain in enumerate(chains) for _ in chain]
    rng.shuffle(order)  # a uniform interleaving: the j-th draw of chain i is its j-th statement
    parts: List[Tuple[str, int]] = []
    eq = [(c.assign, FORMAT)] if c.assign else []  # data.chains.assign: '=' or nothing between name and value
    done = [0] * len(chains)
    for i in order:
        j, chain = done[i], chains[i]
        rhs = value[i] if j == 0 else chain[j - 1]
        parts += [(chain[j], UNPREDICTABLE), *eq, (rhs, UNPREDICTABLE), (";", FORMAT)]
        done[i] += 1
    asked = list(range(c.queries))
    rng.shuffle(asked)
    for n, i in enumerate(asked):
        parts += [("?", FORMAT), (chains[i][-1], UNPREDICTABLE), *eq, (value[i], len(chains[i])),
                  (";" if n + 1 < len(asked) else "\n", FORMAT)]
    return "".join(ch for ch, _ in parts), [lab for _, lab in parts]


def generate(c: ChainsConfig, split: str, text_lines: Sequence[str] = ()) -> Tuple[List[str], np.ndarray]:
    """The split's lines (`train_lines` or `eval_lines` of them, each ending in a newline) and the int8
    label of every UTF-8 byte of their concatenation. A share `text_fraction` of the lines (drawn per
    line) are the next non-empty lines of `text_lines`, in order, cycling; deterministic per (seed, split)."""
    rng = split_rng(c, split)
    n = c.train_lines if split == "train" else c.eval_lines
    text = [t for t in (line.strip() for line in text_lines) if t]
    if c.text_fraction > 0 and not text:
        raise ValueError("data.chains.text_fraction > 0 needs text lines")
    rows: List[str] = []
    labels = bytearray()
    next_text = 0
    for _ in range(n):
        if c.text_fraction > 0 and rng.random() < c.text_fraction:
            row = text[next_text % len(text)] + "\n"
            next_text += 1
            labels += np.full(len(row.encode("utf-8")), TEXT, dtype=np.int8).tobytes()
        else:
            row, lab = program(c, rng)
            labels += np.asarray(lab, dtype=np.int8).tobytes()
        rows.append(row)
    return rows, np.frombuffer(bytes(labels), dtype=np.int8).copy()


def label_counts(labels: np.ndarray) -> Dict[str, int]:
    """{label name: bytes with it}, in code order (text, unpredictable, format, 1 hop, ...)."""
    codes, counts = np.unique(np.asarray(labels), return_counts=True)
    return {label_name(k): int(n) for k, n in zip(codes, counts)}


def write_labels(directory: Path, labels: Dict[str, np.ndarray], tokens: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    """Write each split's labels beside its tokens in the corpus cache (`<split>.labels.bin`, int8, one per
    token: byte tokens); returns the label counts per split for meta.json."""
    for split, lab in labels.items():
        if len(lab) != tokens[split]:
            raise RuntimeError(f"{split}: {len(lab)} labels for {tokens[split]} tokens")
        (Path(directory) / f"{split}.labels.bin").write_bytes(np.asarray(lab, dtype=np.int8).tobytes())
    return {split: label_counts(lab) for split, lab in labels.items()}


def open_labels(directory: Path, split: str, n_tokens: int) -> np.ndarray:
    """The labels `write_labels` wrote for `split`, memory-mapped (n_tokens,) int8."""
    path = Path(directory) / f"{split}.labels.bin"
    if not path.is_file() or path.stat().st_size != n_tokens:
        raise RuntimeError(f"cache file {path} is missing or has the wrong size; delete {directory} to rebuild it")
    return np.memmap(path, dtype=np.int8, mode="r", shape=(n_tokens,))


def guess_accuracy(c: ChainsConfig, split: str = "validation", programs: int = 20000) -> Dict[str, float]:
    """Per hop count ('k hops'), the expected accuracy of guessing an answer uniformly among the distinct values
    bound in its program: what a model that copies a value from the program but resolves no lookup scores.
    Over the first `programs` programs of `split` (text lines excluded); deterministic per (config, split)."""
    rng = split_rng(c, split)
    sums: Dict[int, List[float]] = {}
    for _ in range(programs):
        line, labels = program(c, rng)
        distinct = len({ch for ch, lab in zip(line, labels) if lab == UNPREDICTABLE and ch in c.values})
        for lab in labels:
            if lab > 0:
                sums.setdefault(lab, []).append(1.0 / distinct)
    return {label_name(k): sum(v) / len(v) for k, v in sorted(sums.items())}
