"""phase1.scaffold: Block 1 trained inside a scaffold of the full depth, and phase 2 started from the scaffold.

A Block 1 trained as a model of its own learns what a shallow model predicts; on the chains corpus it grows no
previous-token head, the first half of a lookup, and no upper Block trained over it learned the lookup, while an
exit whose loss reaches layer 1 stopped a 2-layer model from learning it (outputs/reference/chains_search,
"Phase 2 over a trained Block 1" and "Other seeds"). Here phase 1 trains the `phase2.layers`-layer model on every
token with the loss at its last layer, and Block 1's exit head beside it on a detached hidden state, clipped on its
own: the layers are trained as the dense model's are, the exit head learns to read them. Block 1 (phase1/model.pt)
is the scaffold's embedding, lower layers and exit head; phase1/scaffold.pt keeps the whole model, and phase 2's
upper Block starts from its upper layers and last-layer head (`start_from_scaffold`), then trains on the hard
examples as the specification's phase 2 does.

Phase 1's budget is counted in multiply-adds (a scaffold step costs the full depth and both heads): its share of
the pipeline's budget under phase1.budget_fraction, else phase 1's own budget of phase1.layers-layer steps.

    model1 = cached_scaffold(cfg, corpus, loaders, run_dir / "phase1", device, tracker)
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from lego import __version__
from lego.artifacts import load_checkpoint, read_json
from lego.checkpoint import build_model, expected_args, load_model, save_model, stored_args
from lego.config import IGNORE_INDEX, ASHEMConfig, StageConfig, TrainingConfig
from lego.cost import dense_training_macs, forward_macs_per_token, steps_for_macs
from lego.data import Corpus
from lego.model import Model
from lego.pipeline.cache import through_cache
from lego.pipeline.compute import cost_shape, pipeline_budget_macs, window_positions
from lego.pipeline.results import load_or_run, on_disk
from lego.pipeline.science import science_config
from lego.pipeline.setup import Loaders
from lego.pipeline.train import train_block
from lego.trackers import Tracker
from lego.training import Trainer, train_epoch

FILES = ("model.pt", "history.jsonl", "result.json", "scaffold.pt")  # phase1/ under phase1.scaffold


def scaffold_loss_sum(model: Model, inputs: torch.Tensor, targets: torch.Tensor, exit_layer: int,
                      ignore_index: int = IGNORE_INDEX) -> Tuple[torch.Tensor, torch.Tensor]:
    """(summed CE at the last layer + summed CE of the exit head at `exit_layer` on a detached hidden state,
    counted tokens), one forward pass: the layers get the last layer's gradient alone."""
    flat = targets.reshape(-1)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=ignore_index,
                               reduction="sum")

    with model.autocast():
        h = model.run_layers(model.embed(inputs), 0, exit_layer)
        top = model.run_layers(h, exit_layer, model.num_layers)
        total = ce(model.logits_at(top, model.num_layers)) + ce(model.logits_at(h.detach(), exit_layer))
    return total, (targets != ignore_index).sum()


def scaffold_step_macs(cfg: ASHEMConfig, vocab_size: int) -> float:
    """Training MACs of one scaffold step: every layer and both heads, forward and backward (the exit head's
    backward to its input, which a detached state does not run, is counted too: an upper bound)."""
    return dense_training_macs(tokens=cfg.data.batch_size * cfg.data.seq_len * cfg.phase1.grad_accum,
                               num_layers=cfg.phase2.layers, heads=2, **cost_shape(cfg, vocab_size))


def scaffold_steps(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int) -> Dict[str, Any]:
    """Phase 1's budget in multiply-adds (phase1.budget_fraction of the pipeline's, or phase 1's own: max_epochs x
    epoch_steps phase1.layers-layer steps) and the scaffold steps nearest to it: steps, budget_macs, step_macs."""
    budget = pipeline_budget_macs(cfg, loaders, vocab_size) * (cfg.phase1.budget_fraction or 1.0)
    step = scaffold_step_macs(cfg, vocab_size)
    return {"steps": steps_for_macs(budget, step), "budget_macs": budget, "step_macs": step}


def joint_from_dense(dense: Model, exit_layer: int) -> Model:
    """`dense` with an exit head at `exit_layer` and a last-layer head of its own: the same weights, both heads a
    copy of its head (the scaffold's start, and the chains probe's `--joint-exit`)."""
    model = Model(replace(dense.args, exits=(exit_layer,), deep_head=True))
    model.load_state_dict(dense.state_dict(), strict=False)
    model.deep_head.load_state_dict(dense.output_head.state_dict())
    return model.to(next(dense.parameters()).device)


def lower_block(model: Model, layers: int) -> Model:
    """A model's embedding, first `layers` layers and first head (a scaffold's exit head, a dense model's output
    head) as a dense model: Block 1 of a scaffold, whose logits are the scaffold's exit logits bit for bit."""
    block = Model(replace(model.args, num_layers=layers, exits=(), deep_head=False))
    block.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith(("deep_head.", "exit_heads."))
                           and (not k.startswith("layers.") or int(k.split(".")[1]) < layers)})
    return block.to(next(model.parameters()).device)


def start_from_scaffold(grown: Model, path: Path) -> Model:
    """Phase 2's grown model with its upper layers and last-layer head set to the scaffold's at `path` (the
    embedding, Block 1 and the exit head are the scaffold's already, through Block 1). Trainability unchanged."""
    state = load_checkpoint(path, what="phase1 scaffold")
    args = stored_args(state["model_args"])
    if args["num_layers"] != grown.num_layers:
        raise ValueError(f"phase1 scaffold {path} has {args['num_layers']} layers, the grown model "
                         f"{grown.num_layers}")
    below = grown.exit_layers[0]
    upper = {k: v for k, v in state["state_dict"].items()
             if k.startswith("deep_head.") or (k.startswith("layers.") and int(k.split(".")[1]) >= below)}
    missing = grown.load_state_dict(upper, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"phase1 scaffold {path}: unexpected weights {missing.unexpected_keys[:3]}")
    return grown


def train_scaffold(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, out: Path, device: torch.device,
                   tracker: Optional[Tracker] = None) -> Model:
    """Train the scaffold into out/scaffold/ (`train_block`: phase 1's optimizer and schedule over
    `scaffold_steps`, resumable), then write Block 1 to out/model.pt and the scaffold to out/scaffold.pt, with its
    history.jsonl and result.json (the budget it was given added) beside them. Returns Block 1."""
    exit_layer, depth = cfg.phase1.layers, cfg.phase2.layers
    torch.manual_seed(cfg.seed)
    # the dense model's initial weights, drawn as it draws them
    model = joint_from_dense(build_model(cfg, corpus.vocab_size, depth), exit_layer).to(device)
    budget = scaffold_steps(cfg, loaders, corpus.vocab_size)
    shape = cost_shape(cfg, corpus.vocab_size)
    validation = Trainer(TrainingConfig(stages=[StageConfig((exit_layer, exit_layer), 1.0),
                                                StageConfig((depth, depth), 1.0)]), device=device)
    head = list(model.output_head.parameters())  # the exit head: clipped on its own
    work = out / "scaffold"
    train_block(
        cfg, model, cfg.phase1, loaders.train,
        lambda batches, optimizer, **kw: train_epoch(
            model, batches, optimizer, lambda m, x, y: scaffold_loss_sum(m, x, y, exit_layer), device, apart=head,
            **kw),
        lambda: validation.validation_loss(model, loaders.check), name="phase1", out=work, device=device,
        macs=lambda totals: dense_training_macs(tokens=totals.tokens, num_layers=depth, heads=2, **shape),
        val_pass_macs=window_positions(loaders.check, cfg.data.seq_len) * forward_macs_per_token(
            num_layers=depth, heads=2, **shape),
        steps=budget["steps"], record={"scaffold": True, "budget_macs": budget["budget_macs"],
                                       "step_macs": budget["step_macs"]}, tracker=tracker)
    block = lower_block(model, exit_layer)
    result = read_json(work / "result.json")
    save_model(out / "scaffold.pt", model, cfg, stage="phase1 scaffold", result=result)
    for name in ("history.jsonl", "result.json"):
        shutil.copy2(work / name, out / name)
    save_model(out / "model.pt", block, cfg, stage="phase1", result=result)  # last: it marks phase1/ complete
    return block


def cached_scaffold(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, out: Path, device: torch.device,
                    tracker: Optional[Tracker] = None) -> Model:
    """`train_scaffold`, or Block 1 from out/model.pt, shared through the model cache when phase1.cache is on."""
    expect = expected_args(cfg, corpus.vocab_size, cfg.phase1.layers)

    def make(where: Path) -> Model:
        return load_or_run(where / "model.pt", lambda p: load_model(p, expect, device, "phase1 checkpoint"),
                           lambda: train_scaffold(cfg, corpus, loaders, where, device, tracker))

    if not cfg.phase1.cache or on_disk(out / "model.pt"):
        return make(out)
    science = science_config(cfg)
    key_src = {"model": science["model"], "data": science["data"],
               "phase1": {k: v for k, v in science["phase1"].items() if k != "cache"},
               "depth": cfg.phase2.layers, "seed": cfg.seed, "corpus": corpus.cache_key, "device": device.type,
               "lego": __version__, "steps": scaffold_steps(cfg, loaders, corpus.vocab_size)["steps"]}
    return through_cache(cfg, "scaffold", key_src, out, make, FILES)
