"""One LEGO run: phase1 -> hard_examples -> phase2 -> eval -> generate, in a run directory.

`run(config, run_dir)` is what `lego-run` calls after Hydra has composed the config; tests call
it directly. Splits are used as SPEC section 4 says: phase 1 trains on train and keeps its best checkpoint on
validation; the threshold is calibrated on validation; phase 2 trains on the training split's
hard examples, validated on the validation split's; every reported number is on test. Every model trains to
a budget fixed in advance (SPEC section 6).

A stage whose result file exists is skipped, and an interrupted phase resumes from its last
epoch checkpoint, so rerunning the same command in the same run directory finishes the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from lego import __version__, distributed
from lego.artifacts import LockBusy, RunDirTaken, file_lock, read_json, remove_partial_writes, write_json, write_text
from lego.config import ASHEMConfig, block_layers, resolve, to_dict, validate
from lego.data import Corpus, load_corpus
from lego.label_report import headline as by_label_headline
from lego.provenance import provenance
from lego.stages.compare import pipeline_names
from lego.stages.eval import stage_eval
from lego.stages.generate import headline, stage_generate
from lego.stages.hard_examples import load_threshold, stage_hard_examples
from lego.stages.phase1 import load_phase1, stage_phase1
from lego.stages.phase2 import load_phase2, routing_threshold_info, stage_later_blocks, stage_phase2
from lego.stages.setup import make_loaders, science_config, setup_torch
from lego.trackers import Tracker, tracker_from_config
from lego.training import CONVERGENCE_RULE

log = logging.getLogger(__name__)

TRACKED_FILES = ("tradeoff.csv", "tradeoff.png", "tokens.html")  # eval/ files a tracker receives at the end


def run(config: ASHEMConfig, run_dir, *, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the configured stages in `run_dir`; return the summary also written to metrics.json.

    The config is resolved once (`lego.config.resolve`: `blocks` into the layers every stage reads) and
    written as config_resolved.yaml. `argv` is the command line as typed, recorded in run.json's provenance
    (default: sys.argv). Under torchrun (WORLD_SIZE > 1) every rank calls this with the same `run_dir`: the
    ranks train together and rank 0 alone writes.
    """
    config = resolve(config)
    validate(config)
    distributed.setup()
    run_dir = Path(run_dir)
    busy = f"run dir {run_dir} is in use by another lego-run process; wait for it or pick another hydra.run.dir"
    if not distributed.is_main():  # rank 0 holds the lock and claims the directory for all ranks
        if not distributed.broadcast(None):  # ...and says whether it got it: every rank stops alike
            raise LockBusy(busy)
        return _run_locked(config, run_dir, argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(run_dir / ".lock", blocking=False, busy_message=busy))
        except LockBusy:
            distributed.broadcast(False)
            raise
        distributed.broadcast(True)
        remove_partial_writes(run_dir)  # litter of a killed run; nobody else writes here while we hold the lock
        return _run_locked(config, run_dir, argv)


def _run_locked(cfg: ASHEMConfig, run_dir: Path, argv: Optional[List[str]]) -> Dict[str, Any]:
    claim_run_dir(run_dir, cfg, argv)
    if distributed.is_main():
        write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tracker = tracker_from_config(cfg.logger, run_dir, run_name=run_dir.name, enabled=distributed.is_main())
    try:
        tracker.log_hparams(to_dict(cfg))
        summary = _run_stages(cfg, run_dir, tracker)
        tracker.log_summary(summary)
        for name in TRACKED_FILES:
            if (run_dir / "eval" / name).is_file():
                tracker.log_artifact(run_dir / "eval" / name)
    finally:
        tracker.close()
    distributed.barrier()  # no rank returns before rank 0 has written everything
    return summary


def _run_stages(cfg: ASHEMConfig, run_dir: Path, tracker: Tracker) -> Dict[str, Any]:
    device = setup_torch(cfg)
    timings: Dict[str, float] = {}

    def timed(name: str, stage: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = stage()
        timings[name] = time.perf_counter() - start
        return result

    def data():
        with distributed.main_first():  # rank 0 tokenizes into the cache; the others then read it
            corpus = load_corpus(cfg.data)
        if distributed.is_main():
            corpus.tokenizer.save(run_dir / "tokenizer")
        return corpus, make_loaders(cfg, corpus, device=device)

    corpus, loaders = timed("data", data)
    log.info("corpus %s: %d / %d / %d tokens (train/validation/test), vocabulary %d", cfg.data.name,
             len(corpus.train), len(corpus.validation), len(corpus.test), corpus.vocab_size)
    stages = set(cfg.stages)
    if not cfg.generate.enabled:
        stages.discard("generate")
    model1 = (timed("phase1", lambda: stage_phase1(cfg, corpus, loaders, run_dir, device, tracker)) if "phase1" in stages
              else load_phase1(cfg, corpus, run_dir, device))
    threshold_info = model2 = metrics = generated = None
    if "hard_examples" in stages:
        threshold_info = timed("hard_examples", lambda: stage_hard_examples(cfg, model1, loaders, run_dir, device))
    elif stages & {"phase2", "eval", "generate"}:
        threshold_info = load_threshold(cfg, run_dir)
    if "phase2" in stages:
        model2 = timed("phase2", lambda: stage_phase2(cfg, model1, threshold_info["threshold"], loaders, run_dir,
                                                      device, tracker, corpus_key=corpus.cache_key))
    elif stages & {"eval", "generate"}:
        model2 = load_phase2(cfg, model1, threshold_info["threshold"], run_dir, device)
    if model2 is not None:  # phase2.lower=finetune recalibrated the threshold after phase 2
        threshold_info = routing_threshold_info(cfg, run_dir, threshold_info)
    later_exits = []  # threshold.json of each exit above the first (more than two Blocks)
    if model2 is not None and len(block_layers(cfg)) > 2:
        model2, later_exits = timed("blocks", lambda: stage_later_blocks(cfg, model2, loaders, run_dir, device,
                                                                         tracker, train="phase2" in stages,
                                                                         corpus_key=corpus.cache_key))
    if "eval" in stages:
        metrics = timed("eval", lambda: stage_eval(cfg, corpus, model1, model2, threshold_info, loaders, run_dir,
                                                   device, tracker, later_exits=later_exits))
    elif (run_dir / "eval" / "metrics.json").exists():  # e.g. stages=[generate]: keep the summary's numbers
        metrics = read_json(run_dir / "eval" / "metrics.json")
    if "generate" in stages:
        generated = timed("generate", lambda: stage_generate(cfg, corpus, model2, run_dir, device))
    summary = summarize_run(cfg, run_dir, corpus, metrics, timings, generated)
    if distributed.is_main():
        write_json(run_dir / "metrics.json", summary)
    log.info("\n%s", format_table(summary))
    return summary


def _diff(a: Dict, b: Dict, prefix: str = "") -> list:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def claim_run_dir(run_dir: Path, cfg: ASHEMConfig, argv: Optional[List[str]] = None) -> None:
    """Record the config in `run_dir`, or refuse if the directory holds a run of another config.

    The first claim writes run.json: the science config, and the provenance of the process that
    started the run (command `argv`, git state, packages, torch build, hardware, threads, seeds)."""
    record = run_dir / "run.json"
    new = science_config(cfg)
    if record.exists():
        diff = _diff(read_json(record)["science_config"], new)
        if diff:
            raise RunDirTaken(f"run dir {run_dir} holds a run with another config ({'; '.join(diff[:5])}); "
                              "use a new hydra.run.dir or the same overrides")
    elif distributed.is_main():  # every rank checks (and refuses alike); rank 0 writes
        write_json(record, {"science_config": new, "lego_version": __version__, "torch": torch.__version__,
                            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "provenance": provenance(argv, {"seed": cfg.seed})})


def summarize_run(cfg: ASHEMConfig, run_dir: Path, corpus: Corpus, metrics: Optional[dict],
                  timings: Dict[str, float], generated: Optional[dict] = None) -> dict:
    """The one-level summary written to metrics.json (headline numbers of eval/ and generate/metrics.json)."""
    summary: Dict[str, Any] = {"run_dir": str(run_dir), "stages": list(cfg.stages),
                               "hard_example_ratio": cfg.hard_example_ratio, "seed": cfg.seed,
                               "data": cfg.data.name, "vocab_size": corpus.vocab_size, "wall_s": timings}
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
        summary["convergence"] = {name: rec.get("converged") for name, rec in
                                  [*((s, compute[s]) for s in pipeline_names(cfg) if s != "mining"),
                                   *((f"dense{d}", r) for d, r in metrics.get("dense", {}).items())]}
        summary["stopped_early"] = [name for name, rec in [*((s, compute[s]) for s in pipeline_names(cfg)),
                                                           *((f"dense{d}", r) for d, r in metrics.get("dense", {}).items())]
                                    if rec.get("stopped_early")]
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
        summary.update(headline(generated))
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
