"""Staged losses, the one training loop (`train_epoch` with gradient accumulation, `fit`: a budget of steps,
validation, the opt-in early-stopping guard of `lego.early_stopping`, resume, a training's files), `Trainer`.

A *training* is one model trained to its budget (phase1, phase2, block3, dense4, ...); a `StageConfig` (the
specification's name) is one term of its loss.

Three controls stay independent (SPEC section 2): `StageConfig` says where the loss is taken,
`requires_grad` says what updates, `routing_threshold` + `exit_layer` say where a token stops
at inference. This module owns the first and the third; the second is the model's business.

    config = TrainingConfig(stages=[StageConfig(layers=(2, 2), loss_weight=1.0)])
    trainer = Trainer(config, vocab_size=vocab_size, device="cpu")
    result = trainer.train_with_early_stopping(model, train_loader, val_loader, optimizer, patience=1)
    stats = Trainer(TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=t, exit_layer=2),
                    vocab_size).evaluate(model_extended, test_loader)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lego import distributed
from lego.artifacts import write_json, write_jsonl
from lego.batches import set_loader_epoch
from lego.config import StageConfig, TrainingConfig, create_standard_config  # noqa: F401  (the API lives here)
from lego.early_stopping import TrainingDiverged, early_stopping_loop  # noqa: F401  (the API lives here)
from lego.evaluation import evaluate
from lego.progress import progress as show_progress
from lego.resume import CheckpointSchedule, epoch_end_state, load_resume, save_resume, within_state
from lego.throughput import reset_peak_memory, training_throughput
from lego.trackers import Tracker

LossSumFn = Callable[..., Tuple[torch.Tensor, object]]  # (model, inputs, targets) -> (summed loss, count)

log = logging.getLogger(__name__)


@dataclass
class TrainingTotals:
    """What a training's optimizer steps have consumed so far (kept in its history, so resume keeps it)."""

    steps: int = 0  # optimizer steps
    tokens: int = 0  # input positions the model ran on
    counted: int = 0  # positions whose loss counted (phase 2: the hard ones)

    @classmethod
    def from_history(cls, history: List[dict]) -> "TrainingTotals":
        return cls(*(sum(int(row.get(k, 0)) for row in history) for k in ("steps", "tokens", "counted")))


def train_epoch(model, batches: Iterable, optimizer, loss_sum_fn: LossSumFn, device, *, epoch: Optional[int] = None,
                grad_clip: Optional[float] = None, progress: bool = True, name: str = "train_loader",
                lr_factor: Optional[Callable[[int], float]] = None, totals: Optional[TrainingTotals] = None,
                tracker: Optional[Tracker] = None, prefix: str = "train", log_every: int = 1,
                progress_interval_s: float = 30.0, max_steps: Optional[int] = None, grad_accum: int = 1,
                checkpoint: Optional[Callable[[Callable[[], dict]], None]] = None,
                resume_within: Optional[dict] = None, apart: Sequence[torch.nn.Parameter] = ()) -> float:
    """One pass of optimizer steps over `batches`; the mean loss per counted token. Every model trains here.

    `loss_sum_fn(model, inputs, targets)` returns (summed loss, counted tokens). A count read on
    the device stays there (no host sync per step; a NaN shows up in the epoch's loss, which
    `early_stopping_loop` checks); a host int count of 0 skips the step. One optimizer step takes
    `grad_accum` consecutive batches (micro-batches; the epoch's last step may take fewer), its loss
    normalised over the counted tokens of them all: the gradient of one batch `grad_accum` times larger.
    With `epoch`, the batches' seeded order is that epoch's. `totals` accumulates optimizer steps and
    tokens (every micro-batch's); with `max_steps` the pass ends once `totals` holds that many steps (the
    training's budget ends inside this epoch); with `lr_factor`, step k (counted in `totals` over the whole
    training) runs at each group's base lr times `lr_factor(k)` (without it the lr is left alone: bit-identical
    to no schedule). Under torch.distributed each rank passes its shard, gradients are averaged over ranks
    (DDP, synchronised on a step's last micro-batch only) and the loss is over every rank's tokens.

    With a `tracker` (lego.trackers), every `log_every`-th optimizer step (the training's step count)
    sends loss, lr, grad_norm and tokens_per_s under `prefix`; device values are read on those
    steps only. `progress` shows `<prefix> epoch <epoch>` as a bar, or a line every
    `progress_interval_s` seconds in a log (lego.progress).
    `checkpoint(partial)` runs after each optimizer step (`fit`); `partial()`, called on every rank, reads the
    epoch's loss sum and count over all ranks. `resume_within` ({"steps", "loss_sum", "count"} from such a
    checkpoint) skips the epoch's first `steps` optimizer steps' batches and starts from those sums.
    `apart`: parameters clipped to `grad_clip` as a group of their own (a head trained on a detached state beside
    the model: the others' update is then what it would be without it); grad_norm is the others'.
    """
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum!r} must be an integer >= 1")
    device = torch.device(device)
    model.train()
    if epoch is not None:
        set_loader_epoch(batches, epoch)
    done = resume_within["steps"] if resume_within else 0  # this epoch's optimizer steps before a resume
    carry = bool(resume_within) and distributed.is_main()  # the sums so far are every rank's: rank 0 carries them
    loss_sum = torch.full((), resume_within["loss_sum"] if carry else 0.0, device=device)
    count = int(resume_within["count"]) if carry else 0  # a host int, or a 0-d device tensor once one is added
    params = [p for p in model.parameters() if p.requires_grad]
    separate = {id(p) for p in apart}
    clipped = [p for p in params if id(p) not in separate]  # the group grad_norm reports
    apart_group = [p for p in params if id(p) in separate]
    step = distributed.data_parallel(model, loss_sum_fn, device)
    steps = totals.steps if totals is not None else 0  # the training's optimizer steps: the tracker's x axis
    groups = iter(micro_batch_groups(batches, grad_accum))
    if done:  # opening the loader draws from the global RNG: the resumed state is the one after step `done`
        rng = torch.get_rng_state()
        for _ in itertools.islice(groups, done):
            pass
        torch.set_rng_state(rng)
    bar = show_progress(groups, desc=f"{prefix} epoch {epoch or ''}".rstrip(),
                        total=math.ceil(len(batches) / grad_accum) - done if hasattr(batches, "__len__") else None,
                        interval_s=progress_interval_s, enabled=progress and distributed.is_main())
    start = mark = time.perf_counter()
    tokens = tokens_at_mark = 0  # tokens/s: since the epoch's start (progress), since the last logged step (tracker)
    for micro in bar:  # one optimizer step's micro-batches
        if max_steps is not None and totals is not None and totals.steps >= max_steps:
            break  # the budget ends here (every rank counts the same steps)
        optimizer.zero_grad(set_to_none=True)
        total, n, step_tokens = accumulate(step, micro, params, device)
        if total is None:  # a host count of 0: nothing to learn from (ranks always step together)
            continue
        logged = tracker is not None and (steps + 1) % log_every == 0
        grad_norm = None
        if grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(clipped, grad_clip)
            if apart_group:
                torch.nn.utils.clip_grad_norm_(apart_group, grad_clip)
        elif logged:  # an infinite max norm scales by exactly 1: the norm without clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(clipped, float("inf"))
        if lr_factor is not None:
            factor = lr_factor(totals.steps if totals is not None else 0)
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
        optimizer.step()
        loss_sum += total
        count = count + n
        steps += 1
        tokens += step_tokens
        if totals is not None:
            totals.steps += 1
            totals.tokens += step_tokens
        loss = total / (n.clamp(min=1) if torch.is_tensor(n) else max(n, 1))  # the step's, for display
        if logged:
            loss_value = float(loss)  # the one host sync of a logged step: the clock is honest after it
            now = time.perf_counter()
            rate = (tokens - tokens_at_mark) / max(now - mark, 1e-9)
            mark, tokens_at_mark = now, tokens
            tracker.log_metrics({"loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                 "grad_norm": float(grad_norm), "tokens_per_s": rate}, steps, prefix)
        if bar.enabled:
            bar.update_stats(loss=loss, tokens_per_s=tokens / max(time.perf_counter() - start, 1e-9))
        if checkpoint is not None:
            checkpoint(lambda: dict(zip(("loss_sum", "count"), distributed.all_reduce_sum([float(loss_sum),
                                                                                          float(count)]))))
    loss_sum, count = distributed.all_reduce_sum([float(loss_sum), int(count)])
    if totals is not None:
        totals.counted += int(count)
    if count == 0:
        raise ValueError(f"{name}: empty (no batches or no counted tokens)")
    return loss_sum / count


def micro_batch_groups(batches: Iterable, grad_accum: int) -> Iterator[list]:
    """Lists of `grad_accum` consecutive batches (one optimizer step each); the last list may be shorter."""
    it = iter(batches)
    while group := list(itertools.islice(it, grad_accum)):
        yield group


def accumulate(step: Callable, micro: list, params: list, device) -> Tuple[Optional[torch.Tensor], object, int]:
    """Forward and backward of one optimizer step's micro-batches: leaves in each parameter's .grad the
    gradient of (summed loss of all of them) / (their counted tokens), N. Returns the summed loss (detached),
    N (a host int or a 0-d device tensor; never read here) and the input positions; (None, 0, 0) when N is a
    host 0 in a single process (nothing to step on).

    Each micro-batch's summed loss is backpropagated unscaled; before the last one's backward, once N is known
    (on the device: no host sync), the gradients so far are divided by N and the last loss is divided by N, so
    under DDP (`step.no_sync()` on all but the last) the gradients reduced over ranks are already normalised.
    One micro-batch is the plain `loss = total / n` step.
    """
    total_sum, count, positions = None, 0, 0
    for i, (inputs, targets) in enumerate(micro):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last else distributed.no_sync(step):
            total, n = step(inputs, targets)
            count = count + n
            positions += inputs.shape[0] * inputs.shape[1]
            total_sum = total.detach() if total_sum is None else total_sum + total.detach()
            if not last:
                total.backward()
                continue
            if not torch.is_tensor(count) and count == 0 and not distributed.is_distributed():
                return None, 0, 0
            norm = count.clamp(min=1) if torch.is_tensor(count) else max(count, 1)
            if i:  # the earlier micro-batches' gradients (local: no_sync), normalised before the reduction
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(norm)
            (total / norm).backward()
    return total_sum, count, positions


def fit(model, train_one_epoch: Callable[[int, TrainingTotals, int], float], validate: Callable[[], float], *,
        optimizer, work_dir: Path, budget_steps: int, steps_per_epoch: int, patience: Optional[int], name: str,
        save: Callable[[Path, dict], None], macs: Callable[[TrainingTotals], float] = lambda totals: 0.0,
        val_pass_macs: float = 0.0, record: Optional[dict] = None, tracker: Optional[Tracker] = None,
        checkpoints: Optional[CheckpointSchedule] = None) -> dict:
    """Train for `budget_steps` optimizer steps, validating every `steps_per_epoch` steps (an "epoch"; the last
    one may be shorter) and after the last, with `early_stopping_loop` in the training's directory: resume from
    `work_dir/last.pt` (written after every epoch, or on `checkpoints`), then history.jsonl, result.json and
    `save(work_dir / "model.pt", result)` (rank 0). The weights kept are the best on validation.

    `train_one_epoch(epoch, totals, budget_steps)` trains one epoch, adding its steps and tokens to `totals`
    (the training's running totals, restored from the history on resume) and stopping once they reach
    `budget_steps` (`train_epoch(..., max_steps=...)`). Each history row holds its epoch's steps, tokens and
    seconds; the result adds the training's totals and budget, its training multiply-adds `macs(totals)`, how fast
    it trained (tokens_per_s, model_tflops_per_s, mfu, peak_memory_bytes: `lego.throughput.training_throughput`), the
    validation passes (`validations`, `val_macs` = their count x `val_pass_macs`: reported, not training
    compute), and whether it converged (`convergence`). `patience`: the opt-in early-stopping guard (None =
    off). `record` adds the caller's own entries to the result (e.g. how its budget was derived). Returns the
    result without the history. Phase 1, every later Block and every dense model train here.
    With a `tracker`, each validation sends val_loss and val_ppl under the prefix `name`, at the training's step.
    `checkpoints` (`lego.resume.CheckpointSchedule`; None: at every validation) writes last.pt on its schedule
    instead; `train_one_epoch` then takes train_epoch's `checkpoint=` and `resume_within=` keywords.
    """
    if budget_steps < 1 or steps_per_epoch < 1:
        raise ValueError(f"{name}: budget_steps={budget_steps} and steps_per_epoch={steps_per_epoch} must be >= 1")
    resume = load_resume(work_dir / "last.pt", model, name)
    within = resume.pop("within", None) if resume else None  # written between validations: the epoch in progress
    totals = TrainingTotals.from_history(resume["history"] if resume else [])
    if within:
        log.info("%s: resuming epoch %d after %d of its steps", name, within["epoch"], within["steps"])
        totals.steps, totals.tokens = totals.steps + within["steps"], totals.tokens + within["tokens"]
    schedule, epoch_end = checkpoints or CheckpointSchedule(), epoch_end_state(resume)
    device = next(model.parameters()).device
    reset_peak_memory(device)  # a resumed training's peak is that of the part that ran in this process

    def one_epoch(epoch: int) -> dict:
        nonlocal within
        before, start, extra = replace(totals), time.perf_counter(), {}
        if within is not None and within["epoch"] == epoch:  # this epoch's first steps ran before the resume
            before.steps, before.tokens = before.steps - within["steps"], before.tokens - within["tokens"]
            start, extra["resume_within"], within = start - within["train_s"], within, None
        if not schedule.at_validations:
            def checkpoint(partial: Callable[[], dict]) -> None:
                if schedule.due(totals.steps):
                    save_resume(work_dir, within_state(epoch_end, model, optimizer, dict(
                        epoch=epoch, steps=totals.steps - before.steps, tokens=totals.tokens - before.tokens,
                        train_s=time.perf_counter() - start, **partial())))
            extra["checkpoint"] = checkpoint
        loss = train_one_epoch(epoch, totals, budget_steps, **extra)
        return {"train_loss": loss, "steps": totals.steps - before.steps, "tokens": totals.tokens - before.tokens,
                "counted": totals.counted - before.counted, "train_s": time.perf_counter() - start,
                "lr": optimizer.param_groups[0]["lr"]}  # the last step's

    def validate_and_log() -> float:
        val_loss = validate()
        if tracker is not None:
            tracker.log_metrics({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700))}, totals.steps, name)
        return val_loss

    def on_epoch_end(state: dict) -> None:
        epoch_end.update(epoch_end_state(state))
        if schedule.at_validations:
            save_resume(work_dir, state)
        elif distributed.is_main():  # the curve so far; last.pt waits for the schedule
            write_jsonl(work_dir / "history.jsonl", state["history"])

    result = early_stopping_loop(model, one_epoch, validate_and_log, max_epochs=math.ceil(budget_steps / steps_per_epoch),
                                 patience=patience, optimizer=optimizer, resume=resume, name=name,
                                 on_epoch_end=on_epoch_end)
    summary = {k: v for k, v in result.items() if k != "history"}
    train_s = sum(row.get("train_s", 0.0) for row in result["history"])
    summary.update(steps=totals.steps, budget_steps=budget_steps, tokens=totals.tokens, counted=totals.counted,
                   train_s=train_s, train_macs=macs(totals), last_lr=result["history"][-1]["lr"],
                   validations=len(result["history"]), val_macs=len(result["history"]) * val_pass_macs,
                   **training_throughput(tokens=totals.tokens, train_s=train_s, train_macs=macs(totals), device=device),
                   **convergence(result["history"]), **(record or {}))
    if distributed.is_main():
        write_jsonl(work_dir / "history.jsonl", result["history"])
        write_json(work_dir / "result.json", summary)
        save(work_dir / "model.pt", summary)
        (work_dir / "last.pt").unlink(missing_ok=True)
    return summary


CONVERGED_BELOW = 0.01  # the last fifth of the steps lowered the best validation loss by less than 1%: converged
LAST_SHARE = 0.2  # ...the last fifth of the steps a training ran
CONVERGENCE_RULE = (f"converged: the last {LAST_SHARE:.0%} of its steps lowered the best validation loss by less "
                    f"than {CONVERGED_BELOW:.0%} (relative)")


def convergence(history: List[dict]) -> dict:
    """Whether a training converged, measured from its validations (SPEC section 6: say when it is preliminary).

    `last_fifth_gain`: how much the validations in the last fifth of the steps the training ran lowered the best
    validation loss of the validations before it (relative; 0 when they did not); `converged`: that gain is
    below 1% (`CONVERGENCE_RULE`), or None when the history cannot tell (fewer than 2 validations before the
    last fifth, or none in it): the budget was too small to measure it with that many validations.
    """
    ends = list(itertools.accumulate(int(row.get("steps", 0)) for row in history))
    cut = (1 - LAST_SHARE) * (ends[-1] if ends else 0)
    before = [row["val_loss"] for row, end in zip(history, ends) if end <= cut]
    if len(before) < 2 or len(before) == len(history):
        return {"last_fifth_gain": float("nan"), "converged": None}
    best_before = min(before)
    gain = max(0.0, (best_before - min(row["val_loss"] for row in history)) / abs(best_before))
    return {"last_fifth_gain": gain, "converged": gain < CONVERGED_BELOW}


class Trainer:
    """Trains with the stage losses of `config` and evaluates with its routing controls."""

    def __init__(self, config: TrainingConfig, vocab_size: Optional[int] = None, device="cpu", *,
                 progress: bool = True, progress_interval_s: float = 30.0):
        # vocab_size: the specification's signature; the model knows its vocabulary
        self.config = config
        self.device = torch.device(device)
        self.progress, self.progress_interval_s = progress, progress_interval_s

    # -- losses ------------------------------------------------------------------------------
    def _check_layers(self, model) -> None:
        if not self.config.stages:
            raise ValueError("TrainingConfig.stages is empty: give at least one StageConfig")
        if self.config.last_layer > model.num_layers:
            raise ValueError(f"stage layer {self.config.last_layer} exceeds the model's {model.num_layers} layers")

    def stage_loss_sum(self, model, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sum over tokens of sum_s w_s * mean_{l in s} CE_l (float32), and the number of counted
        tokens (a 0-d long tensor on the batch's device: reading it would sync the host).

        One forward pass, under the model's precision: each layer runs once, and every stage
        reading it reuses it.
        """
        ignore = self.config.ignore_index
        n = (targets != ignore).sum()
        flat_t = targets.reshape(-1)
        with model.autocast():
            h = model.embed(inputs)
            total = h.new_zeros((), dtype=torch.float32)
            for layer in range(1, self.config.last_layer + 1):
                h = model.run_layers(h, layer - 1, layer)
                weight = sum(s.loss_weight / (s.layers[1] - s.layers[0] + 1)
                             for s in self.config.stages if s.layers[0] <= layer <= s.layers[1])
                if weight:
                    logits = model.logits_at(h, layer)
                    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_t,
                                         ignore_index=ignore, reduction="sum")
                    total = total + weight * ce
        return total, n

    def compute_loss(self, model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean (per token) weighted stage loss of one batch."""
        total, n = self.stage_loss_sum(model, inputs, targets)
        return total / n.clamp(min=1)

    def train_epoch(self, model, loader, optimizer, epoch: int = 1) -> float:
        """One pass over `loader` (see `train_epoch`); mean stage loss per counted token."""
        self._check_layers(model)
        return train_epoch(model, loader, optimizer, self.stage_loss_sum, self.device, epoch=epoch,
                           grad_clip=self.config.grad_clip, progress=self.progress,
                           progress_interval_s=self.progress_interval_s)

    @torch.no_grad()
    def validation_loss(self, model, loader) -> float:
        """Mean stage loss per counted token; under torch.distributed, over every rank's shard."""
        self._check_layers(model)
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        for inputs, targets in loader:
            total, n = self.stage_loss_sum(model, inputs.to(self.device, non_blocking=True),
                                           targets.to(self.device, non_blocking=True))
            loss_sum += total
            count += n
        # Summed over ranks, so validation loss and early stopping are the same on every rank.
        loss_sum, count = distributed.all_reduce_sum([float(loss_sum), int(count)])
        if count == 0:
            raise ValueError("val_loader: empty (no batches or no counted tokens)")
        return loss_sum / count

    def train_with_early_stopping(self, model, train_loader, val_loader, optimizer, max_epochs: int = 50,
                                  patience: int = 1, *, on_epoch_end=None, resume=None, name="train") -> dict:
        """Train on `train_loader` until `patience` epochs without a better `val_loader` loss.

        Restores the best weights before returning (see `early_stopping_loop` for the dict).
        """
        self._check_layers(model)
        return early_stopping_loop(
            model,
            lambda epoch: self.train_epoch(model, train_loader, optimizer, epoch),
            lambda: self.validation_loss(model, val_loader),
            max_epochs=max_epochs, patience=patience, optimizer=optimizer,
            on_epoch_end=on_epoch_end, resume=resume, name=name,
        )

    def evaluate(self, model, loader: Iterable) -> Dict[str, float]:
        """acc, ppl, shallow_ratio, compute_cost (+ per-exit extras) with this config's routing
        controls; see `lego.evaluation.evaluate`."""
        return evaluate(self.config, model, loader, self.device, progress=self.progress,
                        progress_interval_s=self.progress_interval_s)
