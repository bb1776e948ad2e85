"""The config that decides results (`science_config`): what a run directory is claimed with and what the
stage cache keys hash (`fingerprint`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict

from lego.checkpoint import run_precision
from lego.config import ASHEMConfig, block_layers, exit_ratios, to_dict

# Keys that change what a run computes. Others (stages, device, threads, trackers, display) may differ on
# resume; generate only reads the finished models, so its keys never enter the run-dir claim or a cache key.
_NON_SCIENCE = {"stages", "device", "num_threads", "objective", "generate", "logger", "progress", "progress_interval_s"}


def fingerprint(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def science_config(cfg: ASHEMConfig) -> Dict[str, Any]:
    """The config minus what cannot change results (device, threads, stages, cache dir, compile).

    A key at its specification default, or one its mode ignores, is left out, so run directories and cache
    keys written before the key existed stay valid."""
    d = to_dict(cfg)
    for k in _NON_SCIENCE:
        d.pop(k, None)
    d["data"].pop("cache_dir", None)
    if d["data"]["name"] != "shards":  # only data=shards reads them
        d["data"].pop("shards")
    if d["data"]["name"] != "chains":  # only data=chains reads them
        d["data"].pop("chains")
    elif d["data"]["chains"]["assign"] == "=":  # the key's default
        d["data"]["chains"].pop("assign")
    # Two Blocks are phase1.layers, phase2.layers and hard_example_ratio (validate set them from the lists):
    # blocks=[2, 4] is the default run. More Blocks are recorded resolved, one ratio per exit.
    if len(block_layers(cfg)) > 2:
        d["blocks"], d["hard_example_ratios"] = block_layers(cfg), exit_ratios(cfg)
    else:
        d.pop("blocks"), d.pop("hard_example_ratios")
    d["model"].pop("compile", None)
    if d["model"].get("vocab_multiple") == 1:  # no padding
        d["model"].pop("vocab_multiple")
    if d["model"].get("exit_head") == "separate" and d["model"].get("exit_rank") is None:  # the specification's
        d["model"].pop("exit_head"), d["model"].pop("exit_rank")  # heads
    for phase in ("phase1", "phase2"):  # a constant schedule ignores warmup and floor
        d[phase].pop("checkpoint_every_steps"), d[phase].pop("checkpoint_every_minutes")  # when, not what
        if d[phase]["schedule"] == "constant":
            for key in ("schedule", "warmup_steps", "min_lr_ratio"):
                d[phase].pop(key)
    for phase, key, default in (("phase1", "budget_fraction", None), ("phase1", "grad_accum", 1),
                                ("phase1", "scaffold", False),
                                ("phase2", "grad_accum", 1), ("phase2", "init", "random"),
                                ("phase2", "loss_tokens", "hard"), ("phase2", "lower", "frozen"),
                                ("phase2", "capacity_slack", None)):
        if d[phase][key] == default:
            d[phase].pop(key)
    if d["hard_examples"]["store_dtype"] == "float32":
        d["hard_examples"].pop("store_dtype")
    if not d["eval"]["learned_router"] or d["eval"]["learned_router_target"] == "wins":  # unused, or the default
        d["eval"].pop("learned_router_target")
    if not d["eval"]["learned_router"]:
        d["eval"].pop("learned_router")
    if d["eval"]["baseline_tolerance"] == 0:  # the default: exactly the budget's steps
        d["eval"].pop("baseline_tolerance")
    if d["phase2"].get("loss_tokens") != "weighted":
        d["phase2"].pop("easy_weight")
    if d["phase2"].get("lower") != "finetune":
        d["phase2"].pop("exit_loss_weight")
    # The precision that runs, not "auto" (that depends on the GPU); fp32, the default, is left out.
    precision = run_precision(cfg)
    if precision == "fp32":
        d["model"].pop("precision", None)
    else:
        d["model"]["precision"] = precision
    return d
