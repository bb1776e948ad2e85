"""A standard LM on every token (phase 1 and the dense baselines), shared through a content-addressed cache."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import torch

from lego import __version__, distributed
from lego.checkpoint import build_model, load_model, model_args, save_model
from lego.config import ASHEMConfig, create_standard_config
from lego.data import Corpus
from lego.model import DeepSupervisionTransformer
from lego.cost import dense_training_macs, forward_macs_per_token
from lego.stages.cache import through_cache
from lego.stages.setup import (Loaders, budget_steps, epoch_steps, loop_report, lr_schedule, make_optimizer,
                               model_macs, science_config)
from lego.trackers import Tracker
from lego.training import Trainer, fit, train_epoch


def train_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, stage_dir: Path,
                   device: torch.device, name: str, steps: Optional[int] = None,
                   tracker: Optional[Tracker] = None) -> DeepSupervisionTransformer:
    """Train a `num_layers`-layer LM on all tokens with phase 1's optimizer and schedule for a budget of `steps`
    optimizer steps (default phase1.max_epochs x phase1.epoch_steps), the schedule spanning exactly that budget,
    validating every phase1.epoch_steps steps; phase1.patience (if set) is an early-stopping guard.

    Writes stage_dir/model.pt (the best weights on validation), history.jsonl, result.json (with the training
    compute); resumes from stage_dir/last.pt; sends its curves to `tracker` under `name`. Returns the
    model with its best weights.
    """
    final = stage_dir / "model.pt"
    model = build_model(cfg, corpus.vocab_size, num_layers).to(device)
    if distributed.broadcast(final.exists()):  # rank 0 decides: it may be writing this file soon
        return load_model(final, model_args(model), device, f"{name} checkpoint")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, corpus.vocab_size, num_layers).to(device)
    p1 = cfg.phase1
    optimizer = make_optimizer(model, p1.lr, p1.weight_decay, device)
    tc = create_standard_config(num_layers)
    tc.grad_clip = p1.grad_clip
    trainer = Trainer(tc, device=device)
    if cfg.model.compile:
        model.compile_blocks()
    train_batches, per_epoch = epoch_steps(loaders.train, p1)
    steps = steps or budget_steps(p1, per_epoch)
    schedule = lr_schedule(p1, steps)
    shape = model_macs(cfg, corpus.vocab_size)
    step_macs = partial(dense_training_macs, num_layers=num_layers, **shape)

    def one_epoch(epoch: int, totals, max_steps: int) -> float:
        return train_epoch(model, train_batches, optimizer, trainer.stage_loss_sum, device, epoch=epoch,
                           grad_clip=p1.grad_clip, lr_factor=schedule, totals=totals, max_steps=max_steps,
                           grad_accum=p1.grad_accum, **loop_report(cfg, tracker, name))

    fit(model, one_epoch, lambda: trainer.validation_loss(model, loaders.check), optimizer=optimizer,
        work_dir=stage_dir, budget_steps=steps, steps_per_epoch=per_epoch, patience=p1.patience, name=name,
        save=lambda path, result: save_model(path, model, cfg, stage=name, result=result),
        macs=lambda totals: step_macs(tokens=totals.tokens),
        val_pass_macs=window_positions(loaders.check, cfg.data.seq_len) * forward_macs_per_token(
            num_layers=num_layers, **shape), tracker=tracker)
    return model


def window_positions(loader, seq_len: int) -> int:
    """Input positions of one pass over a loader of token windows (every rank's share together)."""
    return len(loader.dataset) * seq_len


def cached_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, stage_dir: Path,
                    device: torch.device, name: str, steps: Optional[int] = None,
                    tracker: Optional[Tracker] = None) -> DeepSupervisionTransformer:
    """`train_standard`, shared through a content-addressed cache when `phase1.cache` is on.

    The key hashes exactly what determines the result: model, data, phase-1 optimisation,
    depth, budget in steps, seed, corpus content and device type (`lego.stages.cache.through_cache`).
    """
    if not cfg.phase1.cache or distributed.broadcast((stage_dir / "model.pt").exists()):
        return train_standard(cfg, corpus, loaders, num_layers, stage_dir, device, name, steps, tracker)
    science = science_config(cfg)
    unkeyed = ("cache", "layers", "budget_fraction", "max_epochs")
    key_src = {"model": science["model"], "data": science["data"],
               "phase1": {k: v for k, v in science["phase1"].items() if k not in unkeyed},
               "num_layers": num_layers, "seed": cfg.seed, "corpus": corpus.cache_key, "device": device.type,
               "lego": __version__, "records": "budget",  # budget-first training: result.json records its budget
               # the steps that run are keyed, not how they were derived (a dense model of the same depth and
               # steps is the same model)
               "steps": steps or budget_steps(cfg.phase1, epoch_steps(loaders.train, cfg.phase1)[1])}
    return through_cache(cfg, name, key_src, stage_dir,
                         lambda entry: train_standard(cfg, corpus, loaders, num_layers, entry, device, name, steps,
                                                      tracker),
                         ("model.pt", "history.jsonl", "result.json"))
