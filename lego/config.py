"""The typed schema of a LEGO run: `ASHEMConfig` and its groups.

The dataclasses are registered in Hydra's ConfigStore as the schema of `conf/config.yaml`, so a
mistyped key or a wrong type fails at compose time; the YAML files under `conf/` only hold
values. `validate(cfg)` checks what types cannot (ranges, choices, cross-group constraints) and
fails with one line naming the key.

The original specification's flat names (`phase1_layers`, `phase1_lr`, `phase1_patience`,
`hard_example_ratio`, `phase2_layers`, `phase2_lr`, `phase2_patience`) are properties of
`ASHEMConfig`, and `lego-run` accepts them on the command line as aliases of the group keys
(`phase2_lr=3e-4` means `phase2.lr=3e-4`). `hard_example_ratio` is itself a top-level key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from lego.ashem import CONFIDENCE_MEASURES, STORES, check_ratio
from lego.data import DataConfig, validate_data_config
from lego.model import FFNS, NORMS, POSITIONS, PRECISIONS, UPPER_CONTEXTS, check_choice

STAGES = ("phase1", "hard_examples", "phase2", "eval")
CALIBRATION_SPLITS = ("validation", "train")
OBJECTIVES = ("val_ppl", "val_loss")  # summary keys a sweep may optimize; never a test metric


@dataclass
class ModelConfig:
    """Shape of the network (shared by phase 1, phase 2 and the baselines)."""

    name: str = "tiny"  # preset name, for the record
    dim: int = 128  # residual width
    num_heads: int = 4  # attention heads; must divide dim
    max_seq_len: int = 256  # longest sequence the position tables cover (>= data.seq_len)
    dropout: float = 0.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    ffn: str = "gelu"  # gelu | swiglu
    ffn_mult: int = 4  # FFN hidden width = ffn_mult * dim
    compile: bool = False  # torch.compile each layer, the embedding and the heads (model.compile_blocks)
    # auto | fp32 | bf16: autocast for every forward (training, calibration, mining, eval, analysis
    # alike); auto = bf16 on a CUDA GPU that has it, else fp32. Weights, losses, confidences stay float32.
    precision: str = "auto"


@dataclass
class Phase1Config:
    """Block 1: a `layers`-layer LM trained on every token, early-stopped on validation loss."""

    layers: int = 2
    lr: float = 1e-3
    patience: int = 1
    max_epochs: int = 6
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    epoch_steps: Optional[int] = 50  # batches per epoch, between validations (seeded subset); None = whole split
    cache: bool = True  # share the trained phase 1 across runs/sweep jobs with identical settings


@dataclass
class HardExamplesConfig:
    """Threshold calibration and hard-token mining with the phase-1 model."""

    confidence: str = "max_prob"  # max_prob | margin | entropy
    calibration_split: str = "validation"  # split the threshold is calibrated on
    store: str = "memory"  # memory | disk | recompute: where hard-example states live


@dataclass
class Phase2Config:
    """Block 2: layers phase1.layers+1..layers trained on hard tokens of the training split."""

    layers: int = 4  # total depth after growing
    lr: float = 1e-4
    patience: int = 3
    max_epochs: int = 4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 32  # hard sequences per batch
    epoch_steps: Optional[int] = 50  # batches per epoch, between validations; None = every hard sequence
    deep_head: bool = True  # the deep exit trains its own copy of the head (the exit's stays frozen)
    upper_context: str = "full"  # full | propagate | skip: what upper layers see of easy tokens


@dataclass
class EvalConfig:
    """Final metrics on the test split, with baselines and the trade-off analysis."""

    split: str = "test"
    standard_baseline: bool = True  # train a phase2.layers-layer model on all tokens for comparison
    analysis: bool = True  # trade-off curve, oracle, confidence measures, pictures
    html_tokens: int = 400  # tokens shown in eval/tokens.html


@dataclass
class ASHEMConfig:
    """Everything one `lego-run` does; composed by Hydra from conf/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    hard_examples: HardExamplesConfig = field(default_factory=HardExamplesConfig)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hard_example_ratio: float = 0.5  # share of calibration tokens that are hard (continue past Block 1)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    objective: str = "val_ppl"  # what lego-run returns to a sweeper: the routed model's val_ppl | val_loss

    # The specification's flat names, read and written through the groups.
    phase1_layers = property(lambda s: s.phase1.layers, lambda s, v: setattr(s.phase1, "layers", v))
    phase1_lr = property(lambda s: s.phase1.lr, lambda s, v: setattr(s.phase1, "lr", v))
    phase1_patience = property(lambda s: s.phase1.patience, lambda s, v: setattr(s.phase1, "patience", v))
    phase2_layers = property(lambda s: s.phase2.layers, lambda s, v: setattr(s.phase2, "layers", v))
    phase2_lr = property(lambda s: s.phase2.lr, lambda s, v: setattr(s.phase2, "lr", v))
    phase2_patience = property(lambda s: s.phase2.patience, lambda s, v: setattr(s.phase2, "patience", v))


FLAT_ALIASES = {
    "phase1_layers": "phase1.layers", "phase1_lr": "phase1.lr", "phase1_patience": "phase1.patience",
    "phase2_layers": "phase2.layers", "phase2_lr": "phase2.lr", "phase2_patience": "phase2.patience",
}


def flat_config(**flat: Any) -> ASHEMConfig:
    """`ASHEMConfig` from the specification's flat names, e.g. flat_config(phase2_lr=3e-4)."""
    cfg = ASHEMConfig()
    for key, value in flat.items():
        if key not in FLAT_ALIASES and key != "hard_example_ratio":
            raise ValueError(f"{key} is not a flat ASHEMConfig name; allowed: hard_example_ratio, "
                             + ", ".join(FLAT_ALIASES))
        setattr(cfg, key, value)
    return cfg


def rewrite_alias_overrides(args: List[str]) -> List[str]:
    """Command-line `phase2_lr=3e-4` (also `+`/`~` forms) -> `phase2.lr=3e-4`."""
    out = []
    for arg in args:
        prefix = arg[:1] if arg[:1] in "+~" else ""
        key, sep, value = arg[len(prefix):].partition("=")
        out.append(f"{prefix}{FLAT_ALIASES[key]}{sep}{value}" if key in FLAT_ALIASES else arg)
    return out


def _positive(key: str, value, kind=int) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key}={value!r} must be a positive {'integer' if kind is int else 'number'}")


def validate(cfg: ASHEMConfig) -> None:
    """Check ranges and cross-key constraints; raise ValueError("<key>=...: ...") on the first problem."""
    m, p1, p2, he, d = cfg.model, cfg.phase1, cfg.phase2, cfg.hard_examples, cfg.data
    for key in ("dim", "num_heads", "max_seq_len", "ffn_mult"):
        _positive(f"model.{key}", getattr(m, key))
    if m.dim % m.num_heads:
        raise ValueError(f"model.dim={m.dim} must be divisible by model.num_heads={m.num_heads}")
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"model.dropout={m.dropout} must be in [0, 1)")
    check_choice("model.norm", m.norm, NORMS)
    check_choice("model.pos", m.pos, POSITIONS)
    check_choice("model.ffn", m.ffn, FFNS)
    check_choice("model.precision", m.precision, ("auto", *PRECISIONS))
    if m.pos == "rope" and (m.dim // m.num_heads) % 2:
        raise ValueError(f"model.pos=rope needs an even head dim; model.dim/model.num_heads = {m.dim // m.num_heads}")
    validate_data_config(d)
    if d.seq_len > m.max_seq_len:
        raise ValueError(f"data.seq_len={d.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    for grp, name in ((p1, "phase1"), (p2, "phase2")):
        _positive(f"{name}.layers", grp.layers)
        _positive(f"{name}.lr", grp.lr, float)
        _positive(f"{name}.patience", grp.patience)
        _positive(f"{name}.max_epochs", grp.max_epochs)
        if grp.epoch_steps is not None:
            _positive(f"{name}.epoch_steps", grp.epoch_steps)
        if grp.weight_decay < 0:
            raise ValueError(f"{name}.weight_decay={grp.weight_decay} must be >= 0")
    _positive("phase2.batch_size", p2.batch_size)
    if p1.layers >= p2.layers:
        raise ValueError(f"phase1.layers={p1.layers} must be smaller than phase2.layers={p2.layers}")
    check_choice("phase2.upper_context", p2.upper_context, UPPER_CONTEXTS)
    check_choice("hard_examples.confidence", he.confidence, CONFIDENCE_MEASURES)
    check_choice("hard_examples.store", he.store, STORES)
    check_choice("hard_examples.calibration_split", he.calibration_split, CALIBRATION_SPLITS)
    check_choice("eval.split", cfg.eval.split, ("test", "validation"))
    check_ratio("hard_example_ratio", cfg.hard_example_ratio)
    if not cfg.stages:
        raise ValueError(f"stages is empty; choose from {', '.join(STAGES)}")
    for s in cfg.stages:
        check_choice("stages", s, STAGES)
    check_choice("objective", cfg.objective, OBJECTIVES)
    if cfg.num_threads < 0:
        raise ValueError(f"num_threads={cfg.num_threads} must be >= 0")


def to_dict(cfg: ASHEMConfig) -> Dict[str, Any]:
    """Plain nested dict of the dataclass fields (no properties), for JSON and checkpoints."""

    def conv(obj):
        if hasattr(obj, "__dataclass_fields__"):
            return {f.name: conv(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [conv(v) for v in obj]
        return obj

    return conv(cfg)


def from_dict(data: Dict[str, Any]) -> ASHEMConfig:
    """Inverse of `to_dict`; unknown keys fail with the key named."""
    groups = {"model": ModelConfig, "data": DataConfig, "phase1": Phase1Config,
              "hard_examples": HardExamplesConfig, "phase2": Phase2Config, "eval": EvalConfig}
    kwargs = {}
    for key, value in data.items():
        if key in groups:
            known = {f.name for f in fields(groups[key])}
            bad = set(value) - known
            if bad:
                raise ValueError(f"{key}.{sorted(bad)[0]} is not a config key; allowed: {', '.join(sorted(known))}")
            kwargs[key] = groups[key](**value)
        elif key in {f.name for f in fields(ASHEMConfig)}:
            kwargs[key] = list(value) if isinstance(value, (list, tuple)) else value
        else:
            raise ValueError(f"{key} is not a config key")
    return ASHEMConfig(**kwargs)


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends: every group option is merged into a typed node."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ashem_schema", node=ASHEMConfig)
