"""Stage `phase2`: grow the phase-1 model and train its upper Block on the training split's hard
tokens for its budget of steps, validated on the validation split's (SPEC section 3.3).

The variants (each one config key; the defaults are the specification):
- phase2.init=copy: the new layers start as copies of the lower stack (`lego.ashem.grow`).
- phase2.loss_tokens=all|weighted: the deep exit's loss at every position of the mined sequences
  (easy ones weighted by easy_weight); validation still reads the validation split's hard tokens,
  the only ones the deep exit serves when routing.
- phase2.lower=finetune: Block 1 keeps training on the whole training split, with the loss at both exits
  (StageConfig deep supervision), validated on that loss; the threshold is then
  recalibrated on the calibration split (phase2/threshold.json) so the asked hard ratio holds.
- phase1.budget_fraction: phase 2's steps are what phase 1 and mining left of the shared budget
  (`lego.pipeline.upper.rest_of_budget`).

With more than two `blocks`, stage phase2 also trains Blocks 3, 4, ... (`lego.stages.blocks`), each as
phase 2 trains Block 2 and with phase2's settings; the two-Block variants lower=finetune and
phase1.budget_fraction are refused there (lego.config.validate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from lego.artifacts import read_json, write_json
from lego.checkpoint import expected_args, load_model, save_model
from lego.config import StageConfig, TrainingConfig, block_layers
from lego.cost import dense_training_macs, forward_macs_per_token
from lego.model import Model
from lego.pipeline.cache import through_cache
from lego.pipeline.compute import cost_shape, window_positions
from lego.pipeline.mining import calibrate
from lego.pipeline.results import load_or_run, on_disk, require
from lego.pipeline.setup import RunContext
from lego.pipeline.train import train_block
from lego.pipeline.upper import BLOCK_FILES, add_block, block_key, rest_of_budget, train_upper
from lego.training import Trainer, train_epoch


def run(ctx: RunContext, model1: Model, threshold: float) -> Model:
    """Train the upper Block (`lego.pipeline.upper.train_upper`; under phase2.lower=finetune, the whole model,
    then recalibrate), or read what phase2/ holds; writes phase2/ (model.pt, history.jsonl, result.json;
    threshold.json under finetune). With phase1.cache, Block 2 is shared through the model cache (`block_key`;
    not under finetune)."""
    cfg, out = ctx.cfg, ctx.run_dir / "phase2"
    finetune = cfg.phase2.lower == "finetune"

    def load(path: Path, what: str = "phase2 checkpoint") -> Model:
        return load_model(path, expected_args(cfg, ctx.corpus.vocab_size, block_layers(cfg)[1], [threshold]),
                          ctx.device, what)

    def train(entry: Path) -> Model:
        return train_upper(cfg, model1, [threshold], ctx.loaders, ctx.run_dir, ctx.device, ctx.tracker, out=entry)

    if not finetune and cfg.phase1.cache and not on_disk(out / "model.pt"):
        return through_cache(cfg, "phase2", block_key(cfg, 2, ctx.corpus.cache_key, ctx.device), out,
                             lambda entry: load_or_run(entry / "model.pt", lambda p: load(p, "phase2 cache entry"),
                                                       lambda: train(entry)), BLOCK_FILES)
    model2 = load_or_run(out / "model.pt", load, lambda: train_finetune(ctx, model1, threshold) if finetune
                         else train(out))
    if finetune:
        recalibrate(ctx, model2, out)
    return model2


def load(ctx: RunContext, threshold: float) -> Model:
    """The phase-2 model a previous invocation wrote (its exit calibrated at `threshold`; under
    phase2.lower=finetune the recalibrated one is `routing_threshold_info`'s)."""
    cfg = ctx.cfg
    path = require(ctx.run_dir / "phase2" / "model.pt", f"stages={cfg.stages}", "phase 2's result", "phase2")
    expect = expected_args(cfg, ctx.corpus.vocab_size, block_layers(cfg)[1], [threshold])
    return load_model(path, expect, ctx.device, "phase2 checkpoint")


def train_finetune(ctx: RunContext, model1: Model,
                   threshold: float) -> Model:
    """phase2.lower=finetune: every parameter trains on every training token, loss at the exit layer
    (weight exit_loss_weight) plus the last layer, with phase 2's optimizer settings (`train_block`). Its epochs
    continue phase 1's seeded batch order (epoch phase1.max_epochs + k), so they draw other batches."""
    cfg, loaders, device = ctx.cfg, ctx.loaders, ctx.device
    p1, p2 = cfg.phase1, cfg.phase2
    exit_layer, depth = p1.layers, p2.layers
    torch.manual_seed(cfg.seed + 1)
    model2 = add_block(cfg, model1)
    model2.requires_grad_(True)  # grow froze Block 1 and the exit head
    trainer = Trainer(TrainingConfig(stages=[StageConfig((exit_layer, exit_layer), p2.exit_loss_weight),
                                             StageConfig((depth, depth), 1.0)], grad_clip=p2.grad_clip), device=device)
    shape = cost_shape(cfg, model1.vocab_size)

    def macs(tokens: float) -> float:  # forward + backward of every layer, both heads
        return dense_training_macs(tokens=tokens, num_layers=depth, heads=2, **shape)

    steps, budget = None, {}
    if p1.budget_fraction is not None:
        steps, budget = rest_of_budget(cfg, loaders, model1.vocab_size, ctx.run_dir,
                                       macs(cfg.data.batch_size * cfg.data.seq_len * p2.grad_accum))
    return train_block(
        cfg, model2, p2, loaders.train,
        lambda batches, optimizer, **kw: train_epoch(model2, batches, optimizer, trainer.stage_loss_sum, device, **kw),
        lambda: trainer.validation_loss(model2, loaders.check), name="phase2", out=ctx.run_dir / "phase2",
        device=device, steps=steps, first_epoch=p1.max_epochs, threshold=threshold, tracker=ctx.tracker,
        record={**budget, "block1_finetuned": True},  # the report must not present Block 1 as the phase-1 model
        macs=lambda totals: macs(totals.tokens),
        val_pass_macs=window_positions(loaders.check, cfg.data.seq_len) * forward_macs_per_token(
            num_layers=depth, heads=2, **shape))


def recalibrate(ctx: RunContext, model2: Model, out: Path) -> Dict[str, Any]:
    """phase2.lower=finetune moved the exit's confidences: the threshold again is the exact
    hard_example_ratio quantile of them on the calibration split. Written once to out/threshold.json
    (and into model.pt's meta)."""
    cfg = ctx.cfg

    def make() -> Dict[str, Any]:
        return {**calibrate(cfg, model2, ctx.loaders, ctx.device), "block1_finetuned": True}

    def write(path: Path, info: Dict[str, Any]) -> None:  # model.pt first: threshold.json marks both written
        save_model(out / "model.pt", model2, cfg, stage="phase2", result=read_json(out / "result.json"),
                   threshold=info["threshold"])
        write_json(path, info)

    return load_or_run(out / "threshold.json", read_json, make, write)


def routing_threshold_info(ctx: RunContext, threshold_info: Dict[str, Any]) -> Dict[str, Any]:
    """The calibration the phase-2 model routes with: phase 1's (`threshold_info`), or under
    phase2.lower=finetune the recalibrated one in phase2/threshold.json."""
    if ctx.cfg.phase2.lower != "finetune":
        return threshold_info
    return read_json(require(ctx.run_dir / "phase2" / "threshold.json", "phase2.lower=finetune",
                             "the recalibrated threshold", "phase2"))
