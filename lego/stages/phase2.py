"""Stage `phase2`: grow the phase-1 model and train its upper Block on the training split's hard
tokens for its budget of steps, validated on the validation split's (SPEC section 3.3).

The variants (each one config key; the defaults are the specification):
- phase2.init=copy: the new layers start as copies of the lower stack (`DeepSupervisionTransformer.grow`).
- phase2.loss_tokens=all|weighted: the deep exit's loss at every position of the mined sequences
  (easy ones weighted by easy_weight); validation still reads the validation split's hard tokens,
  the only ones the deep exit serves when routing.
- phase2.lower=finetune: Block 1 keeps training on the whole training split, with the loss at both exits
  (StageConfig deep supervision), validated on that loss; the threshold is then
  recalibrated on the calibration split (phase2/threshold.json) so the asked hard ratio holds.
- phase1.budget_fraction: phase 2's steps are what phase 1 and mining left of the shared budget (`rest_of_budget`).

With more than two `blocks`, stage phase2 also trains Blocks 3, 4, ... (`stage_later_blocks`), each as
phase 2 trains Block 2 and with phase2's settings, into block3/, block4/, ...; the two-Block variants
lower=finetune and phase1.budget_fraction are refused there (lego.config.validate).
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from lego import __version__, distributed
from lego.artifacts import StageError, read_json, write_json
from lego.ashem import evaluate_on_hard_examples, grow, train_upper_layers
from lego.checkpoint import load_model, model_args, save_model
from lego.config import IGNORE_INDEX, ASHEMConfig, StageConfig, TrainingConfig, block_layers, exit_ratios
from lego.cost import dense_training_macs, forward_macs_per_token, phase2_training_macs, steps_for_macs
from lego.model import DeepSupervisionTransformer
from lego.stages.cache import through_cache
from lego.stages.hard_examples import calibrate, hard_loader
from lego.stages.compare import mining_compute
from lego.stages.phase1 import pipeline_budget_steps
from lego.stages.setup import (Loaders, budget_steps, epoch_steps, loop_report, lr_schedule, make_optimizer,
                               model_macs, science_config)
from lego.stages.standard import window_positions
from lego.trackers import Tracker
from lego.training import Trainer, fit, train_epoch


def grown(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float,
          num_layers: Optional[int] = None) -> DeepSupervisionTransformer:
    """A Block's model before training: the model below grown to `num_layers` (default: Block 2's depth,
    phase2.layers for two Blocks), its last layer a new exit with the calibrated threshold."""
    return grow(model1, num_layers or block_layers(cfg)[1], routing_threshold=threshold, deep_head=cfg.phase2.deep_head,
                       upper_context=cfg.phase2.upper_context, init=cfg.phase2.init)


def rest_of_budget(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int, run_dir: Path,
                   macs_per_step: float) -> Tuple[int, Dict[str, float]]:
    """Phase 2's budget under phase1.budget_fraction: the pipeline's budget is phase1.max_epochs x
    phase1.epoch_steps phase-1 steps (data.batch_size x seq_len x phase1.grad_accum tokens through phase1.layers layers,
    `dense_training_macs`); phase 2 gets what phase 1 really spent (phase1/result.json) and the mining that ran
    (`lego.stages.compare.mining_compute`) left of it, as the nearest number of its own steps of
    `macs_per_step` (at least 1): within half a step of the budget. Returns the steps and the record of how they
    were derived: budget_macs (the pipeline's), rest_macs (what phase 2 was left) and step_macs."""
    step1 = dense_training_macs(tokens=cfg.data.batch_size * cfg.data.seq_len * cfg.phase1.grad_accum,
                                num_layers=cfg.phase1.layers,
                                **model_macs(cfg, vocab_size))
    budget = pipeline_budget_steps(cfg, loaders) * step1
    spent = float(read_json(run_dir / "phase1" / "result.json")["train_macs"])
    rest = max(budget - spent - mining_compute(cfg, loaders, vocab_size)["train_macs"], 0.0)
    return steps_for_macs(rest, macs_per_step), {"budget_macs": budget, "rest_macs": rest, "step_macs": macs_per_step}


def stage_phase2(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float, loaders: Loaders,
                 run_dir: Path, device: torch.device, tracker: Optional[Tracker] = None, *,
                 corpus_key: Optional[str] = None) -> DeepSupervisionTransformer:
    """Train the upper Block (or, under phase2.lower=finetune, the whole model); writes run_dir/phase2/
    (model.pt, history.jsonl, result.json; threshold.json under finetune). With `corpus_key` (the corpus's
    cache key) and phase1.cache, Block 2 is shared through the stage cache (`block_key`; not under finetune)."""
    out = run_dir / "phase2"
    if distributed.broadcast((out / "model.pt").exists()):
        model2 = load_model(out / "model.pt", model_args(grown(cfg, model1, threshold)), device, "phase2 checkpoint")
    elif cfg.phase2.lower == "finetune":
        model2 = train_finetune(cfg, model1, threshold, loaders, run_dir, device, tracker)
    elif cfg.phase1.cache and corpus_key is not None:
        def make(entry: Path) -> DeepSupervisionTransformer:
            if distributed.broadcast((entry / "model.pt").exists()):
                return load_model(entry / "model.pt", model_args(grown(cfg, model1, threshold)), device,
                                  "phase2 cache entry")
            return train_upper(cfg, model1, threshold, loaders, run_dir, device, tracker, out=entry)
        return through_cache(cfg, "phase2", block_key(cfg, 2, corpus_key, device), out, make, BLOCK_FILES)
    else:
        return train_upper(cfg, model1, threshold, loaders, run_dir, device, tracker)
    if cfg.phase2.lower == "finetune":
        recalibrate(cfg, model2, loaders, out, device)
    return model2


def train_upper(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float, loaders: Loaders,
                run_dir: Path, device: torch.device, tracker: Optional[Tracker] = None, *, name: str = "phase2",
                num_layers: Optional[int] = None, out: Optional[Path] = None) -> DeepSupervisionTransformer:
    """The specification's phase 2: the Blocks below frozen, the next Block (to `num_layers`, default
    Block 2's depth) trained on the hard sequences at the exit `model1`'s last layer becomes, with phase2's
    settings; writes `out` (default run_dir/<name>/; a stage-cache entry). `model1` is the phase-1 model, or
    for Block 3 on the model of Blocks 1-2."""
    out = out or run_dir / name
    exit_layer, depth = model1.num_layers, num_layers or block_layers(cfg)[1]
    p2 = cfg.phase2
    every = p2.loss_tokens != "hard"  # the deep exit is scored (and its head run) at every position
    scratch = out / "scratch"
    train_hard = hard_loader(cfg, model1, loaders.train_ordered, threshold, device, scratch / "train", shuffle=True,
                             what=f"{name} train", keep_easy=every, exit_layer=exit_layer)
    val_hard = hard_loader(cfg, model1, loaders.validation, threshold, device, scratch / "validation",
                           shuffle=False, what=f"{name} validation", exit_layer=exit_layer)
    torch.manual_seed(cfg.seed + 1 + len(model1.exit_layers))  # Block 2: seed + 1, Block 3: seed + 2, ...
    model2 = grown(cfg, model1, threshold, depth)
    if cfg.model.compile:
        model2.compile_blocks()
    optimizer = make_optimizer(model2, p2.lr, p2.weight_decay, device)
    train_batches, per_epoch = epoch_steps(train_hard, p2)
    shape = model_macs(cfg, model1.vocab_size)
    easy_weight = None if not every else 1.0 if p2.loss_tokens == "all" else p2.easy_weight

    def macs(tokens: float, hard_ratio: float) -> float:
        return phase2_training_macs(tokens=tokens, hard_ratio=1.0 if every else hard_ratio, exit_layer=exit_layer,
                                    num_layers=depth, policy=p2.upper_context,
                                    recompute=cfg.hard_examples.store == "recompute", **shape)

    steps, budget = budget_steps(p2, per_epoch), {}
    if cfg.phase1.budget_fraction is not None:
        steps, budget = rest_of_budget(cfg, loaders, model1.vocab_size, run_dir,
                                       macs(p2.batch_size * cfg.data.seq_len * p2.grad_accum, hard_ratio(train_hard)))
    schedule = lr_schedule(p2, steps)
    fit(model2,
        lambda epoch, totals, max_steps: train_upper_layers(
            model2, train_batches, optimizer, None, device, exit_layer, grad_clip=p2.grad_clip, epoch=epoch,
            lr_factor=schedule, totals=totals, easy_weight=easy_weight, max_steps=max_steps,
            grad_accum=p2.grad_accum, **loop_report(cfg, tracker, name)),
        lambda: evaluate_on_hard_examples(model2, val_hard, None, device, exit_layer)["loss"],
        optimizer=optimizer, work_dir=out, budget_steps=steps, steps_per_epoch=per_epoch, patience=p2.patience,
        name=name, save=lambda path, result: save_model(path, model2, cfg, stage=name, result=result,
                                                         threshold=threshold),
        macs=lambda totals: macs(totals.tokens, totals.counted / max(totals.tokens, 1)),
        val_pass_macs=macs(len(val_hard.dataset) * cfg.data.seq_len, hard_ratio(val_hard)) / 3, record=budget,
        tracker=tracker)
    shutil.rmtree(scratch, ignore_errors=True)
    return model2


def train_finetune(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float, loaders: Loaders,
                   run_dir: Path, device: torch.device, tracker: Optional[Tracker] = None) -> DeepSupervisionTransformer:
    """phase2.lower=finetune: every parameter trains on every training token, loss at the exit layer
    (weight exit_loss_weight) plus the last layer, with phase 2's optimizer settings. Its epochs
    continue phase 1's seeded batch order (epoch phase1.max_epochs + k), so they draw other batches."""
    out = run_dir / "phase2"
    p1, p2 = cfg.phase1, cfg.phase2
    exit_layer, depth = p1.layers, p2.layers
    torch.manual_seed(cfg.seed + 1)
    model2 = grown(cfg, model1, threshold)
    model2.requires_grad_(True)  # grow froze Block 1 and the exit head
    if cfg.model.compile:
        model2.compile_blocks()
    optimizer = make_optimizer(model2, p2.lr, p2.weight_decay, device)
    tc = TrainingConfig(stages=[StageConfig((exit_layer, exit_layer), p2.exit_loss_weight),
                                StageConfig((depth, depth), 1.0)], grad_clip=p2.grad_clip)
    trainer = Trainer(tc, device=device)
    train_batches, per_epoch = epoch_steps(loaders.train, p2)
    shape = model_macs(cfg, model1.vocab_size)

    def macs(tokens: float) -> float:  # forward + backward of every layer, both heads
        return dense_training_macs(tokens=tokens, num_layers=depth, heads=2, **shape)

    steps, budget = budget_steps(p2, per_epoch), {}
    if p1.budget_fraction is not None:
        steps, budget = rest_of_budget(cfg, loaders, model1.vocab_size, run_dir,
                                       macs(cfg.data.batch_size * cfg.data.seq_len * p2.grad_accum))
    schedule = lr_schedule(p2, steps)
    fit(model2,
        lambda epoch, totals, max_steps: train_epoch(
            model2, train_batches, optimizer, trainer.stage_loss_sum, device, epoch=p1.max_epochs + epoch,
            grad_clip=p2.grad_clip, lr_factor=schedule, totals=totals, max_steps=max_steps,
            grad_accum=p2.grad_accum, **loop_report(cfg, tracker, "phase2")),
        lambda: trainer.validation_loss(model2, loaders.check),
        optimizer=optimizer, work_dir=out, budget_steps=steps, steps_per_epoch=per_epoch, patience=p2.patience,
        name="phase2", save=lambda path, result: save_model(path, model2, cfg, stage="phase2", result=result,
                                                            threshold=threshold),
        macs=lambda totals: macs(totals.tokens),
        val_pass_macs=window_positions(loaders.check, cfg.data.seq_len) * forward_macs_per_token(
            num_layers=depth, heads=2, **shape),
        record={**budget, "block1_finetuned": True},  # the report must not present Block 1 as the phase-1 model
        tracker=tracker)
    return model2


def hard_ratio(loader) -> float:
    """The share of positions of a hard-example loader's sequences that are hard (counted in the loss)."""
    targets = loader.dataset.targets  # (N, T), or (N, 2, T) with keep_easy: (hard-only, all)
    return float(((targets[:, 0] if targets.dim() == 3 else targets) != IGNORE_INDEX).float().mean())


def recalibrate(cfg: ASHEMConfig, model2: DeepSupervisionTransformer, loaders: Loaders, out: Path,
                device) -> Dict[str, Any]:
    """phase2.lower=finetune moved the exit's confidences: the threshold again is the exact
    hard_example_ratio quantile of them on the calibration split. Written once to out/threshold.json
    (and into model.pt) and set on `model2`."""
    path = out / "threshold.json"
    if distributed.broadcast(path.exists()):
        info = read_json(path)
        model2.routing_threshold = info["threshold"]
        return info
    info = {**calibrate(cfg, model2, loaders, device), "block1_finetuned": True}
    model2.routing_threshold = info["threshold"]
    if distributed.is_main():
        save_model(out / "model.pt", model2, cfg, stage="phase2", result=read_json(out / "result.json"),
                   threshold=info["threshold"])
        write_json(path, info)
    return info


def routing_threshold_info(cfg: ASHEMConfig, run_dir: Path, threshold_info: Dict[str, Any]) -> Dict[str, Any]:
    """The calibration the phase-2 model routes with: phase 1's (`threshold_info`), or under
    phase2.lower=finetune the recalibrated one in phase2/threshold.json."""
    if cfg.phase2.lower != "finetune":
        return threshold_info
    path = run_dir / "phase2" / "threshold.json"
    if not path.exists():
        raise StageError(f"phase2.lower=finetune needs the recalibrated threshold at {path}; include phase2 in stages")
    return read_json(path)


def load_phase2(cfg: ASHEMConfig, model1: DeepSupervisionTransformer, threshold: float, run_dir: Path,
                device: torch.device) -> DeepSupervisionTransformer:
    """The phase-2 model a previous invocation wrote, for runs whose `stages` leave phase2 out."""
    path = run_dir / "phase2" / "model.pt"
    if not path.exists():
        raise StageError(f"stages={cfg.stages} needs phase 2's result at {path}; include phase2 in stages")
    model2 = load_model(path, model_args(grown(cfg, model1, threshold)), device, "phase2 checkpoint")
    if cfg.phase2.lower == "finetune":
        model2.routing_threshold = routing_threshold_info(cfg, run_dir, {})["threshold"]
    return model2


def stage_later_blocks(cfg: ASHEMConfig, model2: DeepSupervisionTransformer, loaders: Loaders, run_dir: Path,
                       device: torch.device, tracker: Optional[Tracker] = None, *, train: bool = True,
                       corpus_key: Optional[str] = None) -> Tuple[DeepSupervisionTransformer, List[Dict[str, Any]]]:
    """Blocks 3, 4, ... of `blocks` on top of the phase-2 model: for Block k, calibrate the exit below it
    (layer blocks[k-2]) on the calibration tokens that reach it at its hard_example_ratios entry
    (block<k>/threshold.json), then grow and train Block k on the training tokens that reach that exit and
    are hard there, exactly as phase 2 (`train_upper`, block<k>/). Every lower exit stays bit-identical.
    With `train=False` (phase2 not in stages) it loads what a previous invocation wrote. With `corpus_key`
    and phase1.cache each Block is shared through the stage cache (`block_key`, `later_block`). Returns the
    final model and the threshold.json of each exit above the first."""
    model, infos = model2, []
    for k in range(2, len(block_layers(cfg))):  # blocks[k] ends Block k + 1; its exit below is blocks[k - 1]
        name = f"block{k + 1}"
        out = run_dir / name
        done = distributed.broadcast((out / "model.pt").exists())
        if not train and not done:
            raise StageError(f"stages={cfg.stages} needs {name}'s result at {out / 'model.pt'}; "
                             "include phase2 in stages")
        make = partial(later_block, cfg, model, k, loaders, run_dir, device, tracker)
        if not done and cfg.phase1.cache and corpus_key is not None:
            model, info = through_cache(cfg, name, block_key(cfg, k + 1, corpus_key, device), out, make,
                                        ("threshold.json", *BLOCK_FILES))
        else:
            model, info = make(out)  # what the run dir holds, or calibrated and trained there
        infos.append(info)
    return model, infos


BLOCK_FILES = ("model.pt", "history.jsonl", "result.json")  # a Block's result in its stage dir (and cache entry)


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


def later_block(cfg: ASHEMConfig, model: DeepSupervisionTransformer, k: int, loaders: Loaders, run_dir: Path,
                device: torch.device, tracker: Optional[Tracker], entry: Path
                ) -> Tuple[DeepSupervisionTransformer, Dict[str, Any]]:
    """Block k + 1 of `blocks` in `entry` (its run-dir stage dir or a stage-cache entry): calibrate the exit
    below it (threshold.json) and train it, or load what `entry` holds. Returns (the grown model, its
    threshold.json)."""
    blocks, ratios = block_layers(cfg), exit_ratios(cfg)
    name = f"block{k + 1}"
    if distributed.broadcast((entry / "threshold.json").exists()):
        info = read_json(entry / "threshold.json")
    else:
        info = calibrate(cfg, model, loaders, device, exit_layer=blocks[k - 1], ratio=ratios[k - 1])
        if distributed.is_main():
            write_json(entry / "threshold.json", info)
    if distributed.broadcast((entry / "model.pt").exists()):
        return load_model(entry / "model.pt", model_args(grown(cfg, model, info["threshold"], blocks[k])), device,
                          f"{name} checkpoint"), info
    return train_upper(cfg, model, info["threshold"], loaders, run_dir, device, tracker, name=name,
                       num_layers=blocks[k], out=entry), info
