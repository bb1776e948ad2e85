"""`validate(cfg)`: what types cannot check (ranges, choices, cross-group constraints), one line per problem."""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any, Dict, List

from lego.config.data import validate_data_config
from lego.config.groups import ASHEMConfig, check_logger, check_model, check_optimizer, validate_generate
from lego.config.values import (BASELINE_BUDGETS, CALIBRATION_SPLITS, CONFIDENCE_MEASURES, LEARNED_TARGETS,
                                LOSS_TOKENS, LOWERS, OBJECTIVES, PHASE2_INITS, PRECISIONS, STAGES, STORE_DTYPES,
                                STORES, UPPER_CONTEXTS,
                                ConfigError, check_choice, check_non_negative, check_positive, check_ratio)




def block_layers(cfg: ASHEMConfig) -> List[int]:
    """The cumulative layer counts of the Blocks: `blocks`, or [phase1.layers, phase2.layers]."""
    return list(cfg.blocks) if cfg.blocks is not None else [cfg.phase1.layers, cfg.phase2.layers]


def exit_ratios(cfg: ASHEMConfig) -> List[float]:
    """Per exit (every Block but the last), the share of the tokens reaching it that continue past it."""
    n = len(block_layers(cfg)) - 1
    r = cfg.hard_example_ratios
    if r is None:
        return [cfg.hard_example_ratio] * n
    return list(r) * n if len(r) == 1 else list(r)


def resolve(cfg: ASHEMConfig) -> ASHEMConfig:
    """The config every stage reads: a copy of `cfg` with `blocks` and `hard_example_ratios` resolved into the
    values the two-Block code reads (phase1.layers and phase2.layers := the first and last Block,
    hard_example_ratio := the first exit's ratio), and generate.prompt_len / max_new_tokens, when not set, what
    fits model.max_seq_len. `cfg` itself is left as it is; resolving twice changes
    nothing. Raises ConfigError naming `blocks` or `hard_example_ratios` when they are malformed."""
    out = copy.deepcopy(cfg)
    if cfg.blocks is not None:
        b = list(cfg.blocks)
        if len(b) < 2:
            raise ConfigError(f"blocks={b} needs at least 2 entries (cumulative layer counts, e.g. [2, 4, 6])")
        for x in b:
            check_positive("blocks", x)
        if any(y <= x for x, y in zip(b, b[1:])):
            raise ConfigError(f"blocks={b} must be strictly increasing (cumulative layer counts, e.g. [2, 4, 6])")
        out.phase1.layers, out.phase2.layers = b[0], b[-1]
    if cfg.hard_example_ratios is not None:
        r, n = list(cfg.hard_example_ratios), len(block_layers(out)) - 1
        if len(r) not in (1, n):
            raise ConfigError(f"hard_example_ratios={r} needs 1 or {n} entries (one per exit of blocks="
                              f"{block_layers(out)})")
        for x in r:
            check_ratio("hard_example_ratios", x)
        out.hard_example_ratio = r[0]
    g, context = out.generate, cfg.model.max_seq_len  # derived defaults follow the keys the user set
    if g.prompt_len is None:
        g.prompt_len = max(1, min(32, context // 2))
    if g.max_new_tokens is None:
        g.max_new_tokens = max(1, min(32, context - (g.prompt_len if g.prompt is None else 1)))
    return out


def validate(cfg: ASHEMConfig) -> None:
    """Check ranges and cross-key constraints of the resolved config (`resolve`); raise
    ConfigError("<key>=...: ...") on the first problem. Changes nothing."""
    cfg = resolve(cfg)
    m, p1, p2, he, d = cfg.model, cfg.phase1, cfg.phase2, cfg.hard_examples, cfg.data
    check_model(m, "model.")
    check_choice("model.precision", m.precision, ("auto", *PRECISIONS))
    validate_data_config(d)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    for grp, name in ((p1, "phase1"), (p2, "phase2")):
        check_positive(f"{name}.layers", grp.layers)
        check_optimizer(grp, name)
    check_positive("phase2.batch_size", p2.batch_size)
    if p1.layers >= p2.layers:
        raise ConfigError(f"phase1.layers={p1.layers} must be smaller than phase2.layers={p2.layers}")
    check_choice("phase2.upper_context", p2.upper_context, UPPER_CONTEXTS)
    if p2.capacity_slack is not None:
        check_non_negative("phase2.capacity_slack", p2.capacity_slack)
        if p2.upper_context == "full":
            raise ConfigError(f"phase2.capacity_slack={p2.capacity_slack} needs routed upper layers: "
                              "phase2.upper_context=propagate or skip (full runs every token)")
    check_variants(cfg)
    check_choice("hard_examples.confidence", he.confidence, CONFIDENCE_MEASURES)
    check_choice("hard_examples.store", he.store, STORES)
    check_choice("hard_examples.store_dtype", he.store_dtype, STORE_DTYPES)
    if he.store != "memory" and he.store_dtype != "float32":
        raise ConfigError(f"hard_examples.store_dtype={he.store_dtype} applies to hard_examples.store=memory; "
                          f"store={he.store} keeps {'float16 rows' if he.store == 'disk' else 'no states'}: "
                          f"allowed there: float32 (the default)")
    check_choice("hard_examples.calibration_split", he.calibration_split, CALIBRATION_SPLITS)
    check_choice("eval.split", cfg.eval.split, ("test", "validation"))
    if cfg.eval.split == "validation" and not cfg.eval.allow_validation_split:
        raise ConfigError("eval.split=validation scores on the split the threshold was calibrated on and phase 2 "
                          "is validated on; add eval.allow_validation_split=true to do it anyway")
    check_choice("eval.baseline_budget", cfg.eval.baseline_budget, BASELINE_BUDGETS)
    check_choice("eval.learned_router_target", cfg.eval.learned_router_target, LEARNED_TARGETS)
    tol = cfg.eval.baseline_tolerance
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol <= 0.01:
        raise ConfigError(f"eval.baseline_tolerance={tol!r} must be a number in [0, 0.01] (a fraction of the dense "
                          f"budget's steps)")
    for depth in cfg.eval.dense_depths or ():
        if not isinstance(depth, int) or not 1 <= depth <= p2.layers:
            raise ConfigError(f"eval.dense_depths contains {depth!r}; allowed: integers in [1, phase2.layers={p2.layers}]")
    check_ratio("hard_example_ratio", cfg.hard_example_ratio)
    if p1.scaffold:
        for key, value, allowed in (("phase2.lower", p2.lower, "frozen"), ("phase2.init", p2.init, "random"),
                                    ("phase2.deep_head", p2.deep_head, True),
                                    ("model.exit_head", cfg.model.exit_head, "separate"),
                                    ("blocks", len(block_layers(cfg)), 2)):
            if value != allowed:
                raise ConfigError(f"phase1.scaffold=true trains two Blocks with separate heads, the upper one "
                                  f"from the scaffold; {key}={value} is not allowed with it: allowed {allowed}")
    if len(block_layers(cfg)) > 2:
        for key, value, default in (("phase2.lower", p2.lower, "frozen"),
                                    ("phase1.budget_fraction", p1.budget_fraction, None)):
            if value != default:
                raise ConfigError(f"{key}={value} is implemented for two Blocks only; blocks={block_layers(cfg)} "
                                  f"allows {key}={default}")
        # the recompute store runs the frozen Blocks densely; above the first exit routing runs them routed
        if he.store == "recompute" and p2.upper_context != "full":
            raise ConfigError(f"hard_examples.store=recompute with blocks={block_layers(cfg)} needs "
                              f"phase2.upper_context=full (got {p2.upper_context}); allowed stores: memory, disk")
    if not cfg.stages:
        raise ConfigError(f"stages is empty; choose from {', '.join(STAGES)}")
    for s in cfg.stages:
        check_choice("stages", s, STAGES)
    check_choice("objective", cfg.objective, OBJECTIVES)
    validate_generate(cfg.generate, m, runs="generate" in cfg.stages)
    if cfg.num_threads < 0:
        raise ConfigError(f"num_threads={cfg.num_threads} must be >= 0")
    check_logger(cfg.logger)
    check_positive("progress_interval_s", cfg.progress_interval_s, float)


def check_variants(cfg: ASHEMConfig) -> None:
    """The LEGO variants (phase2.init, loss_tokens, lower, phase1.budget_fraction) and how they combine."""
    p1, p2 = cfg.phase1, cfg.phase2
    check_choice("phase2.init", p2.init, PHASE2_INITS)
    check_choice("phase2.loss_tokens", p2.loss_tokens, LOSS_TOKENS)
    check_non_negative("phase2.easy_weight", p2.easy_weight)
    check_choice("phase2.lower", p2.lower, LOWERS)
    check_non_negative("phase2.exit_loss_weight", p2.exit_loss_weight)
    if p1.budget_fraction is not None:
        check_ratio("phase1.budget_fraction", p1.budget_fraction)
    # Under propagate/skip easy positions never run above the exit, so they have no deep logits to score.
    if p2.loss_tokens != "hard" and p2.upper_context != "full":
        raise ConfigError(f"phase2.loss_tokens={p2.loss_tokens} scores easy positions at the deep exit, which "
                          f"phase2.upper_context={p2.upper_context} never computes; allowed: upper_context=full")
    if p2.lower == "finetune" and p2.loss_tokens != "all":
        raise ConfigError(f"phase2.lower=finetune trains both exits on every training token; phase2.loss_tokens="
                          f"{p2.loss_tokens} is not allowed with it; allowed: all")


def to_dict(cfg: ASHEMConfig) -> Dict[str, Any]:
    """Plain nested dict of the dataclass fields (no properties), for JSON and checkpoints."""

    def conv(obj):
        if hasattr(obj, "__dataclass_fields__"):
            return {f.name: conv(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)
