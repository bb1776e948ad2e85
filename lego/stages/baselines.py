"""Stage `baselines` (it runs with eval, when eval.standard_baseline): the dense frontier (SPEC section 6), a
dense model of every frontier depth (`dense_depths`) trained on all tokens with phase 1's optimizer and
schedule for the budget `eval.baseline_budget` gives it, into dense<depth>/ (shared through the model cache; with
`eval.baseline_tolerance`, also with runs whose budgets come to a few steps more or fewer).
Each is scored on the evaluated split and on validation (what the frontier is chosen on); stage eval sets
the routed model against them."""

from __future__ import annotations

from typing import Any, Dict

from lego.config import create_standard_config
from lego.pipeline.compute import dense_budget, dense_depths, inference_cost, pipeline_compute, training_record
from lego.pipeline.setup import RunContext, evaluator
from lego.pipeline.standard import cached_standard


def run(ctx: RunContext) -> Dict[str, Dict[str, Any]]:
    """depth -> the dense model's metrics on eval.split, its validation ppl (`val_ppl`), its training record,
    its budget (`budget_macs`, `step_macs`, `asked_steps`: the steps that budget comes to, and `macs_off`: what it spent
    minus its budget; with eval.baseline_tolerance a cached model a few steps off is reused) and its inference
    cost relative to the full model's (`dense_budget` from the pipeline's training compute, which every
    earlier training recorded)."""
    cfg, corpus, loaders, run_dir = ctx.cfg, ctx.corpus, ctx.loaders, ctx.run_dir
    loader = loaders.test if cfg.eval.split == "test" else loaders.validation
    compute = pipeline_compute(cfg, loaders, corpus.vocab_size, run_dir)
    out = {}
    for depth in dense_depths(cfg):
        budget = dense_budget(cfg, loaders, corpus.vocab_size, depth, compute)
        model = cached_standard(cfg, corpus, loaders, depth, run_dir / f"dense{depth}", ctx.device, f"dense{depth}",
                                steps=budget["steps"], tracker=ctx.tracker, tolerance=cfg.eval.baseline_tolerance)
        score = evaluator(cfg, create_standard_config(depth), ctx.device).evaluate
        record = training_record(run_dir / f"dense{depth}")
        out[str(depth)] = {**score(model, loader), "val_ppl": score(model, loaders.validation)["ppl"],
                           **record, "budget_macs": budget["budget_macs"], "step_macs": budget["step_macs"],
                           "asked_steps": budget["steps"],
                           "macs_off": record["train_macs"] - budget["budget_macs"],
                           "inference_cost": inference_cost(cfg, corpus.vocab_size, depth)}
    return out
