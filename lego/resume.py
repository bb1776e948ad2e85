"""A training's resume checkpoint (`<training>/last.pt`): when it is written, what it holds, how it is read back.

    schedule = CheckpointSchedule(every_steps=1000, every_minutes=30.0)   # phase1.checkpoint_every_*
    if schedule.due(totals.steps): save_resume(work_dir, within_state(epoch_end, model, optimizer, within))
    state = load_resume(work_dir / "last.pt", model, "phase1")            # None: start over

Written at a validation (an "epoch" end, `lego.early_stopping`) or, with a schedule, between validations: then
it also holds `within`, the epoch in progress (its number, the optimizer steps and tokens it has run, its loss
sum and count over every rank, its seconds), and `lego.training.train_epoch` skips those steps' batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lego import distributed
from lego.artifacts import load_checkpoint, save_checkpoint, write_jsonl

log = logging.getLogger(__name__)

EPOCH_END_KEYS = ("epoch", "best_state", "best_val_loss", "best_epoch", "bad_epochs", "history", "stopped_early")


def epoch_end_state(state: Optional[dict]) -> dict:
    """The early-stopping part of a resume state (`early_stopping_loop`'s, at a validation): what a checkpoint
    between validations repeats from the last one; for None, that of a training before its first validation."""
    if state is None:
        return {"epoch": 0, "best_state": None, "best_val_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0,
                "history": [], "stopped_early": False}
    return {k: state[k] for k in EPOCH_END_KEYS}


@dataclass
class CheckpointSchedule:
    """When a training writes last.pt (phase1/phase2.checkpoint_every_steps / checkpoint_every_minutes).

    Neither set: after every validation (`at_validations`). Otherwise only after an optimizer step at which the
    training's step count is a multiple of `every_steps`, or `every_minutes` of wall clock have passed since
    the last checkpoint (or since this process started the training), whichever comes first."""

    every_steps: Optional[int] = None
    every_minutes: Optional[float] = None
    last: float = field(default_factory=lambda: time.monotonic())  # when the clock last started

    @property
    def at_validations(self) -> bool:
        return self.every_steps is None and self.every_minutes is None

    def due(self, steps: int) -> bool:
        """Whether to write after optimizer step `steps` (of the whole training); every rank gets the same
        answer: the clocks of ranks differ, so under torch.distributed any rank's clock decides (a gloo
        all-reduce on the host per step, no device sync)."""
        by_steps = self.every_steps is not None and steps % self.every_steps == 0
        by_clock = self.every_minutes is not None and time.monotonic() - self.last >= 60.0 * self.every_minutes
        if self.every_minutes is not None and distributed.is_distributed():
            by_clock = distributed.all_reduce_sum([float(by_clock)])[0] > 0
        if by_steps or by_clock:
            self.last = time.monotonic()
        return by_steps or by_clock


def within_state(epoch_end: dict, model, optimizer, within: dict) -> dict:
    """A resume state between validations: the last validation's early-stopping state (`epoch_end`), the
    weights, optimizer and RNG of now, and `within` (the epoch in progress)."""
    return {**epoch_end_state(epoch_end), "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None, "within": within}


def save_resume(work_dir: Path, state: dict) -> None:
    if not distributed.is_main():  # the ranks hold the same state; one copy on disk
        return
    save_checkpoint(work_dir / "last.pt", {"resume": state})
    write_jsonl(work_dir / "history.jsonl", state["history"])


def load_resume(path: Path, model, name: str) -> Optional[dict]:
    """The resume state at `path` if it exists and fits `model`; an unusable one is ignored with a warning."""
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path, what=f"{name} resume checkpoint")["resume"]
        model.load_state_dict(state["model"])  # shape check before trusting it
    except (ValueError, RuntimeError, KeyError) as e:
        log.warning("%s: ignoring unusable resume checkpoint %s (%s); starting this phase over", name, path,
                    str(e).splitlines()[0])
        return None
    return state
