"""Stage `generate`: the finished (phase-2) model continues prompts with each decoder of
lego.generate (dense, routed under the run's upper_context policy, self-speculative with Block 1
as the draft), timed; it reads the models and changes nothing the other stages compute.

    lego-run stages=[generate] hydra.run.dir=<run dir>   # on a finished run, without retraining
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch

from lego import distributed
from lego.artifacts import read_json, write_json
from lego.config import Routing, to_dict
from lego.generate import run_generation, test_prompts
from lego.heads import RouterProbe
from lego.model import Model
from lego.pipeline.setup import RunContext
from lego.speculative import agreement_threshold, draft_agreement

log = logging.getLogger(__name__)


def run(ctx: RunContext, model2: Model, threshold: float) -> Optional[Dict[str, Any]]:
    """Write generate/samples.md and metrics.json (rank 0 alone); return the metrics. The routed decoder routes at
    the first exit at `threshold`, under the run's upper_context and confidence; adaptive drafting stops there too,
    or with generate.draft_agreement at its own threshold, calibrated on the validation tokens that validation
    during training scores (`draft_threshold`, written to generate/draft_threshold.json).

    Skipped when config.json (written after the others) holds the same generate settings;
    other settings regenerate (they are left out of the run-dir claim, so they may change on a rerun).
    Ranks above 0 return None.
    """
    if not distributed.is_main():
        return None
    cfg, corpus = ctx.cfg, ctx.corpus
    g, out = cfg.generate, ctx.run_dir / "generate"
    settings = to_dict(g)
    if (out / "metrics.json").exists() and (out / "config.json").exists() \
            and read_json(out / "config.json") == settings:
        return read_json(out / "metrics.json")
    prompts = (test_prompts(corpus.test, g.num_prompts, g.prompt_len, g.seed) if g.prompt is None
               else [corpus.tokenizer.encode(g.prompt)])  # lego.generate checks lengths against max_seq_len
    (out / "config.json").unlink(missing_ok=True)  # written last: it marks the files as these settings' output
    routing = Routing((threshold,), cfg.phase2.upper_context, cfg.hard_examples.confidence)
    drafting = draft_threshold(ctx, model2, out) if g.adaptive and g.draft_agreement is not None else None
    metrics = run_generation(model2.to(ctx.device), corpus.tokenizer, prompts, decoders=g.decoders,
                             k_values=g.k_values, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                             top_k=g.top_k, top_p=g.top_p, seed=g.seed, adaptive=g.adaptive, routing=routing,
                             drafting=drafting, batch_size=g.batch_size, out_dir=out)
    learned = ctx.run_dir / "eval" / "learned_router.pt"  # eval.learned_router: routed decoding with it too
    if learned.is_file() and "routed" in g.decoders:
        state = torch.load(learned, map_location=ctx.device, weights_only=True)
        learned_routing = routing.learned(RouterProbe.from_state(state["probe"]).to(ctx.device), state["threshold"])
        metrics["learned_router"] = run_generation(
            model2, corpus.tokenizer, prompts, decoders=[d for d in ("dense", "routed") if d in g.decoders],
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed,
            routing=learned_routing, batch_size=g.batch_size, out_dir=out / "learned_router")
        write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", settings)
    log.info("generate: %s in %s", ", ".join(k for k in metrics if k != "settings"), out)
    return metrics


def draft_threshold(ctx: RunContext, model2: Model, out) -> Routing:
    """Adaptive drafting's own threshold (generate.draft_agreement): the lowest exit confidence at which the exit's
    top token equals the deep model's on at least that share of the validation tokens at or above it
    (`lego.speculative.agreement_threshold`, teacher-forced). Writes out/draft_threshold.json."""
    cfg = ctx.cfg
    measure = cfg.hard_examples.confidence
    conf, agree = draft_agreement(model2.to(ctx.device), ctx.loaders.check, ctx.device, measure)
    info = {**agreement_threshold(conf, agree, cfg.generate.draft_agreement), "target": cfg.generate.draft_agreement,
            "measure": measure, "split": "validation (data.val_check_tokens)",
            "agreement_everywhere": float(agree.double().mean())}
    write_json(out / "draft_threshold.json", info)
    log.info("generate: draft threshold %.4g (agreement %.3f on the %.3f of %d validation tokens at or above it)",
             info["threshold"], info["agreement"], info["draft_share"], info["tokens"])
    return Routing((info["threshold"],), "full", measure)
