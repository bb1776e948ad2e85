"""The run's summary: the one-level metrics.json `lego.run` writes (`summarize_run`: the headline numbers of
eval/metrics.json, the by-label section and generate/metrics.json) and the table `lego-run` prints at the end
(`format_table`). Formatting only: every number comes from the stages.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

from lego import distributed
from lego.checkpoint import precision_record
from lego.config import ASHEMConfig
from lego.data import Corpus
from lego.label_report import headline as by_label_headline
from lego.pipeline.compute import pipeline_names
from lego.training import CONVERGENCE_RULE


def summarize_run(cfg: ASHEMConfig, run_dir: Path, corpus: Corpus, metrics: Optional[dict],
                  timings: Dict[str, float], generated: Optional[dict] = None) -> dict:
    """The one-level summary written to metrics.json (headline numbers of eval/ and generate/metrics.json)."""
    summary: Dict[str, Any] = {"run_dir": str(run_dir), "stages": list(cfg.stages),
                               "hard_example_ratio": cfg.hard_example_ratio, "seed": cfg.seed,
                               "data": cfg.data.name, "vocab_size": corpus.vocab_size, "wall_s": timings,
                               "precision": precision_record(cfg)["runs"], "precision_asked": cfg.model.precision}
    if distributed.is_distributed():
        summary["world_size"] = distributed.world_size()
    if metrics is not None:
        a = metrics["ashem"]
        summary.update({k: a[k] for k in ("acc", "ppl", "shallow_ratio", "compute_cost", "flop_cost", "wall_cost")})
        summary["threshold"] = metrics["threshold"]
        if "exit_layers" in metrics:  # a cascade: the share predicted at each exit (the last layer last)
            summary.update({f"exit{e['layer']}_share": e["share"] for e in a["exits"]})
        summary["phase1_ppl"] = metrics["phase1_only"]["ppl"]
        summary["no_routing_ppl"] = metrics["no_routing"]["ppl"]
        summary["val_ppl"] = metrics["ashem_validation"]["ppl"]
        summary["val_loss"] = metrics["ashem_validation"]["loss"]
        if "standard" in metrics:
            summary["standard_ppl"] = metrics["standard"]["ppl"]
        compute = metrics["train_compute"]
        summary.update({f"train_macs_{k}": v["train_macs"] for k, v in compute.items()})
        for key in ("tokens_per_s", "mfu", "peak_memory_bytes"):  # how fast each training stage ran (None: unknown)
            summary.update({f"{key}_{k}": v[key] for k, v in compute.items() if v.get(key) is not None})
        for depth, dense in metrics.get("dense", {}).items():
            summary[f"dense{depth}_ppl"] = dense["ppl"]
            summary[f"train_macs_dense{depth}"] = dense["train_macs"]
        if "verdict" in metrics:
            v = metrics["verdict"]
            summary["gap_at_inference_cost_pct"] = v["inference"]["gap_pct"]
            if "gap_pct" in v["training"]:
                summary["gap_at_training_compute_pct"] = v["training"]["gap_pct"]
            summary["gap_to_best_dense_pct"] = v["training"]["best_gap_pct"]
            summary["verdict"] = v["line"]
        trained = [*((s, compute[s]) for s in pipeline_names(cfg)),  # every training's record, mining's too
                   *((f"dense{d}", r) for d, r in metrics.get("dense", {}).items())]
        summary["convergence"] = {name: rec.get("converged") for name, rec in trained if name != "mining"}
        summary["stopped_early"] = [name for name, rec in trained if rec.get("stopped_early")]
        summary.update({f"converged_{name}": None if c is None else float(c)
                        for name, c in summary["convergence"].items()})  # flat: a sweep's share of seeds
        summary["train_val_macs"] = compute["total"]["val_macs"]
        summary["hard_ppl_phase1"] = metrics["hard_tokens"]["phase1"]["ppl"]
        summary["hard_ppl_ashem"] = metrics["hard_tokens"]["ashem"]["ppl"]
        summary["easy_ppl_ashem"] = easy_ppl(metrics["ashem"]["exits"])
        for k in ("ppl_compute_auc", "compute_saved_at_1pct_ppl", "oracle_shallow_ratio"):
            if k in metrics.get("analysis", {}):
                summary[k] = metrics["analysis"][k]
    if metrics is not None and "by_label" in metrics:  # data=chains (accuracy per hop count), the learned router
        summary.update(by_label_headline(metrics["by_label"]))
    if generated is not None:
        summary.update(generation_headline(generated))
    return summary


def easy_ppl(exits: list) -> float:
    """The routed model's perplexity on the tokens that stop before the last layer (the easy tokens), from
    the per-exit records of `evaluate` (each exit's token count and perplexity); nan when none stop early."""
    early = [e for e in exits[:-1] if e["n_tokens"]]
    n = sum(e["n_tokens"] for e in early)
    return math.exp(sum(e["n_tokens"] * math.log(e["ppl"]) for e in early) / n) if n else float("nan")


def format_table(summary: dict) -> str:
    """The table `lego-run` prints at the end."""
    rows = [("run dir", summary["run_dir"])]
    if "ppl" in summary:
        rows += [("test ppl (routed)", f"{summary['ppl']:.2f}"), ("test acc (routed)", f"{summary['acc']:.4f}"),
                 ("shallow_ratio", f"{summary['shallow_ratio']:.3f}"),
                 ("compute_cost (layers)", f"{summary['compute_cost']:.3f}"),
                 ("flop_cost / wall_cost", f"{summary['flop_cost']:.3f} / {summary['wall_cost']:.3f}"),
                 ("phase-1 model ppl", f"{summary['phase1_ppl']:.2f}"),
                 ("no-routing ppl", f"{summary['no_routing_ppl']:.2f}"),
                 ("validation ppl (routed; sweep objective)", f"{summary['val_ppl']:.2f}")]
        rows += [(f"dense {k[len('dense'):-len('_ppl')]}-layer ppl (same budget)", f"{v:.2f}")
                 for k, v in summary.items() if k.startswith("dense") and k.endswith("_ppl")]
        rows.append(("training MACs: ashem / dense", " / ".join(
            [f"{summary['train_macs_total']:.3g}"] + [f"{v:.3g}" for k, v in summary.items()
                                                       if k.startswith("train_macs_dense")])))
        if "train_val_macs" in summary:
            rows.append(("ashem's validation passes (MACs, outside the budget)", f"{summary['train_val_macs']:.3g}"))
        rows.append(("hard-token ppl phase1 -> ashem",
                     f"{summary['hard_ppl_phase1']:.2f} -> {summary['hard_ppl_ashem']:.2f}"))
        rows.append(("easy-token ppl (routed)", f"{summary['easy_ppl_ashem']:.2f}"))
        if "oracle_shallow_ratio" in summary:
            rows += [("oracle exit share", f"{summary['oracle_shallow_ratio']:.3f}"),
                     ("compute saved at <=1% ppl loss", f"{summary['compute_saved_at_1pct_ppl']:.3f}")]
    if "gen_speculative_speedup" in summary:
        rate = summary["gen_acceptance_rate"]  # None when no draft was proposed
        rows.append((f"generation: speculative speed-up (k={summary['gen_speculative_k']})",
                     f"{summary['gen_speculative_speedup']:.2f}x"
                     + (f", acceptance {rate:.3f}" if rate is not None else "")))
    if "gen_routed_wall_ratio" in summary:
        rows.append(("generation: routed time / dense",
                     f"{summary['gen_routed_wall_ratio']:.3f}, exit share {summary['gen_routed_exit_share']:.3f}"))
    for key, what, show in (("tokens_per_s", "training tokens/s", "{:,.0f}".format),
                            ("mfu", "MFU", "{:.1%}".format),
                            ("peak_memory_bytes", "peak device memory", lambda b: f"{b / 1e9:.2f} GB")):
        shown = [f"{k[len(key) + 1:]} {show(v)}" for k, v in summary.items() if k.startswith(key + "_")]
        if shown:  # MFU and memory only on a GPU (a known one for MFU)
            rows.append((what, ", ".join(shown)))
    if "precision" in summary:
        rows.append(("precision (model.precision)", f"{summary['precision']} ({summary['precision_asked']})"))
    rows.append(("wall time", ", ".join(f"{k} {v:.1f}s" for k, v in summary["wall_s"].items())))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if summary.get("convergence"):
        words = {True: "yes", False: "no", None: "too few validations to tell"}
        lines.append(f"{CONVERGENCE_RULE}: " + ", ".join(f"{name} {words[c]}"
                                                         for name, c in summary["convergence"].items()))
        if not all(summary["convergence"].values()):
            lines.append("not every model converged by that rule: the comparison is preliminary")
    if summary.get("stopped_early"):
        lines.append(f"stopped early by the patience guard (under its budget): {', '.join(summary['stopped_early'])}")
    if "verdict" in summary:
        lines.append(summary["verdict"])
    return "\n".join(lines)


def generation_headline(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The summary's numbers of generate/metrics.json: the best speculative speed-up over dense (and its k's
    acceptance rate), the routed decoder's time per token over dense, and its exit share."""
    out: Dict[str, float] = {}
    spec = {k: v for k, v in metrics.items() if k.startswith("speculative_k") and v.get("time_over_dense")}
    if spec:
        best = min(spec, key=lambda k: spec[k]["time_over_dense"])
        out["gen_speculative_speedup"] = 1.0 / spec[best]["time_over_dense"]
        out["gen_speculative_k"] = int(best[len("speculative_k"):])
        out["gen_acceptance_rate"] = spec[best]["acceptance_rate"]
    if metrics.get("routed", {}).get("time_over_dense"):
        out["gen_routed_wall_ratio"] = metrics["routed"]["time_over_dense"]
        out["gen_routed_exit_share"] = metrics["routed"]["exit_share"]
    learned = metrics.get("learned_router", {}).get("routed", {})
    if learned.get("time_over_dense"):
        out["gen_learned_routed_wall_ratio"] = learned["time_over_dense"]
        out["gen_learned_routed_exit_share"] = learned["exit_share"]
    return out
