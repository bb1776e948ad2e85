"""Stage `blocks` (it runs with phase2, for more than two `blocks`): Blocks 3, 4, ... on top of the phase-2
model, each trained as phase 2 trains Block 2 and with phase2's settings, into block3/, block4/, ...

For Block k: calibrate the exit below it (layer blocks[k-2]) on the calibration tokens that reach it, at its
hard_example_ratios entry (block<k>/threshold.json), then grow the model by Block k and train it on the
training tokens that reach that exit and are hard there (`lego.pipeline.upper.train_upper`). Every lower exit
stays bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from lego.artifacts import read_json, write_json
from lego.checkpoint import expected_args, load_model
from lego.config import block_layers, exit_ratios
from lego.model import Model
from lego.pipeline.cache import through_cache
from lego.pipeline.mining import calibrate
from lego.pipeline.results import load_or_run, on_disk, require
from lego.pipeline.setup import RunContext
from lego.pipeline.upper import BLOCK_FILES, block_key, train_upper


def run(ctx: RunContext, model2: Model, threshold: float, *,
        train: bool = True) -> Tuple[Model, List[Dict[str, Any]]]:
    """Blocks 3, 4, ... on `model2` (whose exit routes at `threshold`). With `train=False` (phase2 not in stages)
    it reads what a previous invocation wrote. With phase1.cache each Block is shared through the model cache
    (`block_key`). Returns the final model and the threshold.json of each exit above the first."""
    cfg = ctx.cfg
    model, infos, thresholds = model2, [], [threshold]
    for k in range(2, len(block_layers(cfg))):  # blocks[k] ends Block k + 1; its exit below is blocks[k - 1]
        name = f"block{k + 1}"
        out = ctx.run_dir / name
        if not train:
            require(out / "model.pt", f"stages={cfg.stages}", f"{name}'s result", "phase2")
        if train and cfg.phase1.cache and not on_disk(out / "model.pt"):
            model, info = through_cache(cfg, name, block_key(cfg, k + 1, ctx.corpus.cache_key, ctx.device), out,
                                        lambda entry: block(ctx, model, k, thresholds, entry),
                                        ("threshold.json", *BLOCK_FILES))
        else:
            model, info = block(ctx, model, k, thresholds, out)  # what the run dir holds, or trained there
        infos.append(info)
        thresholds.append(info["threshold"])
    return model, infos


def block(ctx: RunContext, below: Model, k: int, thresholds: Sequence[float],
          entry: Path) -> Tuple[Model, Dict[str, Any]]:
    """Block k + 1 of `blocks` on `below` (whose exits route at `thresholds`) in `entry` (its run-dir dir or a
    model-cache entry): calibrate the exit below it (threshold.json) and train it, or read what `entry` holds.
    Returns (the grown model, its threshold.json)."""
    cfg, blocks, ratios = ctx.cfg, block_layers(ctx.cfg), exit_ratios(ctx.cfg)
    name = f"block{k + 1}"
    info = load_or_run(entry / "threshold.json", read_json,
                       lambda: calibrate(cfg, below, ctx.loaders, ctx.device, exit_layer=blocks[k - 1],
                                         ratio=ratios[k - 1], below=thresholds), write_json)
    expect = expected_args(cfg, ctx.corpus.vocab_size, blocks[k], [*thresholds, info["threshold"]])
    model = load_or_run(entry / "model.pt", lambda path: load_model(path, expect, ctx.device, f"{name} checkpoint"),
                        lambda: train_upper(cfg, below, [*thresholds, info["threshold"]], ctx.loaders, ctx.run_dir,
                                            ctx.device, ctx.tracker, name=name, num_layers=blocks[k], out=entry))
    return model, info
