"""The allowed values of every config key, `ConfigError`, and the one-line checks all of LEGO uses."""

from __future__ import annotations

from typing import NoReturn


class ConfigError(ValueError):
    """Bad input from the user (a config value, a file it names): `lego-run` prints its one line and exits 2."""


# -- allowed values --------------------------------------------------------------------------------
STAGES = ("phase1", "hard_examples", "phase2", "eval", "generate")
CALIBRATION_SPLITS = ("validation", "train")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
FFNS = ("gelu", "swiglu")
UPPER_CONTEXTS = ("full", "propagate", "skip")  # what layers above an exit do with easy tokens
PRECISIONS = ("fp32", "bf16")
EXIT_HEADS = ("separate", "tied", "lowrank")  # the vocabulary heads of the exits (lego.heads)
CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")
STORES = ("memory", "disk", "recompute")  # where hard-example states live
STORE_DTYPES = ("float32", "bfloat16", "float16")  # what the memory store keeps them in
SCHEDULES = ("constant", "cosine")  # learning-rate schedules (lego.schedule)
BASELINE_BUDGETS = ("matched", "steps", "phase1")  # training budget of the dense baselines
PHASE2_INITS = ("random", "copy")  # how the new upper layers start (lego.model.grow)
LOSS_TOKENS = ("hard", "all", "weighted")  # which positions phase 2's deep-exit loss counts
LEARNED_TARGETS = ("wins", "gain")  # eval.learned_router_target: what the router's probe predicts
LOWERS = ("frozen", "finetune")  # whether Block 1 keeps training in phase 2
DATA_NAMES = ("shakespeare", "kjv", "wikitext2", "wikitext103", "hf", "text_files", "chains", "shards")
TOKENIZERS = ("bpe", "bytes", "pretrained")
SPLITS = ("train", "validation", "test")
SHARD_FORMATS = ("auto", "llmc", "raw")  # data=shards: llm.c's 256-int32 header, or nanoGPT's headerless .bin
SHARD_DTYPES = ("uint16", "uint32")  # token width of a headerless (raw) shard
DEFAULT_CACHE_DIR = "~/.cache/lego"
# Hub datasets behind the named presets; data.path / data.config_name override them.
HF_PRESETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1"),
}
IGNORE_INDEX = -100  # target value that no loss or metric counts
# File extension -> `datasets` builder for data=text_files.
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
OBJECTIVES = ("val_ppl", "val_loss")  # summary keys a sweep may optimize; never a test metric
DECODERS = ("dense", "routed", "speculative")  # lego.generate: every layer; the exit policy; Block 1 drafts
TRACKER_KINDS = ("csv", "tensorboard", "wandb", "mlflow", "none")  # experiment trackers (lego.trackers)
WANDB_MODES = ("offline", "online", "disabled")


def check_choice(key: str, value, allowed) -> None:
    """Raise a one-line ConfigError naming `key` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def check_ratio(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ConfigError(f"{key}={value!r} must be strictly between 0 and 1")


def check_positive(key: str, value, kind=int) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive {'integer' if kind is int else 'number'}")


def check_schedule(prefix: str, schedule: str, warmup_steps: int, min_lr_ratio: float) -> None:
    """Raise ConfigError naming the key (`<prefix>.schedule`, ...) when a setting is not allowed."""
    prefix = f"{prefix}." if prefix else ""
    check_choice(f"{prefix}schedule", schedule, SCHEDULES)
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"{prefix}warmup_steps={warmup_steps!r} must be a non-negative integer")
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"{prefix}min_lr_ratio={min_lr_ratio!r} must be a number in [0, 1]")


def check_non_negative(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{key}={value!r} must be a number >= 0")


def _fail(key: str, problem: str, allowed: str) -> NoReturn:
    """Raise ConfigError('data.<key>: <problem>; allowed: <allowed>') (the data group's and the corpora's checks)."""
    raise ConfigError(f"data.{key}: {problem}; allowed: {allowed}")
