"""A standard LM on every token (phase 1 and the dense baselines), shared through the model cache.

    model = cached_standard(cfg, corpus, loaders, 4, run_dir / "dense4", device, "dense4", steps=1200)
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from lego import __version__
from lego.checkpoint import build_model, expected_args, load_model
from lego.config import ASHEMConfig, create_standard_config
from lego.cost import dense_training_macs, forward_macs_per_token
from lego.data import Corpus
from lego.model import Model
from lego.pipeline.cache import nearest_cached_steps, through_cache
from lego.pipeline.compute import cost_shape, window_positions
from lego.pipeline.results import load_or_run, on_disk
from lego.pipeline.science import science_config
from lego.pipeline.setup import Loaders
from lego.pipeline.train import phase1_budget_steps, train_block
from lego.trackers import Tracker
from lego.training import Trainer, train_epoch


def train_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, out: Path,
                   device: torch.device, name: str, steps: Optional[int] = None,
                   tracker: Optional[Tracker] = None) -> Model:
    """A `num_layers`-layer LM trained on all tokens with phase 1's optimizer and schedule (`train_block`) for a
    budget of `steps` optimizer steps (default phase1.max_epochs x phase1.epoch_steps), its loss at the last
    layer; or, when out/model.pt exists, that model. Writes out/ (model.pt, history.jsonl, result.json)."""

    def train() -> Model:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, corpus.vocab_size, num_layers).to(device)
        tc = create_standard_config(num_layers)
        tc.grad_clip = cfg.phase1.grad_clip
        trainer = Trainer(tc, device=device)
        shape = cost_shape(cfg, corpus.vocab_size)
        step_macs = partial(dense_training_macs, num_layers=num_layers, **shape)
        return train_block(
            cfg, model, cfg.phase1, loaders.train,
            lambda batches, optimizer, **kw: train_epoch(model, batches, optimizer, trainer.stage_loss_sum, device,
                                                         **kw),
            lambda: trainer.validation_loss(model, loaders.check), name=name, out=out, device=device,
            macs=lambda totals: step_macs(tokens=totals.tokens), steps=steps, tracker=tracker,
            val_pass_macs=window_positions(loaders.check, cfg.data.seq_len) * forward_macs_per_token(
                num_layers=num_layers, **shape))

    expect = expected_args(cfg, corpus.vocab_size, num_layers)
    return load_or_run(out / "model.pt", lambda path: load_model(path, expect, device, f"{name} checkpoint"), train)


def cached_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, out: Path,
                    device: torch.device, name: str, steps: Optional[int] = None,
                    tracker: Optional[Tracker] = None, tolerance: float = 0.0) -> Model:
    """`train_standard`, shared through the model cache when `phase1.cache` is on.

    The key hashes exactly what determines the result: model, data, phase-1 optimisation,
    depth, budget in steps, seed, corpus content and device type (`lego.pipeline.cache.through_cache`).
    With a `tolerance` (a fraction of `steps`), a model of the same key trained for a step count within it is
    reused instead (`nearest_cached_steps`): the caller records what it spent against what it asked.
    """
    if not cfg.phase1.cache or on_disk(out / "model.pt"):
        return train_standard(cfg, corpus, loaders, num_layers, out, device, name, steps, tracker)
    science = science_config(cfg)
    unkeyed = ("cache", "layers", "budget_fraction", "max_epochs", "scaffold")  # how phase 1 is trained, not this

    def key_at(n: int) -> Dict[str, Any]:
        return {"model": science["model"], "data": science["data"],
                "phase1": {k: v for k, v in science["phase1"].items() if k not in unkeyed},
                "num_layers": num_layers, "seed": cfg.seed, "corpus": corpus.cache_key, "device": device.type,
                "lego": __version__, "records": "budget",  # budget-first training: result.json records its budget
                # the steps that run are keyed, not how they were derived (a dense model of the same depth and
                # steps is the same model)
                "steps": n}

    steps = steps or phase1_budget_steps(cfg, loaders)
    if tolerance:
        steps = nearest_cached_steps(cfg, name, key_at, steps, tolerance)
    return through_cache(cfg, name, key_at(steps), out,
                         lambda entry: train_standard(cfg, corpus, loaders, num_layers, entry, device, name, steps,
                                                      tracker),
                         ("model.pt", "history.jsonl", "result.json"))
