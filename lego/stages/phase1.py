"""Stage `phase1`: Block 1, a `phase1.layers`-layer LM trained on every token (SPEC section 3.1), or under
phase1.scaffold inside the full depth (`lego.pipeline.scaffold`); writes phase1/."""

from __future__ import annotations

import math

from lego.checkpoint import expected_args, load_model
from lego.config import ASHEMConfig
from lego.model import Model
from lego.pipeline.results import require
from lego.pipeline.setup import Loaders, RunContext
from lego.pipeline.scaffold import cached_scaffold
from lego.pipeline.standard import cached_standard
from lego.pipeline.train import phase1_budget_steps


def run(ctx: RunContext) -> Model:
    """Train (or take from the model cache, or from phase1/) the phase-1 model for `phase1_steps` steps."""
    cfg = ctx.cfg
    if cfg.phase1.scaffold:  # Block 1 trained inside the full depth (lego.pipeline.scaffold)
        return cached_scaffold(cfg, ctx.corpus, ctx.loaders, ctx.run_dir / "phase1", ctx.device, ctx.tracker)
    return cached_standard(cfg, ctx.corpus, ctx.loaders, cfg.phase1.layers, ctx.run_dir / "phase1", ctx.device,
                           "phase1", tracker=ctx.tracker, steps=phase1_steps(cfg, ctx.loaders))


def load(ctx: RunContext) -> Model:
    """The phase-1 model a previous invocation wrote."""
    cfg = ctx.cfg
    path = require(ctx.run_dir / "phase1" / "model.pt", f"stages={cfg.stages}", "phase 1's result", "phase1")
    return load_model(path, expected_args(cfg, ctx.corpus.vocab_size, cfg.phase1.layers), ctx.device,
                      "phase1 checkpoint")


def phase1_steps(cfg: ASHEMConfig, loaders: Loaders) -> int:
    """Phase 1's optimizer steps: its whole budget (`phase1_budget_steps`), or under phase1.budget_fraction that
    share of the pipeline's budget, max(1, round(fraction x steps)) with halves up. Phase 2 gets the rest
    (`lego.pipeline.upper.rest_of_budget`)."""
    total, f = phase1_budget_steps(cfg, loaders), cfg.phase1.budget_fraction
    return total if f is None else max(1, math.floor(f * total + 0.5))
