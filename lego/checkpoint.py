"""Models on disk: build a model from the config, save it with its `ModelArgs`, load it back (older files too).

    model = build_model(cfg, vocab_size, num_layers)       # vocabulary padded to model.vocab_multiple
    save_model(run_dir / "phase1" / "model.pt", model, cfg, stage="phase1")
    model = load_model(path, expected_args(cfg, vocab_size, num_layers), device, "phase1 checkpoint")
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from lego.ashem import freeze_exits
from lego.artifacts import StageError, load_checkpoint, save_checkpoint
from lego.config import ASHEMConfig, ConfigError, block_layers, to_dict
from lego.model import Model, ModelArgs, precision_choice

# what checkpoints written before `ModelArgs` also stored: routing, not weights (`lego.config.Routing`)
_OLD_ROUTING_KEYS = ("routing_threshold", "routing_thresholds", "upper_context", "confidence")


def resolve_device(name: str) -> torch.device:
    """`device=` as a torch.device; "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available on this machine; use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available on this machine")
    return device


def run_precision(cfg: ASHEMConfig) -> str:
    """model.precision with "auto" resolved for the run's device."""
    return precision_record(cfg)["runs"]


def precision_record(cfg: ASHEMConfig) -> Dict[str, str]:
    """What model.precision resolves to on the run's device and why: {"asked", "runs", "why"} (run.json's
    `precision`, the final table's row; `lego.model.precision_choice`)."""
    return precision_choice(cfg.model.precision, resolve_device(cfg.device))


def model_args(model: Model) -> Dict[str, Any]:
    """The `ModelArgs` that rebuild `model` exactly, as a dict (stored in every checkpoint)."""
    return {**asdict(model.args), "exits": list(model.args.exits)}


def expected_args(cfg: ASHEMConfig, vocab_size: int, num_layers: int,
                  thresholds: Sequence[float] = ()) -> Dict[str, Any]:
    """What `model_args` gives for the run's `num_layers`-layer model with an exit at each of the first
    len(`thresholds`) Block boundaries of `blocks` (one per calibrated threshold), for a tokenizer of `vocab_size`
    ids: a dense model (phase 1, a baseline: no thresholds) as `build_model` makes it, or one grown Block by Block
    as phase 2 and each later Block grow it (`lego.ashem.grow` with phase2's deep_head). Computed from the config
    alone."""
    exits = block_layers(cfg)[:len(thresholds)]
    args = ModelArgs.from_config(replace(cfg.model, precision=run_precision(cfg)), model_vocab_size(cfg, vocab_size),
                                 num_layers, exits=tuple(exits), deep_head=bool(exits) and cfg.phase2.deep_head)
    return {**asdict(args), "exits": list(exits)}


def model_vocab_size(cfg: ASHEMConfig, vocab_size: int) -> int:
    """The model's vocabulary for a tokenizer of `vocab_size` ids: rounded up to a multiple of
    `model.vocab_multiple` (1: unchanged). Idempotent, so a model's own size may be passed again."""
    m = cfg.model.vocab_multiple
    return -(-vocab_size // m) * m


def build_model(cfg: ASHEMConfig, vocab_size: int, num_layers: int) -> Model:
    """A freshly initialised `num_layers`-layer model of the config's shape (seed first for a given init) for a
    tokenizer of `vocab_size` ids; its vocabulary is `model_vocab_size(cfg, vocab_size)`."""
    shape = replace(cfg.model, precision=run_precision(cfg))
    return Model(ModelArgs.from_config(shape, model_vocab_size(cfg, vocab_size), num_layers))


def save_model(path: Path, model: Model, cfg: ASHEMConfig, **meta) -> None:
    """The model's arguments and weights, the run's config and `meta` (a grown model's: its threshold)."""
    save_checkpoint(path, {"model_args": model_args(model), "state_dict": model.state_dict(),
                           "config": to_dict(cfg), "meta": meta})


def stored_args(stored: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's `model_args` as `ModelArgs` fields. Checkpoints written before `ModelArgs` held the
    constructor's keywords (exit_layer / exit_layers and routing); those without precision or exit_head ran in
    fp32 with separate full heads."""
    args = {"precision": "fp32", "exit_head": "separate", "exit_rank": None, **stored}
    if "exits" not in args:
        exits = args.pop("exit_layers", None) or ([] if args.get("exit_layer") is None else [args["exit_layer"]])
        args["exits"] = list(exits)
    for key in ("exit_layer", "exit_layers", *_OLD_ROUTING_KEYS):
        args.pop(key, None)
    args["exits"] = list(args["exits"])
    return args


def load_model(path: Path, expect_args: Dict[str, Any], device, what: str) -> Model:
    """Rebuild the model stored at `path`; refuse one whose shape differs from what the config asks."""
    state = load_checkpoint(path, what=what)
    args = stored_args(state["model_args"])
    diff = [f"{k}: {args.get(k)!r} (checkpoint) vs {v!r} (config)" for k, v in expect_args.items() if args.get(k) != v]
    if diff:
        raise StageError(f"{what} {path} has another model shape: {'; '.join(diff[:4])}")
    model = Model(ModelArgs(**args))
    model.load_state_dict(state["state_dict"])
    freeze_exits(model)  # a grown model: the Blocks below its last exit and their heads stay frozen
    return model.to(device)
