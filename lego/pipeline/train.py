"""`train_block`: the one skeleton every trained model runs through (phase 1, each dense baseline, phase 2 and
every later Block): AdamW, the learning-rate schedule over a budget of optimizer steps, and `lego.training.fit`
(validation, resume, model.pt / history.jsonl / result.json). What differs between them is passed in: the
model (built and seeded by the caller), its batches and one pass over them, its validation, its MACs.

    train_block(cfg, model, cfg.phase1, loaders.train, one_pass, validate, name="phase1", out=run_dir / "phase1",
                device=device, macs=..., val_pass_macs=...)
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from lego.batches import EpochSteps
from lego.checkpoint import save_model
from lego.config import ASHEMConfig, OptimizerConfig
from lego.model import Model
from lego.resume import CheckpointSchedule
from lego.schedule import lr_factor
from lego.trackers import Tracker
from lego.training import TrainingTotals, fit

OnePass = Callable[..., float]  # (batches, optimizer, *, epoch, grad_clip, lr_factor, totals, ...) -> mean loss


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (dim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused kernel not available for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, foreach=device.type == "cuda")


def lr_schedule(group: OptimizerConfig, total_steps: int) -> Optional[Callable[[int], float]]:
    """The lr factor of each optimizer step under `group.schedule` over a budget of `total_steps` steps (the last
    one at the floor); None for `constant` (the lr is left alone)."""
    if group.schedule == "constant":
        return None
    return partial(lr_factor, schedule=group.schedule, warmup_steps=group.warmup_steps, total_steps=total_steps,
                   min_lr_ratio=group.min_lr_ratio)


def epoch_steps(loader, group: OptimizerConfig) -> Tuple[EpochSteps, int]:
    """One epoch of `group` over `loader`: its batches, `group.epoch_steps` x `group.grad_accum` of them (None: the
    whole loader), and the optimizer steps they make (`grad_accum` batches each, the last step taking what is
    left)."""
    batches = EpochSteps(loader, None if group.epoch_steps is None else group.epoch_steps * group.grad_accum)
    return batches, math.ceil(len(batches) / group.grad_accum)


def budget_steps(group: OptimizerConfig, steps_per_epoch: int) -> int:
    """A model's own budget in optimizer steps: `group.max_epochs` epochs of `steps_per_epoch` steps."""
    return group.max_epochs * steps_per_epoch


def phase1_budget_steps(cfg: ASHEMConfig, loaders) -> int:
    """phase1.max_epochs x phase1.epoch_steps over the training split: phase 1's own budget in steps, and under
    phase1.budget_fraction the whole pipeline's budget counted in phase-1 steps."""
    return budget_steps(cfg.phase1, epoch_steps(loaders.train, cfg.phase1)[1])


def reporting(cfg: ASHEMConfig, tracker: Optional[Tracker], prefix: str) -> Dict[str, Any]:
    """`lego.training.train_epoch`'s reporting keywords for the model `prefix`: the run's tracker (None: none)
    every `logger.log_every` optimizer steps, and the progress display."""
    return dict(tracker=tracker, prefix=prefix, log_every=cfg.logger.log_every, progress=cfg.progress,
                progress_interval_s=cfg.progress_interval_s)


def train_block(cfg: ASHEMConfig, model: Model, group: OptimizerConfig, loader,
                one_pass: OnePass, validate: Callable[[], float], *, name: str, out: Path, device: torch.device,
                macs: Callable[[TrainingTotals], float], val_pass_macs: float, steps: Optional[int] = None,
                first_epoch: int = 0, threshold: Optional[float] = None, record: Optional[dict] = None,
                tracker: Optional[Tracker] = None) -> Model:
    """Train `model` with `group`'s settings (phase1 or phase2) for `steps` optimizer steps (default: its own
    budget, `budget_steps`), the schedule spanning exactly that budget, validating every `group.epoch_steps`
    steps; `group.patience` (if set) is an early-stopping guard. Writes out/model.pt (the best weights on
    validation; with `threshold` recorded in its meta), history.jsonl and result.json (with `record`, the
    micro-batches per step `grad_accum` and the training compute), resumes from out/last.pt (written at each
    validation, or on `group.checkpoint_every_steps` / `_minutes`), sends its curves to `tracker` under `name`.
    Returns `model` with its best weights.

    `one_pass(batches, optimizer, epoch=, grad_clip=, lr_factor=, totals=, max_steps=, grad_accum=, **reporting)`
    trains one epoch (`lego.training.train_epoch` or `lego.ashem.train_upper_layers` with the model's loss);
    its epochs are numbered from `first_epoch` + 1, which seeds their batch order. `validate()` is the validation
    loss; `macs(totals)` the training multiply-adds so far, `val_pass_macs` those of one validation pass.
    """
    if cfg.model.compile:
        model.compile_blocks()
    optimizer = make_optimizer(model, group.lr, group.weight_decay, device)
    batches, per_epoch = epoch_steps(loader, group)
    steps = steps or budget_steps(group, per_epoch)
    schedule = lr_schedule(group, steps)
    meta = {} if threshold is None else {"threshold": threshold}
    fit(model,
        lambda epoch, totals, max_steps, **within: one_pass(
            batches, optimizer, epoch=first_epoch + epoch, grad_clip=group.grad_clip, lr_factor=schedule,
            totals=totals, max_steps=max_steps, grad_accum=group.grad_accum, **reporting(cfg, tracker, name), **within),
        validate, optimizer=optimizer, work_dir=out, budget_steps=steps, steps_per_epoch=per_epoch,
        patience=group.patience, name=name,
        save=lambda path, result: save_model(path, model, cfg, stage=name, result=result, **meta),
        macs=macs, val_pass_macs=val_pass_macs, record={"grad_accum": group.grad_accum, **(record or {})},
        tracker=tracker,
        checkpoints=CheckpointSchedule(group.checkpoint_every_steps, group.checkpoint_every_minutes))
    return model
