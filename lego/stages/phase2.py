"""Stage `phase2`: grow the phase-1 model and train its upper Block on the training split's hard
tokens, early-stopped on the validation split's (SPEC section 3.3)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from lego import distributed
from lego.artifacts import StageError
from lego.ashem import evaluate_on_hard_examples, train_upper_layers
from lego.batches import EpochSteps
from lego.checkpoint import load_model, model_args, save_model
from lego.config import ASHEMConfig
from lego.model import DeepSupervisionTransformer
from lego.stages.hard_examples import hard_loader
from lego.cost import phase2_training_macs
from lego.stages.setup import Loaders, loop_report, lr_schedule, make_optimizer, model_macs
from lego.trackers import Tracker
from lego.training import fit


def grown(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float) -> DeepSupervisionTransformer:
    """The phase-2 model before training: model1 grown to `phase2.layers` with the calibrated threshold."""
    return model1.grow(cfg.phase2.layers, routing_threshold=threshold, deep_head=cfg.phase2.deep_head,
                       upper_context=cfg.phase2.upper_context)


def stage_phase2(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float, loaders: Loaders,
                 run_dir: Path, device: torch.device, tracker: Optional[Tracker] = None) -> DeepSupervisionTransformer:
    """Train the upper Block; writes run_dir/phase2/ (model.pt, history.jsonl, result.json); curves to `tracker`."""
    out = run_dir / "phase2"
    exit_layer = cfg.phase1.layers
    if distributed.broadcast((out / "model.pt").exists()):
        return load_model(out / "model.pt", model_args(grown(cfg, model1, threshold)), device, "phase2 checkpoint")
    scratch = out / "scratch"
    train_hard = hard_loader(cfg, model1, loaders.train_ordered, threshold, device, scratch / "train", shuffle=True,
                             what="phase2 train")
    val_hard = hard_loader(cfg, model1, loaders.validation, threshold, device, scratch / "validation",
                           shuffle=False, what="phase2 validation")
    torch.manual_seed(cfg.seed + 1)
    model2 = grown(cfg, model1, threshold)
    if cfg.model.compile:
        model2.compile_blocks()
    p2 = cfg.phase2
    optimizer = make_optimizer(model2, p2.lr, p2.weight_decay, device)
    train_batches = EpochSteps(train_hard, p2.epoch_steps)
    schedule = lr_schedule(p2, len(train_batches), p2.max_epochs)
    shape = model_macs(cfg, model1.vocab_size)

    def train_macs(totals) -> float:
        return phase2_training_macs(tokens=totals.tokens, hard_ratio=totals.counted / max(totals.tokens, 1),
                                    exit_layer=exit_layer, num_layers=p2.layers, policy=p2.upper_context,
                                    recompute=cfg.hard_examples.store == "recompute", **shape)

    fit(model2,
        lambda epoch, totals: train_upper_layers(model2, train_batches, optimizer, None, device, exit_layer,
                                                 grad_clip=p2.grad_clip, epoch=epoch, lr_factor=schedule,
                                                 totals=totals, **loop_report(cfg, tracker, "phase2")),
        lambda: evaluate_on_hard_examples(model2, val_hard, None, device, exit_layer)["loss"],
        optimizer=optimizer, work_dir=out, max_epochs=p2.max_epochs, patience=p2.patience, name="phase2",
        save=lambda path, result: save_model(path, model2, cfg, stage="phase2", result=result, threshold=threshold),
        macs=train_macs, tracker=tracker)
    shutil.rmtree(scratch, ignore_errors=True)
    return model2


def load_phase2(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float, run_dir: Path,
                device: torch.device) -> DeepSupervisionTransformer:
    """The phase-2 model a previous invocation wrote, for runs whose `stages` leave phase2 out."""
    path = run_dir / "phase2" / "model.pt"
    if not path.exists():
        raise StageError(f"stages={cfg.stages} needs phase 2's result at {path}; include phase2 in stages")
    return load_model(path, model_args(grown(cfg, model1, threshold)), device, "phase2 checkpoint")
