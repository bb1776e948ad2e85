"""Calibration and mining with a trained exit: the threshold at an exit (`calibrate`, SPEC section 3.2), the
loaders of the hard sequences that phase 2, each later Block and the evaluation read (`hard_loader`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from lego import distributed
from lego.ashem import collect_hard_examples, exact_quantile, gather_confidences
from lego.config import IGNORE_INDEX, ASHEMConfig
from lego.model import Model
from lego.pipeline.setup import Loaders
from lego.store import create_hard_example_loader

log = logging.getLogger(__name__)
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)  # confidence statistics kept in threshold.json


def calibrate(cfg: ASHEMConfig, model: Model, loaders: Loaders, device, *,
              exit_layer: Optional[int] = None, ratio: Optional[float] = None,
              below: Sequence[float] = ()) -> Dict[str, Any]:
    """The exact `ratio` (default hard_example_ratio) quantile of `model`'s confidences at `exit_layer`
    (default phase1.layers) on the calibration split, over the tokens that reach that exit, with the
    statistics threshold.json records (phase 1's exit, phase 2's under phase2.lower=finetune, or a
    later Block's exit in a grown model, past its exits below at their thresholds `below`)."""
    split = cfg.hard_examples.calibration_split
    loader = loaders.validation if split == "validation" else loaders.train_ordered
    exit_layer = cfg.phase1.layers if exit_layer is None else exit_layer
    ratio = cfg.hard_example_ratio if ratio is None else ratio
    conf = gather_confidences(model, loader, device, exit_layer=exit_layer, measure=cfg.hard_examples.confidence,
                              thresholds=below)  # every rank's tokens that reach it
    threshold = exact_quantile(conf, ratio)
    hard = int((conf < threshold).sum())
    info = {
        "threshold": threshold,
        "target_ratio": ratio,
        "achieved_ratio": hard / conf.numel(),
        "calibration_split": split,
        "confidence": cfg.hard_examples.confidence,
        "exit_layer": exit_layer,
        "num_tokens": conf.numel(),
        "num_hard": hard,
        "num_easy": conf.numel() - hard,
        "confidence_stats": {"mean": float(conf.double().mean()), "std": float(conf.double().std()),
                             "min": float(conf.min()), "max": float(conf.max()),
                             **{f"q{int(q * 100):02d}": exact_quantile(conf, q) for q in QUANTILES}},
    }
    log.info("threshold %.6g at layer %d on %s: %d of %d tokens reaching it hard (%.3f, target %.3f)", threshold,
             exit_layer, split, hard, conf.numel(), info["achieved_ratio"], ratio)
    return info


def hard_loader(cfg: ASHEMConfig, model1: Model, loader, threshold: float, device,
                store_dir: Path, *, shuffle: bool, what: str, keep_easy: bool = False,
                exit_layer: Optional[int] = None, below: Sequence[float] = ()):
    """A loader over the hard sequences of `loader` (this rank's shard under torch.distributed), hard at
    `exit_layer` (default: the model's first exit, or its last layer; past the exits below it at their thresholds
    `below`); with `keep_easy` its targets are
    (B, 2, T): hard-only and every position (see `collect_hard_examples`)."""
    if distributed.is_distributed():
        store_dir = store_dir / f"rank{distributed.rank()}"  # scratch; removed with its stage's scratch dir
    hard = collect_hard_examples(model1, loader, threshold, device, exit_layer=exit_layer,
                                 measure=cfg.hard_examples.confidence, thresholds=below,
                                 store=cfg.hard_examples.store, store_dir=str(store_dir), progress=cfg.progress,
                                 progress_interval_s=cfg.progress_interval_s, keep_easy=keep_easy,
                                 store_dtype=cfg.hard_examples.store_dtype)
    counts = distributed.all_reduce_sum([hard["num_hard"], hard["num_tokens"], len(hard["targets"])])
    log.info("%s: %d hard tokens of %d in %d sequences", what, *map(int, counts))
    return create_hard_example_loader(hard, cfg.phase2.batch_size, shuffle=shuffle, seed=cfg.seed, device=device)


def hard_ratio(loader) -> float:
    """The share of positions of a hard-example loader's sequences that are hard (counted in the loss)."""
    targets = loader.dataset.targets  # (N, T), or (N, 2, T) with keep_easy: (hard-only, all)
    return float(((targets[:, 0] if targets.dim() == 3 else targets) != IGNORE_INDEX).float().mean())
