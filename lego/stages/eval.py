"""Stage `eval`: every reported number, on the test split: routed ASHEM, its parts, the dense baselines (trained
by stage `baselines`) and the verdict against them, and the trade-off analysis (SPEC sections 3.4 and 6);
writes eval/metrics.json and the analysis files."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


from lego import distributed
from lego.artifacts import write_json
from lego.ashem import evaluate_on_hard_examples
from lego.config import ASHEMConfig, StageConfig, TrainingConfig, block_layers, create_standard_config
from lego.cost import routed_macs
from lego.data import Corpus
from lego.model import Model
from lego.pipeline.compute import cost_shape, pipeline_compute
from lego.pipeline.mining import hard_loader
from lego.pipeline.setup import RunContext, evaluator, make_loaders
from lego.pipeline.verdict import verdict
from lego.report import analyze
from lego.stages.by_label import stage_by_label

HEADLINES = ("ppl_compute_auc", "ppl_compute_auc_per_unit", "compute_saved_at_1pct_ppl", "oracle_shallow_ratio",
             "auroc", "ece_exit")  # analysis numbers kept in metrics.json (the rest is in eval/analysis.json)


def timed_evaluate(cfg: ASHEMConfig, config: TrainingConfig, model, loader, device) -> Dict[str, Any]:
    """`Trainer.evaluate` plus its wall time in seconds (`wall_s`)."""
    start = time.perf_counter()
    out = evaluator(cfg, config, device).evaluate(model, loader)
    out["wall_s"] = time.perf_counter() - start
    return out


def run(ctx: RunContext, model1: Model, model2: Model,
        threshold_info: Dict[str, Any], later_exits: Sequence[Dict[str, Any]] = (),
        dense: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Writes eval/metrics.json (and the analysis files); returns the metrics. `model2` is the final model; with
    more than two Blocks `later_exits` holds the threshold.json of each exit above the first, and routing
    cascades. `dense`: what stage baselines returned (None: no baselines, no verdict)."""
    cfg, corpus, loaders, run_dir, device = ctx.cfg, ctx.corpus, ctx.loaders, ctx.run_dir, ctx.device
    out = run_dir / "eval"
    exit_layer, depth = cfg.phase1.layers, cfg.phase2.layers
    threshold = threshold_info["threshold"]
    exits, thresholds = block_layers(cfg)[:-1], [threshold, *(i["threshold"] for i in later_exits)]
    cascade = dict(exit_layers=exits, routing_thresholds=thresholds) if len(exits) > 1 else {}
    loader = loaders.test if cfg.eval.split == "test" else loaders.validation
    routed = TrainingConfig(stages=[StageConfig((depth, depth))], routing_threshold=threshold, exit_layer=exit_layer,
                            confidence=cfg.hard_examples.confidence, upper_context=cfg.phase2.upper_context,
                            **cascade)
    metrics: Dict[str, Any] = {"split": cfg.eval.split, "threshold": threshold, "exit_layer": exit_layer,
                               "num_layers": depth, "upper_context": cfg.phase2.upper_context,
                               "confidence": cfg.hard_examples.confidence}
    if cascade:
        metrics.update(exit_layers=exits, thresholds=thresholds)
    metrics["ashem"] = timed_evaluate(cfg, routed, model2, loader, device)
    # A sweep's objective (SPEC 6: nothing is chosen on test): the routed model on validation.
    metrics["ashem_validation"] = (metrics["ashem"] if cfg.eval.split == "validation"
                                   else evaluator(cfg, routed, device).evaluate(model2, loaders.validation))
    metrics["phase1_only"] = timed_evaluate(cfg, create_standard_config(exit_layer), model1, loader, device)
    metrics["no_routing"] = timed_evaluate(cfg, create_standard_config(depth), model2, loader, device)
    shares = [e["share"] for e in metrics["ashem"]["exits"][:-1]]  # tokens predicted at each exit
    metrics["ashem"].update(routed_macs(exit_layer=exit_layer, num_layers=depth,
                                        shallow_ratio=metrics["ashem"]["shallow_ratio"],
                                        policy=cfg.phase2.upper_context, **cost_shape(cfg, corpus.vocab_size),
                                        **(dict(exit_layers=exits, exit_shares=shares) if cascade else {})))
    metrics["ashem"]["wall_cost"] = metrics["ashem"]["wall_s"] / metrics["no_routing"]["wall_s"]
    exit_model = model2 if cfg.phase2.lower == "finetune" else model1  # the exit that routes
    split_hard = hard_loader(cfg, exit_model, loader, threshold, device, out / "scratch", shuffle=False,
                             what=f"{cfg.eval.split} hard tokens")
    metrics["hard_tokens"] = {
        "phase1": evaluate_on_hard_examples(model1, split_hard, None, device, exit_layer),
        "ashem": evaluate_on_hard_examples(model2, split_hard, None, device, exit_layer,
                                           policy=cfg.phase2.upper_context),
    }
    shutil.rmtree(out / "scratch", ignore_errors=True)
    metrics["train_compute"] = pipeline_compute(cfg, loaders, corpus.vocab_size, run_dir)
    if dense is not None:
        metrics["dense"] = dense
        if str(depth) in dense:
            metrics["standard"] = dense[str(depth)]
        metrics["verdict"] = verdict(metrics, cfg.eval.baseline_budget)
    if cfg.eval.analysis and distributed.is_main():  # per-token analysis of the whole split, on rank 0 alone
        whole = make_loaders(cfg, corpus, shard=False, device=device) if distributed.is_distributed() else loaders
        metrics["analysis"] = run_analysis(cfg, corpus, model2, metrics,
                                           whole.test if cfg.eval.split == "test" else whole.validation,
                                           whole.validation, out, device)
    metrics.update(stage_by_label(cfg, corpus, model1, model2, metrics, run_dir, device))  # data=chains, learned router
    if distributed.is_main():
        write_json(out / "metrics.json", metrics)
    return metrics


def run_analysis(cfg: ASHEMConfig, corpus: Corpus, model2: Model, metrics: Dict[str, Any],
                 loader, choose_loader, out: Path, device) -> Dict[str, Any]:
    """Trade-off curve, oracle, confidence diagnostics and pictures (lego.report.analyze) in eval/, with
    operating points chosen on `choose_loader` (validation); returns the headline numbers kept in metrics.json."""
    exit_layer, depth = cfg.phase1.layers, cfg.phase2.layers
    exits = block_layers(cfg)[:-1]
    shape = cost_shape(cfg, corpus.vocab_size)

    def realized_cost(shares: Sequence[float]) -> float:  # shares of all tokens predicted at each exit
        return routed_macs(exit_layer=exit_layer, num_layers=depth, shallow_ratio=sum(shares),
                           policy=cfg.phase2.upper_context, exit_layers=exits, exit_shares=list(shares),
                           **shape)["flop_cost"]

    baselines = {"ashem (routed, measured)": {**metrics["ashem"],
                                              "train_macs": metrics["train_compute"]["total"]["train_macs"]},
                 f"phase-1 model ({exit_layer} layers)": {**metrics["phase1_only"], "shallow_ratio": 1.0,
                                                          "compute_cost": exit_layer / depth},
                 "ashem, no routing": metrics["no_routing"]}
    for d, dense in metrics.get("dense", {}).items():
        baselines[f"dense {d}-layer model ({cfg.eval.baseline_budget} budget)"] = {
            **dense, "compute_cost": int(d) / depth, "flop_cost": dense["inference_cost"]}
    cascade = len(exits) > 1
    s = analyze(out, model=model2, loader=loader, device=device,
                threshold=metrics["thresholds"] if cascade else metrics["threshold"],
                measure=cfg.hard_examples.confidence, exit_layer=exits if cascade else exit_layer, baselines=baselines,
                upper_context=cfg.phase2.upper_context,
                tokenizer=corpus.tokenizer, train_tokens=corpus.train, vocab_size=corpus.vocab_size,
                html_tokens=cfg.eval.html_tokens, choose_loader=choose_loader, realized_cost=realized_cost,
                verdict=metrics.get("verdict", {}).get("line"))
    return {k: s[k] for k in HEADLINES if k in s}
