"""Stage `phase1`: Block 1, a `phase1.layers`-layer LM trained on every token (SPEC section 3.1)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from lego.artifacts import StageError
from lego.checkpoint import build_model, load_model, model_args
from lego.config import ASHEMConfig
from lego.data import Corpus
from lego.model import DeepSupervisionTransformer
from lego.stages.setup import Loaders, budget_steps, epoch_steps
from lego.stages.standard import cached_standard
from lego.trackers import Tracker


def stage_phase1(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, run_dir: Path,
                 device: torch.device, tracker: Optional[Tracker] = None) -> DeepSupervisionTransformer:
    """Train (or take from the cache) the phase-1 model; writes run_dir/phase1/."""
    return cached_standard(cfg, corpus, loaders, cfg.phase1.layers, run_dir / "phase1", device, "phase1",
                           tracker=tracker, steps=phase1_steps(cfg, loaders))


def pipeline_budget_steps(cfg: ASHEMConfig, loaders: Loaders) -> int:
    """phase1.max_epochs x phase1.epoch_steps: phase 1's budget in steps, or under phase1.budget_fraction the
    whole pipeline's budget, counted in phase-1 steps (`lego.stages.phase2.rest_of_budget` turns it into MACs)."""
    return budget_steps(cfg.phase1, epoch_steps(loaders.train, cfg.phase1)[1])


def phase1_steps(cfg: ASHEMConfig, loaders: Loaders) -> int:
    """Phase 1's optimizer steps: its whole budget, or under phase1.budget_fraction that share of the pipeline's
    budget, max(1, round(fraction x steps)) with halves up. Phase 2 gets the rest (`lego.stages.phase2`)."""
    total, f = pipeline_budget_steps(cfg, loaders), cfg.phase1.budget_fraction
    return total if f is None else max(1, math.floor(f * total + 0.5))


def load_phase1(cfg: ASHEMConfig, corpus: Corpus, run_dir: Path, device: torch.device) -> DeepSupervisionTransformer:
    """The phase-1 model a previous invocation wrote, for runs whose `stages` leave phase1 out."""
    path = run_dir / "phase1" / "model.pt"
    if not path.exists():
        raise StageError(f"stages={cfg.stages} needs phase 1's result at {path}; include phase1 in stages")
    expect = model_args(build_model(cfg, corpus.vocab_size, cfg.phase1.layers))
    return load_model(path, expect, device, "phase1 checkpoint")
