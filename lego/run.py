"""One LEGO run: phase1 -> hard_examples -> phase2 (-> blocks) -> baselines -> eval -> generate, in a run directory.

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
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from lego import __version__, distributed
from lego.artifacts import LockBusy, RunDirTaken, file_lock, read_json, remove_partial_writes, write_json, write_text
from lego.checkpoint import precision_record
from lego.config import ASHEMConfig, block_layers, resolve, to_dict, validate
from lego.data import Corpus, load_corpus
from lego.pipeline.science import science_config
from lego.pipeline.setup import Loaders, RunContext, make_loaders, setup_torch
from lego.provenance import provenance
from lego.summary import format_table, summarize_run
from lego.stages import baselines, blocks, eval as evaluation, generate, hard_examples, phase1, phase2
from lego.trackers import Tracker, tracker_from_config

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
    """The stages `cfg.stages` asks for, in order; a stage left out reads what an earlier invocation wrote."""
    device = setup_torch(cfg)
    timings: Dict[str, float] = {}

    def timed(name: str, stage: Callable[..., Any], *args, **kwargs) -> Any:
        start = time.perf_counter()
        result = stage(*args, **kwargs)
        timings[name] = time.perf_counter() - start
        return result

    corpus, loaders = timed("data", load_data, cfg, run_dir, device)
    ctx = RunContext(cfg, corpus, loaders, run_dir, device, tracker)
    todo = set(cfg.stages)
    if not cfg.generate.enabled:
        todo.discard("generate")
    model1 = timed("phase1", phase1.run, ctx) if "phase1" in todo else phase1.load(ctx)
    threshold_info = model2 = metrics = generated = None
    if "hard_examples" in todo:
        threshold_info = timed("hard_examples", hard_examples.run, ctx, model1)
    elif todo & {"phase2", "eval", "generate"}:
        threshold_info = hard_examples.load(ctx)
    if "phase2" in todo:
        model2 = timed("phase2", phase2.run, ctx, model1, threshold_info["threshold"])
    elif todo & {"eval", "generate"}:
        model2 = phase2.load(ctx, threshold_info["threshold"])
    later_exits = []  # threshold.json of each exit above the first (more than two Blocks)
    if model2 is not None:
        threshold_info = phase2.routing_threshold_info(ctx, threshold_info)  # phase2.lower=finetune recalibrated it
        if len(block_layers(cfg)) > 2:
            model2, later_exits = timed("blocks", blocks.run, ctx, model2, threshold_info["threshold"],
                                        train="phase2" in todo)
    if "eval" in todo:
        dense = timed("baselines", baselines.run, ctx) if cfg.eval.standard_baseline else None
        metrics = timed("eval", evaluation.run, ctx, model1, model2, threshold_info, later_exits, dense)
    elif (run_dir / "eval" / "metrics.json").exists():  # e.g. stages=[generate]: keep the summary's numbers
        metrics = read_json(run_dir / "eval" / "metrics.json")
    if "generate" in todo:
        generated = timed("generate", generate.run, ctx, model2, threshold_info["threshold"])
    summary = summarize_run(cfg, run_dir, corpus, metrics, timings, generated)
    if distributed.is_main():
        write_json(run_dir / "metrics.json", summary)
    log.info("\n%s", format_table(summary))
    return summary


def load_data(cfg: ASHEMConfig, run_dir: Path, device) -> Tuple[Corpus, Loaders]:
    """The corpus (tokenized into the cache by rank 0 first; its tokenizer saved in the run dir) and its loaders."""
    with distributed.main_first():  # rank 0 tokenizes into the cache; the others then read it
        corpus = load_corpus(cfg.data)
    if distributed.is_main():
        corpus.tokenizer.save(run_dir / "tokenizer")
    log.info("corpus %s: %d / %d / %d tokens (train/validation/test), vocabulary %d", cfg.data.name,
             len(corpus.train), len(corpus.validation), len(corpus.test), corpus.vocab_size)
    return corpus, make_loaders(cfg, corpus, device=device)


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

    The first claim writes run.json: the science config, the precision that runs and why (`precision_record`),
    and the provenance of the process that started the run (command `argv`, git state, packages, torch build,
    hardware, threads, seeds)."""
    record = run_dir / "run.json"
    new = science_config(cfg)
    if record.exists():
        diff = _diff(read_json(record)["science_config"], new)
        if diff:
            raise RunDirTaken(f"run dir {run_dir} holds a run with another config ({'; '.join(diff[:5])}); "
                              "use a new hydra.run.dir or the same overrides")
    elif distributed.is_main():  # every rank checks (and refuses alike); rank 0 writes
        write_json(record, {"science_config": new, "lego_version": __version__, "torch": torch.__version__,
                            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "precision": precision_record(cfg),
                            "provenance": provenance(argv, {"seed": cfg.seed})})
