"""An upper Block (phase 2's Block 2, and each later Block): the model below grown by one Block (`add_block`),
trained on the hard sequences at its new exit with phase2's settings (`train_upper`), its cache key
(`block_key`), and phase 2's budget under phase1.budget_fraction (`rest_of_budget`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from lego import __version__
from lego.artifacts import read_json
from lego.ashem import evaluate_on_hard_examples, grow, train_upper_layers
from lego.config import IGNORE_INDEX, ASHEMConfig, block_layers, exit_ratios
from lego.cost import phase2_training_macs, steps_for_macs
from lego.model import Model
from lego.pipeline.compute import cost_shape, mining_compute, pipeline_budget_macs
from lego.pipeline.mining import hard_loader, hard_ratio
from lego.pipeline.scaffold import start_from_scaffold
from lego.pipeline.science import science_config
from lego.pipeline.setup import Loaders
from lego.pipeline.train import train_block
from lego.routed_layer import capacity_mask, routing_capacity
from lego.trackers import Tracker

BLOCK_FILES = ("model.pt", "history.jsonl", "result.json")  # a Block's result in its run-dir dir (and cache entry)


def add_block(cfg: ASHEMConfig, below: Model, num_layers: Optional[int] = None) -> Model:
    """The model `below` with one more Block, untrained: grown to `num_layers` (default: Block 2's depth,
    phase2.layers for two Blocks), its last layer a new exit (phase2's deep_head and init)."""
    return grow(below, num_layers or block_layers(cfg)[1], deep_head=cfg.phase2.deep_head, init=cfg.phase2.init)


def rest_of_budget(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int, run_dir: Path,
                   macs_per_step: float) -> Tuple[int, Dict[str, float]]:
    """Phase 2's budget under phase1.budget_fraction: of the pipeline's budget
    (`lego.pipeline.compute.pipeline_budget_macs`), phase 2 gets what phase 1 really spent (phase1/result.json) and the mining that ran
    (`lego.pipeline.compute.mining_compute`) left of it, as the nearest number of its own steps of
    `macs_per_step` (at least 1): within half a step of the budget. Returns the steps and the record of how they
    were derived: budget_macs (the pipeline's), rest_macs (what phase 2 was left) and step_macs."""
    budget = pipeline_budget_macs(cfg, loaders, vocab_size)
    spent = float(read_json(run_dir / "phase1" / "result.json")["train_macs"])
    rest = max(budget - spent - mining_compute(cfg, loaders, vocab_size)["train_macs"], 0.0)
    return steps_for_macs(rest, macs_per_step), {"budget_macs": budget, "rest_macs": rest, "step_macs": macs_per_step}


def train_upper(cfg: ASHEMConfig, below: Model, thresholds: Sequence[float], loaders: Loaders,
                run_dir: Path, device: torch.device, tracker: Optional[Tracker] = None, *, name: str = "phase2",
                num_layers: Optional[int] = None, out: Optional[Path] = None) -> Model:
    """The specification's phase 2: the Blocks below frozen, the next Block (to `num_layers`, default
    Block 2's depth) trained on the hard sequences at the exit `below`'s last layer becomes, with phase2's
    settings (`train_block`); writes `out` (default run_dir/<name>/; a model-cache entry). `below` is the
    phase-1 model, or for Block 3 on the model of Blocks 1-2. `thresholds`: one per exit of the grown model,
    `below`'s exits then the new one (its calibrated threshold, last)."""
    threshold, lower = thresholds[-1], list(thresholds[:-1])
    out = out or run_dir / name
    exit_layer, depth = below.num_layers, num_layers or block_layers(cfg)[1]
    p2 = cfg.phase2
    every = p2.loss_tokens != "hard"  # the deep exit is scored (and its head run) at every position
    scratch = out / "scratch"
    train_hard = hard_loader(cfg, below, loaders.train_ordered, threshold, device, scratch / "train", shuffle=True,
                             what=f"{name} train", keep_easy=every, exit_layer=exit_layer, below=lower)
    val_hard = hard_loader(cfg, below, loaders.validation, threshold, device, scratch / "validation",
                           shuffle=False, what=f"{name} validation", exit_layer=exit_layer, below=lower)
    torch.manual_seed(cfg.seed + 1 + len(below.exit_layers))  # Block 2: seed + 1, Block 3: seed + 2, ...
    model = add_block(cfg, below, depth)
    if cfg.phase1.scaffold:  # the upper Block starts where the scaffold of phase 1 left it
        start_from_scaffold(model, run_dir / "phase1" / "scaffold.pt")
    shape = cost_shape(cfg, below.vocab_size)
    easy_weight = None if not every else 1.0 if p2.loss_tokens == "all" else p2.easy_weight

    def macs(tokens: float, hard_share: float) -> float:
        return phase2_training_macs(tokens=tokens, hard_ratio=1.0 if every else hard_share, exit_layer=exit_layer,
                                    num_layers=depth, policy=p2.upper_context,
                                    recompute=cfg.hard_examples.store == "recompute", **shape)

    capacity, record = fixed_capacity(cfg, train_hard)
    steps, budget = None, {}
    if cfg.phase1.budget_fraction is not None:
        steps, budget = rest_of_budget(cfg, loaders, below.vocab_size, run_dir,
                                       macs(p2.batch_size * cfg.data.seq_len * p2.grad_accum, hard_ratio(train_hard)))
    train_block(cfg, model, p2, train_hard,
                lambda batches, optimizer, **kw: train_upper_layers(model, batches, optimizer, None, device, exit_layer,
                                                                    policy=p2.upper_context, easy_weight=easy_weight,
                                                                    capacity=capacity, **kw),
                lambda: evaluate_on_hard_examples(model, val_hard, None, device, exit_layer,
                                                  policy=p2.upper_context, capacity=capacity)["loss"],
                name=name, out=out, device=device, steps=steps, threshold=threshold, record={**budget, **record},
                tracker=tracker,
                macs=lambda totals: macs(totals.tokens, totals.counted / max(totals.tokens, 1)),
                val_pass_macs=macs(len(val_hard.dataset) * cfg.data.seq_len, hard_ratio(val_hard)) / 3)
    shutil.rmtree(scratch, ignore_errors=True)
    return model


def fixed_capacity(cfg: ASHEMConfig, train_hard) -> Tuple[Optional[int], Dict[str, Any]]:
    """phase2.capacity_slack: the slots per row of the fixed-capacity upper layers (`routing_capacity` of the mined
    sequences' hard share plus the slack) and the record result.json keeps: the slots, and the training split's
    hard tokens and those beyond capacity (left out of every pass's loss). (None, {}) without the key."""
    slack = cfg.phase2.capacity_slack
    if slack is None:
        return None, {}
    T = cfg.data.seq_len
    slots = routing_capacity(hard_ratio(train_hard), T, slack=slack)
    hard = train_hard.dataset.targets != IGNORE_INDEX  # (N, T): every mined sequence's hard positions
    _, overflow = capacity_mask(hard, slots)
    return slots, {"capacity": {"slots_per_row": slots, "slack": slack, "seq_len": T, "hard_tokens": int(hard.sum()),
                                "overflow_tokens": int(overflow)}}


def block_key(cfg: ASHEMConfig, k: int, corpus_key: str, device: torch.device) -> Dict[str, Any]:
    """What determines Block k (2, 3, ...): the science config of model, data, phase 1 and phase 2 (minus
    the cache switch and the final depth), hard_examples, the Blocks up to k and the ratios of the exits
    below Block k, the seed, the corpus, the device type and the lego version. So blocks=[2, 4] and
    [2, 4, 6] share Block 2."""
    science = science_config(cfg)
    return {"model": science["model"], "data": science["data"],
            "phase1": {key: v for key, v in science["phase1"].items() if key not in ("cache", "layers")},
            "phase2": {key: v for key, v in science["phase2"].items() if key != "layers"},
            "hard_examples": science["hard_examples"], "blocks": block_layers(cfg)[:k],
            "exit_ratios": exit_ratios(cfg)[:k - 1], "seed": cfg.seed, "corpus": corpus_key,
            "device": device.type, "lego": __version__}
