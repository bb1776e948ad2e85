"""What every stage reads: the torch set-up, the loaders of the corpus, `RunContext`, which holds them, and the
run's `evaluator`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lego import distributed
from lego.batches import make_loader
from lego.checkpoint import resolve_device
from lego.config import ASHEMConfig, TrainingConfig
from lego.data import Corpus
from lego.trackers import Tracker
from lego.training import Trainer


def setup_torch(cfg: ASHEMConfig) -> torch.device:
    """This rank's device, torch's thread count and TF32 on a GPU, and the global seed."""
    device = distributed.device_for_rank(resolve_device(cfg.device))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    return device


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


@dataclass(frozen=True)
class RunContext:
    """What every stage reads, set up once by `lego.run`: the resolved config, the corpus and its loaders, the
    run directory (each stage writes its own subdirectory), this rank's device, and the run's tracker."""

    cfg: ASHEMConfig
    corpus: Corpus
    loaders: Loaders
    run_dir: Path
    device: torch.device
    tracker: Optional[Tracker] = None


def evaluator(cfg: ASHEMConfig, config: TrainingConfig, device) -> Trainer:
    """A Trainer that evaluates under `config` (`Trainer.evaluate`), showing progress as the run's `progress`
    keys say."""
    return Trainer(config, device=device, progress=cfg.progress, progress_interval_s=cfg.progress_interval_s)
