"""What every stage shares: the torch set-up, the config that decides results, loaders, the optimizer."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from lego import distributed
from lego.batches import EpochSteps, make_loader
from lego.checkpoint import model_vocab_size, resolve_device, run_precision
from lego.config import ASHEMConfig, block_layers, exit_ratios, to_dict
from lego.data import Corpus
from lego.schedule import lr_factor

# Keys that change what a run computes. Others (stages, device, threads, trackers, display) may differ on
# resume; generate only reads the finished models, so its keys never enter the run-dir claim or a cache key.
_NON_SCIENCE = {"stages", "device", "num_threads", "objective", "generate", "logger", "progress", "progress_interval_s"}


def setup_torch(cfg: ASHEMConfig) -> torch.device:
    device = distributed.device_for_rank(resolve_device(cfg.device))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    return device


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def science_config(cfg: ASHEMConfig) -> Dict[str, Any]:
    """The config minus what cannot change results (device, threads, stages, cache dir, compile)."""
    d = to_dict(cfg)
    for k in _NON_SCIENCE:
        d.pop(k, None)
    d["data"].pop("cache_dir", None)
    if d["data"]["name"] != "shards":  # only data=shards reads them: other runs' dirs and cache keys stay valid
        d["data"].pop("shards")
    if d["data"]["name"] != "chains":  # only data=chains reads them: other runs' dirs and cache keys stay valid
        d["data"].pop("chains")
    elif d["data"]["chains"]["assign"] == "=":  # the key's default: chains run dirs from before it stay valid
        d["data"]["chains"].pop("assign")
    # Two Blocks are phase1.layers, phase2.layers and hard_example_ratio (validate set them from the lists):
    # blocks=[2, 4] is the default run. More Blocks are recorded resolved, one ratio per exit.
    if len(block_layers(cfg)) > 2:
        d["blocks"], d["hard_example_ratios"] = block_layers(cfg), exit_ratios(cfg)
    else:
        d.pop("blocks"), d.pop("hard_example_ratios")
    d["model"].pop("compile", None)
    if d["model"].get("vocab_multiple") == 1:  # no padding: run dirs and cache keys from before the key stay valid
        d["model"].pop("vocab_multiple")
    if d["model"].get("exit_head") == "separate" and d["model"].get("exit_rank") is None:  # the specification's
        d["model"].pop("exit_head"), d["model"].pop("exit_rank")  # heads: run dirs and cache keys from before stay valid
    for phase in ("phase1", "phase2"):  # a constant schedule ignores warmup and floor: runs from before the keys match
        if d[phase]["schedule"] == "constant":
            for key in ("schedule", "warmup_steps", "min_lr_ratio"):
                d[phase].pop(key)
    # The variants' defaults (the specification) are left out, and so are weights their mode ignores:
    # run dirs and cache keys from before the keys existed stay valid.
    for phase, key, default in (("phase1", "budget_fraction", None), ("phase1", "grad_accum", 1),
                                ("phase2", "grad_accum", 1), ("phase2", "init", "random"),
                                ("phase2", "loss_tokens", "hard"), ("phase2", "lower", "frozen")):
        if d[phase][key] == default:
            d[phase].pop(key)
    if not d["eval"]["learned_router"]:
        d["eval"].pop("learned_router")
    if d["phase2"].get("loss_tokens") != "weighted":
        d["phase2"].pop("easy_weight")
    if d["phase2"].get("lower") != "finetune":
        d["phase2"].pop("exit_loss_weight")
    # The precision that runs, not "auto" (that depends on the GPU); fp32 is left out, so run
    # dirs and cache keys from before the key existed stay valid.
    precision = run_precision(cfg)
    if precision == "fp32":
        d["model"].pop("precision", None)
    else:
        d["model"]["precision"] = precision
    return d


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


def lr_schedule(group, total_steps: int) -> Optional[Callable[[int], float]]:
    """The lr factor of each optimizer step under `group.schedule` (phase1 / phase2 settings) over a budget of
    `total_steps` steps (the last one at the floor); None for `constant` (the lr is left alone)."""
    if group.schedule == "constant":
        return None
    return partial(lr_factor, schedule=group.schedule, warmup_steps=group.warmup_steps, total_steps=total_steps,
                   min_lr_ratio=group.min_lr_ratio)


def epoch_steps(loader, group) -> Tuple[EpochSteps, int]:
    """One epoch of `group` (phase1 / phase2 settings) over `loader`: its batches, `group.epoch_steps` x
    `group.grad_accum` of them (None: the whole loader), and the optimizer steps they make (`grad_accum` batches
    each, the last step taking what is left)."""
    batches = EpochSteps(loader, None if group.epoch_steps is None else group.epoch_steps * group.grad_accum)
    return batches, math.ceil(len(batches) / group.grad_accum)


def budget_steps(group, steps_per_epoch: int) -> int:
    """A stage's own budget in optimizer steps: `group.max_epochs` epochs of `steps_per_epoch` steps."""
    return group.max_epochs * steps_per_epoch


def loop_report(cfg: ASHEMConfig, tracker, prefix: str) -> Dict[str, Any]:
    """`lego.training.train_epoch`'s reporting keywords for the stage `prefix`: the run's tracker
    (None: none) every `logger.log_every` optimizer steps, and the progress display."""
    return dict(tracker=tracker, prefix=prefix, log_every=cfg.logger.log_every, progress=cfg.progress,
                progress_interval_s=cfg.progress_interval_s)


def model_macs(cfg: ASHEMConfig, vocab_size: int) -> Dict[str, Any]:
    """The shape arguments of every `lego.cost` function for this run; the heads count the padded vocabulary
    (`model.vocab_multiple`), as the model computes it."""
    m = cfg.model
    return dict(dim=m.dim, ffn_mult=m.ffn_mult, ffn=m.ffn, vocab_size=model_vocab_size(cfg, vocab_size),
                seq_len=cfg.data.seq_len, exit_rank=m.exit_rank if m.exit_head == "lowrank" else None)


@dataclass
class Loaders:
    """Under torch.distributed each loader holds this rank's share of the batches."""

    train: Any  # shuffled by (seed, epoch), for training
    train_ordered: Any  # the same windows in corpus order, for mining and calibration
    validation: Any  # the whole split: calibration, mining, the frontier's choice
    test: Any
    validation_check: Any = None  # what validation during training scores (data.val_check_tokens); None: validation

    @property
    def check(self) -> Any:
        return self.validation if self.validation_check is None else self.validation_check


def make_loaders(cfg: ASHEMConfig, corpus: Corpus, *, shard: bool = True, device=None) -> Loaders:
    """The four loaders; pinned batches when `device` is a GPU."""
    d = cfg.data
    kw = dict(rank=distributed.rank(), world_size=distributed.world_size()) if shard else {}
    kw["device"] = device

    def loader(tokens, batch_size: int, shuffle: bool):
        return make_loader(tokens, d.seq_len, batch_size, shuffle=shuffle, seed=cfg.seed, **kw)

    capped = d.val_check_tokens is not None and d.val_check_tokens < len(corpus.validation)
    return Loaders(train=loader(corpus.train, d.batch_size, True),
                   train_ordered=loader(corpus.train, d.eval_batch_size, False),
                   validation=loader(corpus.validation, d.eval_batch_size, False),
                   test=loader(corpus.test, d.eval_batch_size, False),
                   validation_check=loader(corpus.validation[: d.val_check_tokens], d.eval_batch_size, False)
                   if capped else None)
