"""The typed schema of a LEGO run: `ASHEMConfig` and its groups, the allowed values, the checks.

The dataclasses are registered in Hydra's ConfigStore as the schema of `conf/config.yaml`, so a
mistyped key or a wrong type fails at compose time; the YAML files under `conf/` only hold
values. `validate(cfg)` checks what types cannot (ranges, choices, cross-group constraints) and
raises `ConfigError` with one line naming the key. This module imports nothing from `lego`:
the schema does not depend on the code it configures.

The original specification's flat names (`phase1_layers`, `phase1_lr`, `phase1_patience`,
`hard_example_ratio`, `phase2_layers`, `phase2_lr`, `phase2_patience`) are properties of
`ASHEMConfig`, and `lego-run` accepts them on the command line as aliases of the group keys
(`phase2_lr=3e-4` means `phase2.lr=3e-4`). `hard_example_ratio` is itself a top-level key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Tuple


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
CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")
STORES = ("memory", "disk", "recompute")  # where hard-example states live
SCHEDULES = ("constant", "cosine")  # learning-rate schedules (lego.schedule)
BASELINE_BUDGETS = ("matched", "steps", "phase1")  # training budget of the dense baselines
PHASE2_INITS = ("random", "copy")  # how the new upper layers start (lego.model.grow)
LOSS_TOKENS = ("hard", "all", "weighted")  # which positions phase 2's deep-exit loss counts
LOWERS = ("frozen", "finetune")  # whether Block 1 keeps training in phase 2
DATA_NAMES = ("shakespeare", "kjv", "wikitext2", "wikitext103", "hf", "text_files")
TOKENIZERS = ("bpe", "bytes", "pretrained")
SPLITS = ("train", "validation", "test")
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


@dataclass
class DataConfig:
    """Which text, which tokenizer, how it is cut into batches (Hydra group `data`)."""

    name: str = "shakespeare"
    """Corpus: shakespeare | kjv | wikitext2 | wikitext103 | hf | text_files."""
    tokenizer: str = "bpe"
    """bpe (byte-level, trained on the train split) | bytes (vocab 256) | pretrained."""
    vocab_size: int = 2048
    """BPE vocabulary size, at least 257 (ignored for bytes and pretrained)."""
    pretrained_name: Optional[str] = None
    """Hub tokenizer name for tokenizer=pretrained, e.g. 'gpt2'."""
    seq_len: int = 128
    """Tokens per training sequence (the model's context), at least 2."""
    batch_size: int = 32
    """Sequences per training batch."""
    eval_batch_size: int = 64
    """Sequences per evaluation batch."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Tokenized corpora and tokenizers; env LEGO_CACHE_DIR replaces the default."""
    path: Optional[str] = None
    """data=hf: `datasets.load_dataset` path, e.g. 'wikitext' or a local directory."""
    config_name: Optional[str] = None
    """data=hf: dataset configuration, e.g. 'wikitext-2-raw-v1'."""
    text_column: str = "text"
    """Column holding the text (hf, text_files with .jsonl/.parquet)."""
    train_split: str = "train"
    """Split (or slice, e.g. 'train[:90%]') used for training."""
    validation_split: str = "validation"
    """Split (or slice, e.g. 'train[90%:95%]') used for validation."""
    test_split: str = "test"
    """Split (or slice, e.g. 'train[95%:]') used for the final test."""
    train_files: List[str] = field(default_factory=list)
    """data=text_files: training files (.txt: one row per line; .jsonl; .parquet)."""
    validation_files: List[str] = field(default_factory=list)
    """data=text_files: validation files (may be empty if validation_split slices train)."""
    test_files: List[str] = field(default_factory=list)
    """data=text_files: test files (may be empty if test_split slices train)."""
    max_train_tokens: Optional[int] = None
    """Use only the first this-many training tokens (quick runs); None uses all."""
    max_eval_tokens: Optional[int] = None
    """Use only the first this-many validation and test tokens (quick runs); None uses all."""

    def __post_init__(self):
        validate_data_config(self)


def _fail(key: str, problem: str, allowed: str) -> NoReturn:
    raise ConfigError(f"data.{key}: {problem}; allowed: {allowed}")


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ConfigError('data.<key>: <problem>; allowed: <values>') for the first bad key.
    Checks values and that data=text_files names existing files; the text itself is
    checked by `load_corpus`."""
    if cfg.name not in DATA_NAMES:
        _fail("name", f"unknown corpus {cfg.name!r}", ", ".join(DATA_NAMES))
    if cfg.tokenizer not in TOKENIZERS:
        _fail("tokenizer", f"unknown tokenizer {cfg.tokenizer!r}", ", ".join(TOKENIZERS))
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257:
        _fail("vocab_size", f"{cfg.vocab_size} leaves no room for merges over 256 bytes",
              "an integer >= 257")
    if cfg.tokenizer == "pretrained" and not cfg.pretrained_name:
        _fail("pretrained_name", "tokenizer=pretrained needs a hub tokenizer name",
              "a name such as 'gpt2'")
    for key in ("seq_len", "batch_size", "eval_batch_size"):
        least = 2 if key == "seq_len" else 1
        if getattr(cfg, key) < least:
            _fail(key, f"{getattr(cfg, key)} is too small", f"an integer >= {least}")
    if cfg.max_eval_tokens is not None and cfg.max_eval_tokens < cfg.seq_len + 1:
        _fail("max_eval_tokens", f"{cfg.max_eval_tokens} holds no sequence of {cfg.seq_len + 1} tokens",
              f"an integer >= {cfg.seq_len + 1}, or null")
    if cfg.max_train_tokens is not None and cfg.max_train_tokens < cfg.seq_len + 1:
        _fail("max_train_tokens", f"{cfg.max_train_tokens} holds no sequence of "
              f"seq_len + 1 = {cfg.seq_len + 1} tokens", f"None or >= {cfg.seq_len + 1}")
    if not cfg.cache_dir:
        _fail("cache_dir", "empty", "a directory path")
    if cfg.name == "hf" and not cfg.path:
        _fail("path", "data=hf needs a dataset path", "a hub name such as 'wikitext' or a directory")
    if cfg.name in ("hf", "text_files", *HF_PRESETS):
        _check_split_specs(cfg)
    if cfg.name == "text_files":
        _check_files(cfg)


def _split_base(spec: str) -> str:
    """'train[:90%]' -> 'train'."""
    return spec.split("[", 1)[0].strip()


def _check_split_specs(cfg: DataConfig) -> None:
    # Two splits slicing the same source split must both be slices; a bare 'train' next to
    # 'train[90%:]' would put the validation rows into training.
    specs = {s: getattr(cfg, f"{s}_split") for s in SPLITS}
    for split, spec in specs.items():
        if not spec or not _split_base(spec):
            _fail(f"{split}_split", "empty", "a split name or slice such as 'train[:90%]'")
        for other, other_spec in specs.items():
            if other != split and _split_base(other_spec) == spec:
                _fail(f"{split}_split", f"{spec!r} also feeds data.{other}_split={other_spec!r}",
                      f"a slice that does not overlap it, e.g. '{spec}[:90%]'")


def _check_files(cfg: DataConfig) -> None:
    if not cfg.train_files:
        _fail("train_files", "data=text_files needs at least one training file",
              "a list of .txt/.jsonl/.parquet paths")
    builders = set()
    for split in SPLITS:
        for f in getattr(cfg, f"{split}_files"):
            suffix = Path(f).suffix.lower()
            if suffix not in FILE_BUILDERS:
                _fail(f"{split}_files", f"{f!r} has an unsupported extension",
                      ", ".join(FILE_BUILDERS))
            if not Path(f).expanduser().is_file():
                _fail(f"{split}_files", f"no such file {f!r}", "paths of existing files")
            if Path(f).expanduser().stat().st_size == 0:
                _fail(f"{split}_files", f"{f!r} is empty", "files that hold text")
            builders.add(FILE_BUILDERS[suffix])
    if len(builders) > 1:
        _fail("train_files", f"files of different formats ({', '.join(sorted(builders))})",
              "one format across all splits")
    with_files = [s for s in SPLITS if getattr(cfg, f"{s}_files")]
    for split in SPLITS:
        spec = getattr(cfg, f"{split}_split")
        if _split_base(spec) not in with_files:
            _fail(f"{split}_files", f"no files, and data.{split}_split={spec!r} names no split "
                  "that has files", f"files, or a slice of {', '.join(with_files)} such as "
                  f"'{with_files[0]}[90%:95%]' (with data.train_split sliced too)")


# -- the library's training controls (SPEC section 2) ---------------------------------------------
@dataclass
class StageConfig:
    """Loss at every layer in the inclusive range `layers` (mean over them), times `loss_weight`."""

    layers: Tuple[int, int]
    loss_weight: float = 1.0

    def __post_init__(self):
        a, b = self.layers
        if not 1 <= a <= b:
            raise ValueError(f"StageConfig.layers={self.layers} must satisfy 1 <= start <= end")


@dataclass
class TrainingConfig:
    """Stages whose weighted losses add up, plus the inference-time routing controls."""

    stages: List[StageConfig] = field(default_factory=list)
    routing_threshold: Optional[float] = None
    exit_layer: Optional[int] = None
    exit_layers: Optional[List[int]] = None  # every exit of a cascade (more than two Blocks); the first is exit_layer
    routing_thresholds: Optional[List[float]] = None  # their thresholds; the first is routing_threshold
    confidence: str = "max_prob"  # measure used by routing: one of CONFIDENCE_MEASURES
    upper_context: Optional[str] = None  # None: the model's own policy
    grad_clip: Optional[float] = 1.0
    ignore_index: int = IGNORE_INDEX

    @property
    def last_layer(self) -> Optional[int]:
        return max(s.layers[1] for s in self.stages) if self.stages else None


def create_standard_config(num_layers: int) -> TrainingConfig:
    """A standard LM: one stage, loss at the last layer."""
    return TrainingConfig(stages=[StageConfig(layers=(num_layers, num_layers), loss_weight=1.0)])


# -- the run (Hydra groups) --------------------------------------------------------------------------
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
    schedule: str = "constant"  # constant | cosine: linear warmup, then cosine decay to min_lr_ratio * lr
    warmup_steps: int = 0  # cosine: optimizer steps of linear warmup
    min_lr_ratio: float = 0.1  # cosine: the floor, as a share of lr, reached at max_epochs * epoch_steps
    cache: bool = True  # share phase 1 and the dense baselines across runs/sweep jobs with identical settings
    # Grow earlier: phase 1 trains max(1, round(budget_fraction * max_epochs)) epochs, and phase 2's max_epochs
    # become what phase 1 left of a budget of max_epochs * epoch_steps phase-1 steps, in training MACs
    # (lego.stages.phase2.budget_epochs); None: each phase its own max_epochs (the specification).
    budget_fraction: Optional[float] = None


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
    schedule: str = "constant"  # constant | cosine: linear warmup, then cosine decay to min_lr_ratio * lr
    warmup_steps: int = 0  # cosine: optimizer steps of linear warmup
    min_lr_ratio: float = 0.1  # cosine: the floor, as a share of lr, reached at max_epochs * epoch_steps
    deep_head: bool = True  # the deep exit trains its own copy of the head (the exit's stays frozen)
    upper_context: str = "full"  # full | propagate | skip: what upper layers see of easy tokens
    init: str = "random"  # random | copy: new layer phase1.layers + j starts as a copy of layer j mod phase1.layers
    loss_tokens: str = "hard"  # hard (spec) | all | weighted: deep-exit loss positions; all/weighted need full context
    easy_weight: float = 0.1  # loss_tokens=weighted: weight of an easy position's loss (hard ones weigh 1)
    # frozen (spec) | finetune: Block 1 keeps training with the loss at both exits on every training token
    # (needs loss_tokens=all); the threshold is then recalibrated on validation (phase2/threshold.json)
    lower: str = "frozen"
    exit_loss_weight: float = 1.0  # lower=finetune: weight of the exit layer's loss (the last layer's is 1)


@dataclass
class EvalConfig:
    """Final metrics on the test split, with baselines and the trade-off analysis."""

    split: str = "test"  # test; validation only with allow_validation_split (it is the calibration split)
    allow_validation_split: bool = False  # say so explicitly to score on the split the threshold was calibrated on
    standard_baseline: bool = True  # train the dense models below (phase1's optimizer, schedule, stopping rule)
    baseline_budget: str = "matched"  # matched: the ASHEM pipeline's training multiply-adds | steps: its
    #   optimizer steps (phase 1 + phase 2) | phase1: phase 1's budget (max_epochs x epoch_steps)
    dense_depths: Optional[List[int]] = None  # the dense frontier's depths; None = phase1.layers .. phase2.layers
    analysis: bool = True  # trade-off curve, oracle, confidence measures, pictures
    html_tokens: int = 400  # tokens shown in eval/tokens.html


@dataclass
class GenerateConfig:
    """Text from the finished model with each decoder, timed (lego.generate); changes no other stage's result."""

    enabled: bool = True  # false: stage generate does nothing
    prompt: Optional[str] = None  # text from the command line; None = prompts from the test split
    num_prompts: int = 4  # test-split prompts (one batch)
    prompt_len: int = 32  # tokens per test-split prompt
    max_new_tokens: int = 32  # tokens generated per prompt
    decoders: List[str] = field(default_factory=lambda: list(DECODERS))  # any of DECODERS
    k_values: List[int] = field(default_factory=lambda: [2, 4])  # speculative draft lengths, one run each
    temperature: float = 0.0  # 0 = greedy
    top_k: Optional[int] = None  # sample from the k likeliest tokens; None = all
    top_p: Optional[float] = None  # nucleus sampling mass in (0, 1]; None = all
    seed: int = 0  # prompt offsets and sampling


@dataclass
class LoggerConfig:
    """Which experiment trackers a run writes to (`lego-run logger=<option>`; lego.trackers)."""

    kinds: List[str] = field(default_factory=lambda: ["csv"])  # any of csv, tensorboard, wandb, mlflow; [none] = off
    project: str = "lego"  # wandb project / mlflow experiment name
    wandb_mode: str = "offline"  # offline | online | disabled; online only when asked (needs network + login)
    mlflow_uri: Optional[str] = None  # tracking uri (http://..., sqlite:///...); None = file store <run_dir>/mlruns
    log_every: int = 1  # send train metrics every this many optimizer steps (validation: always)

    def __post_init__(self) -> None:
        check_logger(self)


def check_tracker_kinds(kinds: List[str]) -> None:
    for k in kinds:
        if k not in TRACKER_KINDS:
            raise ConfigError(f"logger.kinds: {k!r} is not allowed; choose from {', '.join(TRACKER_KINDS)}")
    if not kinds:
        raise ConfigError("logger.kinds is empty; use [none] to switch tracking off")
    if "none" in kinds and len(kinds) > 1:
        raise ConfigError(f"logger.kinds={kinds}: 'none' cannot be combined with other trackers")


def check_logger(cfg: LoggerConfig) -> None:
    """Raise a one-line ConfigError naming the `logger.` key that is not allowed."""
    check_tracker_kinds(list(cfg.kinds))
    if cfg.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"logger.wandb_mode={cfg.wandb_mode!r} is not allowed; choose one of "
                          f"{', '.join(WANDB_MODES)}")
    if isinstance(cfg.log_every, bool) or int(cfg.log_every) < 1:
        raise ConfigError(f"logger.log_every={cfg.log_every} is not allowed; it must be >= 1")


@dataclass
class ASHEMConfig:
    """Everything one `lego-run` does; composed by Hydra from conf/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    hard_examples: HardExamplesConfig = field(default_factory=HardExamplesConfig)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment trackers; no effect on results
    hard_example_ratio: float = 0.5  # share of calibration tokens that are hard (continue past Block 1)
    blocks: Optional[List[int]] = None  # cumulative layer counts of the Blocks, e.g. [2, 4, 6]; None = [phase1.layers,
    #   phase2.layers]. Given, it overrides both (phase1.layers := first, phase2.layers := last); every Block after
    #   the first trains with phase2's settings (lr, patience, epochs, upper_context, ...)
    hard_example_ratios: Optional[List[float]] = None  # per exit, the share of the tokens reaching it that continue
    #   past it; None = [hard_example_ratio] * (len(blocks) - 1); one value applies to every exit
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    objective: str = "val_ppl"  # what lego-run returns to a sweeper: the routed model's val_ppl | val_loss
    progress: bool = True  # progress bars at a terminal, progress lines in a log; false = neither
    progress_interval_s: float = 30.0  # seconds between progress lines when stderr is not a terminal

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
            raise ConfigError(f"{key} is not a flat ASHEMConfig name; allowed: hard_example_ratio, "
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


def check_schedule(prefix: str, schedule: str, warmup_steps: int, min_lr_ratio: float) -> None:
    """Raise ConfigError naming the key (`<prefix>.schedule`, ...) when a setting is not allowed."""
    prefix = f"{prefix}." if prefix else ""
    check_choice(f"{prefix}schedule", schedule, SCHEDULES)
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"{prefix}warmup_steps={warmup_steps!r} must be a non-negative integer")
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"{prefix}min_lr_ratio={min_lr_ratio!r} must be a number in [0, 1]")


def check_model(m: "ModelConfig", prefix: str = "") -> None:
    """The shape checks shared by `validate` (prefix "model.") and the model's constructor (no prefix)."""
    for key in ("dim", "num_heads", "max_seq_len", "ffn_mult"):
        check_positive(f"{prefix}{key}", getattr(m, key))
    if m.dim % m.num_heads:
        raise ConfigError(f"{prefix}dim={m.dim} must be divisible by {prefix}num_heads={m.num_heads}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{prefix}dropout={m.dropout} must be in [0, 1)")
    check_choice(f"{prefix}norm", m.norm, NORMS)
    check_choice(f"{prefix}pos", m.pos, POSITIONS)
    check_choice(f"{prefix}ffn", m.ffn, FFNS)
    if m.pos == "rope" and (m.dim // m.num_heads) % 2:
        raise ConfigError(f"{prefix}pos=rope needs an even head dim; {prefix}dim/{prefix}num_heads = "
                          f"{m.dim // m.num_heads}")


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


def apply_blocks(cfg: ASHEMConfig) -> None:
    """Check `blocks` and `hard_example_ratios`, then make phase1.layers, phase2.layers and hard_example_ratio
    say the same: the first and last Block, the first exit's ratio (what the two-Block code reads)."""
    if cfg.blocks is not None:
        b = list(cfg.blocks)
        if len(b) < 2:
            raise ConfigError(f"blocks={b} needs at least 2 entries (cumulative layer counts, e.g. [2, 4, 6])")
        for x in b:
            check_positive("blocks", x)
        if any(y <= x for x, y in zip(b, b[1:])):
            raise ConfigError(f"blocks={b} must be strictly increasing (cumulative layer counts, e.g. [2, 4, 6])")
        cfg.phase1.layers, cfg.phase2.layers = b[0], b[-1]
    if cfg.hard_example_ratios is not None:
        r, n = list(cfg.hard_example_ratios), len(block_layers(cfg)) - 1
        if len(r) not in (1, n):
            raise ConfigError(f"hard_example_ratios={r} needs 1 or {n} entries (one per exit of blocks="
                              f"{block_layers(cfg)})")
        for x in r:
            check_ratio("hard_example_ratios", x)
        cfg.hard_example_ratio = r[0]


def validate(cfg: ASHEMConfig) -> None:
    """Check ranges and cross-key constraints; raise ConfigError("<key>=...: ...") on the first problem.
    Sets phase1.layers, phase2.layers and hard_example_ratio from `blocks` / `hard_example_ratios` when given."""
    apply_blocks(cfg)
    m, p1, p2, he, d = cfg.model, cfg.phase1, cfg.phase2, cfg.hard_examples, cfg.data
    check_model(m, "model.")
    check_choice("model.precision", m.precision, ("auto", *PRECISIONS))
    validate_data_config(d)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    for grp, name in ((p1, "phase1"), (p2, "phase2")):
        check_positive(f"{name}.layers", grp.layers)
        check_positive(f"{name}.lr", grp.lr, float)
        check_positive(f"{name}.patience", grp.patience)
        check_positive(f"{name}.max_epochs", grp.max_epochs)
        if grp.epoch_steps is not None:
            check_positive(f"{name}.epoch_steps", grp.epoch_steps)
        if grp.weight_decay < 0:
            raise ConfigError(f"{name}.weight_decay={grp.weight_decay} must be >= 0")
        check_schedule(name, grp.schedule, grp.warmup_steps, grp.min_lr_ratio)
    check_positive("phase2.batch_size", p2.batch_size)
    if p1.layers >= p2.layers:
        raise ConfigError(f"phase1.layers={p1.layers} must be smaller than phase2.layers={p2.layers}")
    check_choice("phase2.upper_context", p2.upper_context, UPPER_CONTEXTS)
    check_variants(cfg)
    check_choice("hard_examples.confidence", he.confidence, CONFIDENCE_MEASURES)
    check_choice("hard_examples.store", he.store, STORES)
    check_choice("hard_examples.calibration_split", he.calibration_split, CALIBRATION_SPLITS)
    check_choice("eval.split", cfg.eval.split, ("test", "validation"))
    if cfg.eval.split == "validation" and not cfg.eval.allow_validation_split:
        raise ConfigError("eval.split=validation scores on the split the threshold was calibrated on and phase 2 "
                          "early-stopped on; add eval.allow_validation_split=true to do it anyway")
    check_choice("eval.baseline_budget", cfg.eval.baseline_budget, BASELINE_BUDGETS)
    for depth in cfg.eval.dense_depths or ():
        if not isinstance(depth, int) or not 1 <= depth <= p2.layers:
            raise ConfigError(f"eval.dense_depths contains {depth!r}; allowed: integers in [1, phase2.layers={p2.layers}]")
    check_ratio("hard_example_ratio", cfg.hard_example_ratio)
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


def validate_generate(g: GenerateConfig, m: ModelConfig, runs: bool) -> None:
    """The generate group's ranges and choices; the fit into model.max_seq_len only when the stage `runs`."""
    if g.prompt == "":
        raise ConfigError("generate.prompt is empty; give some text, or null for prompts from the test split")
    for key in ("num_prompts", "prompt_len", "max_new_tokens"):
        check_positive(f"generate.{key}", getattr(g, key))
    if not g.decoders:
        raise ConfigError(f"generate.decoders is empty; choose from {', '.join(DECODERS)}")
    for d in g.decoders:
        check_choice("generate.decoders", d, DECODERS)
    if "speculative" in g.decoders and not g.k_values:
        raise ConfigError("generate.k_values is empty; the speculative decoder needs draft lengths >= 1")
    for k in g.k_values:
        check_positive("generate.k_values", k)
    if g.temperature < 0:
        raise ConfigError(f"generate.temperature={g.temperature} must be >= 0 (0 = greedy)")
    if g.top_k is not None:
        check_positive("generate.top_k", g.top_k)
    if g.top_p is not None and not 0.0 < g.top_p <= 1.0:
        raise ConfigError(f"generate.top_p={g.top_p} must be in (0, 1], or null")
    if runs and g.enabled:
        # a text prompt has at least one token; its real length is checked once it is tokenized
        need, what = ((g.prompt_len, f"generate.prompt_len={g.prompt_len}") if g.prompt is None
                      else (1, "a one-token generate.prompt"))
        if need + g.max_new_tokens > m.max_seq_len:
            raise ConfigError(f"generate.max_new_tokens={g.max_new_tokens}: {what} + new tokens exceed "
                              f"model.max_seq_len={m.max_seq_len}")


def check_non_negative(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"{key}={value!r} must be a number >= 0")


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


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends: every group option is merged into a typed node."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ashem_schema", node=ASHEMConfig)
