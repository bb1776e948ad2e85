"""The Hydra groups of a run (model, phase1, hard_examples, phase2, eval, generate, logger) and `ASHEMConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from lego.config.data import DataConfig
from lego.config.values import DECODERS, STAGES, TRACKER_KINDS, WANDB_MODES, ConfigError


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
    # separate | tied | lowrank: the vocabulary heads (lego.heads). tied: every exit shares one projection
    # (frozen with Block 1; phase2.deep_head then trains the deep exit's own norm only); lowrank: every head
    # is factored at rank exit_rank, r * (dim + V) multiply-adds per token instead of dim * V
    exit_head: str = "separate"
    exit_rank: Optional[int] = None  # exit_head=lowrank: the rank, 1 <= exit_rank <= dim; else null
    compile: bool = False  # torch.compile each layer, the embedding and the heads (model.compile_blocks)
    # auto | fp32 | bf16: autocast for every forward (training, calibration, mining, eval, analysis
    # alike); auto = bf16 on a CUDA GPU that has it, else fp32. Weights, losses, confidences stay float32.
    precision: str = "auto"
    # Pad the vocabulary (embedding rows, head outputs) up to a multiple of this, e.g. 64 for GPU-friendly matmuls;
    # 1 = the tokenizer's size. Padded ids never occur in the data: nothing masks their logits, training pushes them
    # down as it does any token never seen (nanoGPT's choice); they keep a little softmax mass early in training.
    vocab_multiple: int = 1


@dataclass
class Phase1Config:
    """Block 1: a `layers`-layer LM trained on every token for a budget of optimizer steps, its learning rate
    annealed over exactly that budget; the weights kept are the best on validation. The dense baselines train
    with these optimizer settings too."""

    layers: int = 2
    lr: float = 1e-3
    patience: Optional[int] = 1  # early-stopping guard: validations without improvement; None = off (comparisons)
    max_epochs: int = 6  # the budget: max_epochs x epoch_steps optimizer steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    epoch_steps: Optional[int] = 50  # optimizer steps between two validations (a seeded subset); None = whole split
    grad_accum: int = 1  # batches (micro-batches) per optimizer step, an integer >= 1; an epoch reads epoch_steps x it
    schedule: str = "cosine"  # cosine: linear warmup, then cosine decay to min_lr_ratio * lr at the last step | constant
    warmup_steps: int = 0  # cosine: optimizer steps of linear warmup
    min_lr_ratio: float = 0.1  # cosine: the floor, as a share of lr, reached at the budget's last step
    cache: bool = True  # share phase 1 and the dense baselines across runs/sweep jobs with identical settings
    # The pipeline's budget split in advance: the whole pipeline gets max_epochs x epoch_steps phase-1 steps' worth
    # of training MACs; phase 1 trains round(budget_fraction x those steps), mining costs what it runs, and phase 2
    # trains the rest to the step (lego.stages.phase2.budget_steps). In (0, 1]; None: each phase its own budget.
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
    patience: Optional[int] = 3  # early-stopping guard: validations without improvement; None = off (comparisons)
    max_epochs: int = 4  # the budget (without phase1.budget_fraction): max_epochs x epoch_steps optimizer steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 32  # hard sequences per batch
    epoch_steps: Optional[int] = 50  # optimizer steps between two validations; None = every hard sequence
    grad_accum: int = 1  # batches (micro-batches) per optimizer step, an integer >= 1; an epoch reads epoch_steps x it
    schedule: str = "cosine"  # cosine: linear warmup, then cosine decay to min_lr_ratio * lr at the last step | constant
    warmup_steps: int = 0  # cosine: optimizer steps of linear warmup
    min_lr_ratio: float = 0.1  # cosine: the floor, as a share of lr, reached at the budget's last step
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
    standard_baseline: bool = True  # train the dense models below (phase1's optimizer and schedule)
    baseline_budget: str = "matched"  # matched: the ASHEM pipeline's training multiply-adds, to the step | steps: its
    #   optimizer steps (phase 1 + later Blocks) | phase1: phase 1's own budget (max_epochs x epoch_steps)
    dense_depths: Optional[List[int]] = None  # depths added to the dense frontier; every Block boundary is always on it
    analysis: bool = True  # trade-off curve, oracle, confidence measures, pictures
    html_tokens: int = 400  # tokens shown in eval/tokens.html
    # true | false: also fit a logistic probe on the exit's hidden state (validation) that predicts whether the last
    # layer beats the exit, route on it at hard_example_ratio, and report it in metrics.json by_label (lego.labels)
    learned_router: bool = False


@dataclass
class GenerateConfig:
    """Text from the finished model with each decoder, timed (lego.generate); changes no other stage's result."""

    enabled: bool = True  # false: stage generate does nothing
    prompt: Optional[str] = None  # text from the command line; None = prompts from the test split
    num_prompts: int = 4  # test-split prompts (one batch)
    prompt_len: Optional[int] = None  # tokens per test-split prompt; None = min(32, model.max_seq_len // 2)
    max_new_tokens: Optional[int] = None  # tokens generated per prompt; None = min(32, what the context leaves)
    decoders: List[str] = field(default_factory=lambda: list(DECODERS))  # any of DECODERS
    k_values: List[int] = field(default_factory=lambda: [2, 4])  # speculative draft lengths, one run each
    adaptive: bool = False  # also one run per k that stops drafting below the routing threshold (up to k)
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
    log_every: int = 10  # train metrics every this many optimizer steps (each logged step reads the device once)

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
