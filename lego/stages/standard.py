"""A standard LM on every token (phase 1 and the dense baselines), shared through a content-addressed cache."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import torch

from lego import __version__, distributed
from lego.batches import EpochSteps
from lego.checkpoint import build_model, load_model, model_args, save_model
from lego.config import ASHEMConfig, create_standard_config, to_dict
from lego.data import Corpus
from lego.model import DeepSupervisionTransformer
from lego.cost import dense_training_macs
from lego.stages.cache import through_cache
from lego.stages.setup import (Loaders, loop_report, lr_schedule, make_optimizer, model_macs,
                               science_config)
from lego.trackers import Tracker
from lego.training import Trainer, fit, train_epoch



def train_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, stage_dir: Path,
                   device: torch.device, name: str, max_epochs: Optional[int] = None,
                   tracker: Optional[Tracker] = None) -> DeepSupervisionTransformer:
    """Train a `num_layers`-layer LM on all tokens with phase 1's optimizer, schedule and early stopping,
    for at most `max_epochs` (default phase1.max_epochs) epochs of phase1.epoch_steps steps.

    Writes stage_dir/model.pt (best weights), history.jsonl, result.json (with the training
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
    train_batches = EpochSteps(loaders.train, p1.epoch_steps)
    max_epochs = max_epochs or p1.max_epochs
    schedule = lr_schedule(p1, len(train_batches), max_epochs)
    step_macs = partial(dense_training_macs, num_layers=num_layers, **model_macs(cfg, corpus.vocab_size))

    def one_epoch(epoch: int, totals) -> float:
        return train_epoch(model, train_batches, optimizer, trainer.stage_loss_sum, device, epoch=epoch,
                           grad_clip=p1.grad_clip, lr_factor=schedule, totals=totals,
                           **loop_report(cfg, tracker, name))

    fit(model, one_epoch, lambda: trainer.validation_loss(model, loaders.validation), optimizer=optimizer,
        work_dir=stage_dir, max_epochs=max_epochs, patience=p1.patience, name=name,
        save=lambda path, result: save_model(path, model, cfg, stage=name, result=result),
        macs=lambda totals: step_macs(tokens=totals.tokens), tracker=tracker)
    return model


def cached_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, stage_dir: Path,
                    device: torch.device, name: str, max_epochs: Optional[int] = None,
                    tracker: Optional[Tracker] = None) -> DeepSupervisionTransformer:
    """`train_standard`, shared through a content-addressed cache when `phase1.cache` is on.

    The key hashes exactly what determines the result: model, data, phase-1 optimisation,
    depth, seed, corpus content and device type (`lego.stages.cache.through_cache`).
    """
    if not cfg.phase1.cache or distributed.broadcast((stage_dir / "model.pt").exists()):
        return train_standard(cfg, corpus, loaders, num_layers, stage_dir, device, name, max_epochs, tracker)
    science = science_config(cfg)
    unkeyed = ("cache", "layers", "budget_fraction")
    key_src = {"model": science["model"], "data": science["data"],
               "phase1": {k: v for k, v in to_dict(cfg)["phase1"].items() if k not in unkeyed},
               "num_layers": num_layers, "seed": cfg.seed, "corpus": corpus.cache_key, "device": device.type,
               "lego": __version__, "records": "compute"}  # result.json records steps and training MACs
    # A baseline's own budget, or phase 1's under phase1.budget_fraction: the epochs that run are keyed, not
    # the fraction (a dense model of the same depth and epochs is the same model).
    if max_epochs is not None and max_epochs != cfg.phase1.max_epochs:
        key_src["phase1"]["max_epochs"] = max_epochs
    return through_cache(cfg, name, key_src, stage_dir,
                         lambda entry: train_standard(cfg, corpus, loaders, num_layers, entry, device, name, max_epochs,
                                                      tracker),
                         ("model.pt", "history.jsonl", "result.json"))
