"""Does a model's layer attend from each binding's value to its name? The first half of the lookup circuit.

    python scripts/chains_attention.py RUN/phase1/model.pt RUN/dense2/model.pt -- experiment=chains

A lookup (`?q` -> the value bound to q) takes two attention steps (Sanford, Hsu, Telgarsky 2024; induction
heads, Olsson et al. 2022): at the value's position a head copies the name before it (a previous-token head),
then the query attends to the position whose copied name matches and reads its value. For each checkpoint
(Hydra overrides after `--` fix the data, composed as `lego-run` composes them) and each of its layers and
heads, this prints the mean attention that a binding's value position pays to the token before it (its name),
over the validation split's first `--windows` windows, beside the same mean over every position (a head that
attends to the previous token everywhere). Bindings are found in the text: before a window's first `?`, a
token followed by `;` whose previous token is not `;` (`b9;qb;` binds b and q). Windows must start at a program
(one program per window, as `experiment=chains` has it). With `--json PATH` the table is also written there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from hydra import compose, initialize_config_dir

from lego.artifacts import load_checkpoint
from lego.batches import make_loader
from lego.checkpoint import stored_args
from lego.cli import to_config
from lego.config import resolve
from lego.data import load_corpus
from lego.model import Model, ModelArgs
from lego.rope import apply_rope

CONF = Path(__file__).resolve().parents[1] / "lego" / "conf"


def binding_values(x: torch.Tensor, semi: int, query: int) -> torch.Tensor:
    """(B, T) bool: the positions of bound values in windows `x` (B, T) of token ids (see the module docstring)."""
    B, T = x.shape
    before_query = torch.cumsum((x == query).long(), dim=1) == 0
    nxt = torch.zeros_like(x, dtype=torch.bool)
    nxt[:, :-1] = x[:, 1:] == semi
    prev_ok = torch.zeros_like(nxt)
    prev_ok[:, 1:] = x[:, :-1] != semi
    return before_query & nxt & prev_ok


@torch.no_grad()
def attention_maps(model: Model, x: torch.Tensor) -> List[torch.Tensor]:
    """Each layer's causal attention weights (B, heads, T, T), recomputed as `lego.model.Layer.forward` runs them."""
    h = model.embed(x)
    rope = None if model.rope_cos is None else (model.rope_cos, model.rope_sin)
    maps = []
    for layer in model.layers:
        B, T, C = h.shape
        q, k, _ = layer.qkv(layer.norm1(h)).split(C, dim=2)
        q, k = layer._heads(q), layer._heads(k)
        if rope is not None:
            q, k = apply_rope(q, rope[0][:T], rope[1][:T]), apply_rope(k, rope[0][:T], rope[1][:T])
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        maps.append(scores.softmax(-1))
        h = layer(h, rope)
    return maps


def previous_token_attention(model: Model, loader, semi: int, query: int, windows: int) -> List[Dict[str, list]]:
    """Per layer: {'value_to_name': [per head], 'all_to_previous': [per head]} mean attention weights."""
    model.eval()
    sums = [[torch.zeros(model.num_heads), torch.zeros(model.num_heads)] for _ in model.layers]
    counts = [0, 0]
    seen = 0
    for batch in loader:
        x = batch[0][: windows - seen]
        seen += len(x)
        vals = binding_values(x, semi, query)
        vals[:, 0] = False
        every = torch.ones_like(vals)
        every[:, 0] = False
        for layer, att in enumerate(attention_maps(model, x)):
            prev = torch.diagonal(att, offset=-1, dim1=-2, dim2=-1)  # (B, H, T-1): position t+1 -> t
            prev = torch.cat([torch.zeros_like(prev[..., :1]), prev], dim=-1)  # (B, H, T): t -> t-1
            sums[layer][0] += (prev * vals[:, None]).sum(dim=(0, 2))
            sums[layer][1] += (prev * every[:, None]).sum(dim=(0, 2))
        counts[0] += int(vals.sum())
        counts[1] += int(every.sum())
        if seen >= windows:
            break
    return [{"value_to_name": [round(float(v), 4) for v in s[0] / max(counts[0], 1)],
             "all_to_previous": [round(float(v), 4) for v in s[1] / max(counts[1], 1)]} for s in sums]


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--label", action="append", default=None,
                    help="a name for each checkpoint, in order (the JSON's keys; default: the paths)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    else:
        overrides = []
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = resolve(to_config(compose(config_name="config", overrides=["progress=false", *overrides])))
    corpus = load_corpus(cfg.data)
    ids = corpus.tokenizer.encode(";?") if hasattr(corpus.tokenizer, "encode") else list(b";?")
    semi, query = int(ids[0]), int(ids[1])
    labels = a.label or [str(p) for p in a.checkpoints]
    if len(labels) != len(a.checkpoints):
        ap.error(f"--label given {len(labels)} times for {len(a.checkpoints)} checkpoints")
    out = {}
    for name, path in zip(labels, a.checkpoints):
        state = load_checkpoint(path, what="checkpoint")
        model = Model(ModelArgs(**stored_args(state["model_args"])))
        model.load_state_dict(state["state_dict"])
        loader = make_loader(corpus.validation, cfg.data.seq_len, 256, shuffle=False, seed=0)
        out[name] = previous_token_attention(model, loader, semi, query, a.windows)
        for layer, row in enumerate(out[name]):
            v = " ".join(f"{w:.2f}" for w in row["value_to_name"])
            e = " ".join(f"{w:.2f}" for w in row["all_to_previous"])
            print(f"{name}  layer {layer + 1}: value->name {v} | every t->t-1 {e}")
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
