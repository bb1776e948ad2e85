"""Staged losses, early stopping and routed evaluation.

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

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lego import distributed
from lego.ashem import token_stats

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class StageConfig:
    """Loss at every layer in the inclusive range `layers` (mean over them), times `loss_weight`."""

    layers: Tuple[int, int]
    loss_weight: float = 1.0

    def __post_init__(self):
        a, b = self.layers
        if not 1 <= a <= b:
            raise ValueError(f"StageConfig.layers={self.layers} must satisfy 1 <= start <= end")


@dataclass
class TrainingConfig:
    """Stages whose weighted losses add up, plus the inference-time routing controls."""

    stages: List[StageConfig] = field(default_factory=list)
    routing_threshold: Optional[float] = None
    exit_layer: Optional[int] = None
    confidence: str = "max_prob"  # measure used by routing; see lego.ashem.CONFIDENCE_MEASURES
    upper_context: Optional[str] = None  # None: the model's own policy
    grad_clip: Optional[float] = 1.0
    ignore_index: int = IGNORE_INDEX

    @property
    def last_layer(self) -> Optional[int]:
        return max(s.layers[1] for s in self.stages) if self.stages else None


def create_standard_config(num_layers: int) -> TrainingConfig:
    """A standard LM: one stage, loss at the last layer."""
    return TrainingConfig(stages=[StageConfig(layers=(num_layers, num_layers), loss_weight=1.0)])


class TrainingDiverged(RuntimeError):
    """Raised when a loss becomes NaN or infinite."""


def set_loader_epoch(loader, epoch: int) -> None:
    """Make epoch `epoch`'s order a function of (seed, epoch) alone, so resumed runs match."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def summarize(nll_sum: float, correct: float, n_tokens: int, n_easy: int, exit_layer: Optional[int],
              num_layers: int) -> Dict[str, float]:
    """The specification's four numbers from token totals (SPEC section 3)."""
    if n_tokens == 0:
        raise ValueError("loader: no tokens to evaluate (empty loader or all targets ignored)")
    n_hard = n_tokens - n_easy
    exit_layer = num_layers if exit_layer is None else exit_layer
    return {
        "acc": correct / n_tokens,
        "ppl": math.exp(nll_sum / n_tokens),
        "loss": nll_sum / n_tokens,
        "shallow_ratio": n_easy / n_tokens,
        "compute_cost": (n_easy * exit_layer + n_hard * num_layers) / (n_tokens * num_layers),
        "n_tokens": n_tokens,
    }


def early_stopping_loop(
    model: torch.nn.Module,
    train_epoch: Callable[[int], float],
    validate: Callable[[], float],
    *,
    max_epochs: int,
    patience: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    on_epoch_end: Optional[Callable[[dict], None]] = None,
    resume: Optional[dict] = None,
    name: str = "train",
) -> dict:
    """Train until `patience` epochs pass without a better validation loss; keep the best weights.

    `train_epoch(epoch)` returns the mean training loss, `validate()` the validation loss.
    After every epoch `on_epoch_end(state)` receives everything needed to resume (weights,
    optimizer, best weights, counters, history, RNG); pass such a state as `resume` to continue.
    Returns best_val_loss, best_val_ppl, best_epoch, epochs_run, stopped_early, history.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs={max_epochs} must be >= 1")
    if patience < 1:
        raise ValueError(f"patience={patience} must be >= 1")
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
        train_loss = train_epoch(epoch)
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
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        stopped = bad >= patience
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)),
               "best": improved}
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


class Trainer:
    """Trains with the stage losses of `config` and evaluates with its routing controls."""

    def __init__(self, config: TrainingConfig, vocab_size: int, device="cpu", *, progress: bool = True):
        self.config = config
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.progress = progress

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
        """One pass over `loader`; mean stage loss per counted token.

        Under torch.distributed each rank passes its shard of the batches, gradients are
        averaged over ranks (DDP) and the returned loss is over every rank's tokens.
        """
        self._check_layers(model)
        model.train()
        set_loader_epoch(loader, epoch)
        # Loss and token count stay on the device and are read once per epoch: no host sync per
        # step (a NaN shows up in the epoch's loss, which early_stopping_loop checks).
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), dtype=torch.long, device=self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = distributed.data_parallel(model, self.stage_loss_sum, self.device)
        for inputs, targets in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None if self.progress else True):
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            total, n = loss_fn(inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            (total / n.clamp(min=1)).backward()
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            optimizer.step()
            loss_sum += total.detach()
            count += n
        loss_sum, count = distributed.all_reduce_sum([float(loss_sum), int(count)])
        if count == 0:
            raise ValueError("train_loader: empty (no batches or no counted tokens)")
        return loss_sum / count

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

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, loader: Iterable) -> Dict[str, float]:
        """acc, ppl, shallow_ratio, compute_cost (+ per-exit extras) in one pass per batch.

        With `routing_threshold` and `exit_layer`: a token whose confidence at `exit_layer` is
        >= the threshold is predicted there, the others at the last layer; deep logits are
        computed only for those. Without routing: plain metrics at the last stage layer.
        Under torch.distributed each rank passes its shard and gets the metrics of all shards.
        """
        cfg = self.config
        model.eval()
        deep = cfg.last_layer or model.num_layers
        if deep > model.num_layers:
            raise ValueError(f"stage layer {deep} exceeds the model's {model.num_layers} layers")
        routed = cfg.exit_layer is not None and cfg.routing_threshold is not None
        if cfg.exit_layer is not None and not 1 <= cfg.exit_layer < deep:
            raise ValueError(f"exit_layer={cfg.exit_layer} must be in [1, {deep})")
        exit_layer = cfg.exit_layer if routed else deep
        policy = cfg.upper_context or getattr(model, "upper_context", "full")
        nll = correct = n_tok = n_easy = 0.0
        nll_exit = correct_exit = nll_hard_deep = 0.0
        for inputs, targets in tqdm(loader, desc="evaluate", leave=False, disable=None if self.progress else True):
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            valid = targets != cfg.ignore_index
            with model.autocast():  # the precision calibration and mining ran under
                h = model.run_layers(model.embed(inputs), 0, exit_layer)
                exit_logits = model.logits_at(h, exit_layer).float()
            if not routed:
                st = token_stats(exit_logits, targets, None, cfg.ignore_index)
                nll += float(st["nll"].sum())  # 0 at ignored targets
                correct += float(((st["pred"] == targets) & valid).sum())
                n_tok += int(valid.sum())
                continue
            # One log-softmax of the exit logits gives the routing confidence (bit-identical to
            # calibration's), the exit's NLL and its top-1.
            ex = token_stats(exit_logits, targets, cfg.confidence, cfg.ignore_index)
            easy = (ex["conf"] >= cfg.routing_threshold) & valid
            hard = ~easy & valid
            with model.autocast():
                h_deep = model.run_layers(h, exit_layer, deep, hard=hard, policy=policy)
                deep_logits = model.logits_at(h_deep[hard], deep).float()  # hard positions only
            d_y = targets[hard]
            dp = token_stats(deep_logits, d_y, None)
            e_ok = (ex["pred"] == targets) & valid
            d_nll, d_ok = dp["nll"].sum(), (dp["pred"] == d_y).sum()
            nll += float(ex["nll"][easy].sum() + d_nll)
            correct += float(e_ok[easy].sum() + d_ok)
            nll_exit += float(ex["nll"].sum())
            correct_exit += float(e_ok.sum())
            nll_hard_deep += float(d_nll)
            n_tok += int(valid.sum())
            n_easy += int(easy.sum())
        if distributed.is_distributed():
            nll, correct, n_tok, n_easy, nll_exit, correct_exit, nll_hard_deep = distributed.all_reduce_sum(
                [nll, correct, n_tok, n_easy, nll_exit, correct_exit, nll_hard_deep])
        out = summarize(nll, correct, int(n_tok), int(n_easy), exit_layer if routed else None, deep)
        if routed:
            n_hard = int(n_tok) - int(n_easy)
            out.update({
                "exit_acc": correct_exit / n_tok,
                "exit_ppl": math.exp(nll_exit / n_tok),
                "hard_deep_ppl": math.exp(nll_hard_deep / n_hard) if n_hard else float("nan"),
                "threshold": float(cfg.routing_threshold),
                "exit_layer": exit_layer,
                "num_layers": deep,
            })
        return out



class EpochShuffleSampler(torch.utils.data.Sampler):
    """Random order that depends only on (seed, epoch): resumed runs see the same batches.

    Like `DistributedSampler`, call `set_epoch(e)` before each epoch (the training loops do).
    With `rank`/`world_size`, each rank takes its stride of the same permutation.
    """

    def __init__(self, n: int, seed: int, *, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))
