"""`early_stopping_loop`: epochs of training, a validation after each, the best weights kept, the opt-in
patience guard and the state to resume from (`lego.training.fit` runs every training through it).

    result = early_stopping_loop(model, train_one_epoch, validate, max_epochs=6, patience=None,
                                 optimizer=optimizer, on_epoch_end=save_state, resume=state)
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised when a loss becomes NaN or infinite."""


def early_stopping_loop(
    model: torch.nn.Module,
    train_epoch: Callable[[int], float],
    validate: Callable[[], float],
    *,
    max_epochs: int,
    patience: Optional[int],
    optimizer: Optional[torch.optim.Optimizer] = None,
    on_epoch_end: Optional[Callable[[dict], None]] = None,
    resume: Optional[dict] = None,
    name: str = "train",
) -> dict:
    """Train `max_epochs` epochs, validating after each; keep the weights of the best validation loss.

    With `patience` (an opt-in guard; None = off) training also stops once `patience` epochs pass
    without a better validation loss, and the result says so (`stopped_early`).
    `train_epoch(epoch)` returns the mean training loss, `validate()` the validation loss.
    After every epoch `on_epoch_end(state)` receives everything needed to resume (weights,
    optimizer, best weights, counters, history, RNG); pass such a state as `resume` to continue.
    Returns best_val_loss, best_val_ppl, best_epoch, epochs_run, stopped_early, history.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs={max_epochs} must be >= 1")
    if patience is not None and patience < 1:
        raise ValueError(f"patience={patience} must be >= 1 (or None: no early stopping)")
    if resume is not None:
        model.load_state_dict(resume["model"])
        if optimizer is not None and resume.get("optimizer") is not None:
            optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        if resume.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])  # dropout on a GPU resumes exactly too
        best_state, best_loss, best_epoch = resume["best_state"], resume["best_val_loss"], resume["best_epoch"]
        bad, history, start = resume["bad_epochs"], list(resume["history"]), resume["epoch"] + 1
        stopped = resume.get("stopped_early", False)
        log.info("%s: resuming after epoch %d (best %.4f at epoch %d)", name, resume["epoch"], best_loss, best_epoch)
    else:
        best_state, best_loss, best_epoch, bad, history, start, stopped = None, math.inf, 0, 0, [], 1, False
    epoch = start - 1
    for epoch in range(start, max_epochs + 1):
        if stopped:
            break
        out = train_epoch(epoch)  # the mean training loss, or a dict with it and per-epoch extras
        extra = dict(out) if isinstance(out, dict) else {"train_loss": out}
        train_loss = extra.pop("train_loss")
        val_loss = validate()
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            kept = (f"epoch {epoch - 1}'s checkpoint is kept" if epoch > 1
                    else "nothing was saved (it diverged in the first epoch)")
            raise TrainingDiverged(
                f"{name}: loss became {train_loss if not math.isfinite(train_loss) else val_loss} at epoch {epoch}; "
                f"{kept}; lower the learning rate and use a new run dir"
            )
        improved = val_loss < best_loss
        if improved:
            best_loss, best_epoch, bad = val_loss, epoch, 0
            best_state = keep_best(model, best_state)
        else:
            bad += 1
        stopped = patience is not None and bad >= patience
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)),
               "best": improved, **extra}
        history.append(row)
        log.info("%s epoch %d: train %.4f  val %.4f (ppl %.2f)%s", name, epoch, train_loss, val_loss,
                 row["val_ppl"], "  *" if improved else "")
        if on_epoch_end is not None:
            on_epoch_end({
                "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "best_state": best_state, "best_val_loss": best_loss, "best_epoch": best_epoch,
                "bad_epochs": bad, "history": history, "rng": torch.get_rng_state(), "stopped_early": stopped,
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            })
        if stopped:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "best_val_loss": best_loss,
        "best_val_ppl": math.exp(min(best_loss, 700)),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopped,
        "history": history,
    }


def keep_best(model: torch.nn.Module, best: Optional[dict]) -> dict:
    """`model`'s state dict copied into host buffers: `best`'s tensors when it has them (copied into, so a training
    allocates its best state once, not at every improvement), else new ones, pinned for a CUDA model so the copies
    run asynchronously; on the host, the best state takes no device memory. Returns when the copies are done."""
    state = model.state_dict()
    if best is None or best.keys() != state.keys() or any(best[k].shape != v.shape for k, v in state.items()):
        best = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda) for k, v in state.items()}
    for k, v in state.items():
        best[k].copy_(v.detach(), non_blocking=True)
    if any(v.is_cuda for v in state.values()):
        torch.cuda.synchronize()  # the host buffers are read (saved, restored) right after
    return best
