"""Part of stage `eval`: metrics by token label and routing against the truth (data=chains), and the learned
router (eval.learned_router) on any corpus. Rank 0 alone, on the whole split; writes eval/by_label.png and a
report.md section, and returns {'by_label': summary} for eval/metrics.json ({} when there is nothing to do)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

import torch

from lego import distributed
from lego.batches import make_loader
from lego.chains import label_counts
from lego.checkpoint import expected_args, load_model
from lego.config import ASHEMConfig, Routing, StageConfig, TrainingConfig, block_layers
from lego.cost import routed_macs
from lego.data import Corpus
from lego.label_report import plot, section, write_section
from lego.labels import (SOLVED_TOLERANCE, fit_gain_probe, fit_probe, label_table, labelled_tokens,
                         learned_threshold, oracle_by_label, router_summary, solved_hops)
from lego.model import Model
from lego.report import read_csv
from lego.training import Trainer
from lego.pipeline.compute import cost_shape

log = logging.getLogger(__name__)


def live_routing(cfg: ASHEMConfig, model2: Model, probe, threshold: float, loader,
                 device: torch.device) -> Dict[str, Any]:
    """The learned router in routed evaluation (`Trainer.evaluate`, the run's upper_context policy): ppl, acc,
    shallow_ratio, compute_cost of a copy of `model2` that routes by `probe` at `threshold`. Under torch.distributed
    this rank-0 pass is skipped (evaluation all-reduces over ranks): {"skipped": why}."""
    if distributed.is_distributed():
        return {"skipped": "torch.distributed: routed evaluation of the learned router runs single-process"}
    routed = TrainingConfig(stages=[StageConfig((cfg.phase2.layers, cfg.phase2.layers))], routing_threshold=threshold,
                            exit_layer=cfg.phase1.layers, upper_context=cfg.phase2.upper_context,
                            router_probe=probe)  # stage eval's routed evaluation, with this router
    m = Trainer(routed, device=device, progress=False).evaluate(model2, loader)
    return {k: m[k] for k in ("ppl", "acc", "shallow_ratio", "compute_cost") if k in m} | {
        "upper_context": cfg.phase2.upper_context}


def stage_by_label(cfg: ASHEMConfig, corpus: Corpus, model1: Model,
                   model2: Model, metrics: Dict[str, Any], run_dir: Path,
                   device: torch.device) -> Dict[str, Any]:
    """Per-label accuracy and ppl of every model (phase 1, no routing, each dense depth, the routers), each
    router's exit share per label and its routing against the truth, the oracle router by label, and with
    eval.learned_router the learned router; see `lego.labels`."""
    labelled = corpus.labels is not None
    if not (labelled or cfg.eval.learned_router) or not distributed.is_main():
        return {}
    out = run_dir / "eval"
    exit_layer, depth = cfg.phase1.layers, cfg.phase2.layers
    cascade = len(block_layers(cfg)) > 2
    learned = cfg.eval.learned_router and not cascade
    split, measure = cfg.eval.split, cfg.hard_examples.confidence

    def loader(name: str, with_labels: bool = True):
        return make_loader(getattr(corpus, name), cfg.data.seq_len, cfg.data.eval_batch_size, shuffle=False,
                           seed=cfg.seed, labels=corpus.labels[name] if labelled and with_labels else None)

    def tokens(model, name: str, **kw):
        return labelled_tokens(model, loader(name), device, progress=cfg.progress, **kw)

    routed_kw = dict(exit_layer=exit_layer, measure=measure, hidden=learned)
    routing = Routing((metrics["threshold"],), cfg.phase2.upper_context, measure)
    tok = tokens(model2, split, **routed_kw, **({} if cascade else {"routing": routing}))
    val = tokens(model2, "validation", **routed_kw) if (labelled or learned) and not cascade else None
    s: Dict[str, Any] = {"split": split, "n_tokens": int(tok["nll_deep"].numel()), "exit_layer": exit_layer,
                         "num_layers": depth, "measure": measure, "upper_context": cfg.phase2.upper_context,
                         "models": {}, "routers": {}, "points": {}}
    if labelled:
        s["label_counts"] = label_counts(tok["label"].numpy())
        p1 = tokens(model1, split)
        s["models"][f"phase-1 model ({exit_layer} layers)"] = label_table(p1["label"], p1["nll_deep"], p1["ok_deep"])
        s["models"]["ashem, no routing"] = label_table(tok["label"], tok["nll_deep"], tok["ok_deep"])
        for d in metrics.get("dense", {}):
            dense = load_model(run_dir / f"dense{d}" / "model.pt", expected_args(cfg, corpus.vocab_size, int(d)), device,
                               f"dense{d} checkpoint")
            t = tokens(dense, split)
            s["models"][f"dense {d}-layer model"] = label_table(t["label"], t["nll_deep"], t["ok_deep"])
    if cascade:
        log.info("by label: the routers are computed for two Blocks only; blocks=%s reports the models alone",
                 block_layers(cfg))
    else:
        kw = dict(exit_layer=exit_layer, num_layers=depth)
        s["routers"]["calibrated"] = {**router_summary(tok, tok["stop"], **kw, live=True),
                                      "threshold": metrics["threshold"], "pass": "routed"}
        if labelled:
            k = solved_hops(label_table(val["label"], val["nll_exit"], val["ok_exit"]),
                            label_table(val["label"], val["nll_deep"], val["ok_deep"]))
            s["routers"]["oracle by label"] = {**router_summary(tok, oracle_by_label(tok["label"], k), **kw),
                                               "pass": "one unrouted pass",
                                               "solved_hops": k, "tolerance": SOLVED_TOLERANCE,
                                               "chosen_on": "validation"}
        if learned:
            gain = cfg.eval.learned_router_target == "gain"
            probe = (fit_gain_probe(val["hidden"], val["nll_exit"] - val["nll_deep"]) if gain
                     else fit_probe(val["hidden"], val["nll_deep"] < val["nll_exit"]))
            val_conf = probe(val["hidden"])
            thr = learned_threshold(val_conf, cfg.hard_example_ratio)
            s["routers"]["learned"] = {**router_summary(tokens(model2, split, exit_layer=exit_layer,
                                                               routing=routing.learned(probe, thr)),
                                                        None, **kw, live=True), "pass": "routed",
                                       "threshold": thr, "hard_ratio": cfg.hard_example_ratio, "fit_on": "validation",
                                       "validation_shallow_ratio": float((val_conf >= thr).double().mean()),
                                       # tokens whose score equals the threshold: the exact quantile holds up to them
                                       "validation_tie_share": float((val_conf == thr).double().mean()),
                                       "validation_tokens": int(val_conf.numel()),
                                       "target": "nll_exit - nll_deep (ridge)" if gain else "nll_deep < nll_exit"}
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"probe": probe.state_dict(), "threshold": thr, "exit_layer": exit_layer},
                       out / "learned_router.pt")  # stage generate decodes with it too
            s["routers"]["learned"]["live"] = live_routing(cfg, model2, probe, thr, loader(split, False), device)
        shape = cost_shape(cfg, corpus.vocab_size)
        for r in [*s["routers"].values(), *(r["live"] for r in s["routers"].values() if "ppl" in r.get("live", {}))]:
            r["flop_cost"] = routed_macs(exit_layer=exit_layer, num_layers=depth, shallow_ratio=r["shallow_ratio"],
                                         policy=cfg.phase2.upper_context, **shape)["flop_cost"]
    s["points"] = {f"phase-1 model ({exit_layer} layers)": {"ppl": metrics["phase1_only"]["ppl"],
                                                            "compute_cost": exit_layer / depth},
                   **{f"dense {d}-layer model": {"ppl": m["ppl"], "compute_cost": int(d) / depth}
                      for d, m in metrics.get("dense", {}).items()}}
    curve = read_csv(out / "tradeoff.csv") if cfg.eval.analysis and (out / "tradeoff.csv").is_file() else None
    plotted = plot(s, out / "by_label.png", curve) if labelled else False
    write_section(out / "report.md", section(s, plotted))
    return {"by_label": s}
