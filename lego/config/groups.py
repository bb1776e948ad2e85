"""The Hydra groups of a run (model, phase1, hard_examples, phase2, eval, generate, logger) and `ASHEMConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from lego.config.data import DataConfig
from lego.config.values import (DECODERS, EXIT_HEADS, FFNS, NORMS, POSITIONS, STAGES, TRACKER_KINDS, WANDB_MODES,
                                ConfigError, check_choice, check_positive, check_schedule)


@dataclass
class ModelConfig:
    """Shape of the network (shared by phase 1, phase 2 and the baselines)."""

    name: str = "tiny"  # preset name, for the record only (any text)
    dim: int = 128  # residual width, in features: an integer >= 1, a multiple of num_heads
    num_heads: int = 4  # attention heads: an integer >= 1 that divides dim (rope: dim / num_heads even)
    max_seq_len: int = 256  # longest sequence the position tables cover, in tokens: an integer >= data.seq_len
    dropout: float = 0.0  # dropout probability in training: a number in [0, 1)
    norm: str = "layernorm"  # layernorm | rmsnorm
    pos: str = "learned"  # learned | rope
    ffn: str = "gelu"  # gelu | swiglu
    ffn_mult: int = 4  # FFN hidden width over dim: an integer >= 1 (hidden width = ffn_mult * dim)
    # separate | tied | lowrank: the vocabulary heads (lego.heads). tied: every exit shares one projection
    # (frozen with Block 1; phase2.deep_head then trains the deep exit's own norm only); lowrank: every head
    # is factored at rank exit_rank, r * (dim + V) multiply-adds per token instead of dim * V
    exit_head: str = "separate"
    exit_rank: Optional[int] = None  # exit_head=lowrank: the rank, an integer in [1, dim]; else null (or dim)
    compile: bool = False  # true | false: torch.compile each layer, the embedding and the heads (compile_blocks)
    # auto | fp32 | bf16: autocast for every forward (training, calibration, mining, eval, analysis
    # alike); auto = bf16 on a CUDA GPU that has it, else fp32. Weights, losses, confidences stay float32.
    precision: str = "auto"
    # Pad the vocabulary (embedding rows, head outputs) up to a multiple of this many ids, an integer >= 1, e.g. 64
    # for GPU-friendly matmuls; 1 = the tokenizer's size. Padded ids never occur in the data: nothing masks their
    # logits, training pushes them down as it does any token never seen (nanoGPT's choice); they keep a little
    # softmax mass early in training.
    vocab_multiple: int = 1


def check_model(m: ModelConfig, prefix: str = "") -> None:
    """The shape checks shared by `validate` (prefix "model.") and the model's constructor (no prefix)."""
    for key in ("dim", "num_heads", "max_seq_len", "ffn_mult", "vocab_multiple"):
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
    check_choice(f"{prefix}exit_head", m.exit_head, EXIT_HEADS)
    r = m.exit_rank
    if m.exit_head == "lowrank":
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= m.dim:
            raise ConfigError(f"{prefix}exit_rank={r!r} is not allowed with {prefix}exit_head=lowrank; "
                              f"allowed: an integer in [1, {prefix}dim={m.dim}]")
    elif r is not None and r != m.dim:  # a full or tied head reads the whole width: rank = dim
        raise ConfigError(f"{prefix}exit_rank={r!r}: {prefix}exit_head={m.exit_head} projects from the full "
                          f"{prefix}dim={m.dim}; allowed: null, {m.dim}, or {prefix}exit_head=lowrank")


@dataclass
class OptimizerConfig:
    """What every trained model's optimizer and budget read (phase1, and phase2 for each upper Block; the dense
    baselines train with phase1's): AdamW, a learning-rate schedule over a budget of optimizer steps,
    validation every `epoch_steps` steps. The defaults are Block 1's; `Phase2Config` sets its own."""

    lr: float = 1e-3  # peak learning rate (AdamW), per optimizer step: a number > 0
    # early-stopping guard, in validations without improvement: an integer >= 1; None = off (comparisons)
    patience: Optional[int] = 1
    max_epochs: int = 6  # the budget, in epochs of epoch_steps optimizer steps: an integer >= 1
    weight_decay: float = 0.1  # AdamW's decoupled weight decay on matrices (not biases, norms): a number >= 0
    grad_clip: float = 1.0  # largest gradient norm (L2, over the trained parameters); 0 = no clipping
    # optimizer steps between two validations (an "epoch": a seeded subset of the batches): an integer >= 1;
    # None = the whole split (phase2: every hard sequence)
    epoch_steps: Optional[int] = 50
    grad_accum: int = 1  # batches (micro-batches) per optimizer step: an integer >= 1; an epoch reads epoch_steps x it
    schedule: str = "cosine"  # cosine: linear warmup, then cosine decay to min_lr_ratio x lr at the last step | constant
    warmup_steps: int = 0  # cosine: optimizer steps of linear warmup, an integer >= 0
    min_lr_ratio: float = 0.1  # cosine: the floor, as a share of lr, reached at the budget's last step: in [0, 1]
    # The resume checkpoint (last.pt: weights, optimizer, best weights, RNG) after every optimizer step whose count
    # (over the whole training) is a multiple of this, mid-epoch too: an integer >= 1; null = at every validation
    # (when checkpoint_every_minutes is null too). A resumed training continues from the step it was written at.
    checkpoint_every_steps: Optional[int] = None
    # ...or after the first optimizer step once this many minutes of wall clock have passed since the last one
    # (or since the training started in this process): a number > 0; null = no clock
    checkpoint_every_minutes: Optional[float] = None


def check_optimizer(group: OptimizerConfig, prefix: str) -> None:
    """Raise a one-line ConfigError naming the `<prefix>.` key of `group`'s optimizer fields that is not allowed."""
    check_positive(f"{prefix}.lr", group.lr, float)
    if group.patience is not None:
        check_positive(f"{prefix}.patience", group.patience)
    check_positive(f"{prefix}.max_epochs", group.max_epochs)
    if group.epoch_steps is not None:
        check_positive(f"{prefix}.epoch_steps", group.epoch_steps)
    check_positive(f"{prefix}.grad_accum", group.grad_accum)
    if group.weight_decay < 0:
        raise ConfigError(f"{prefix}.weight_decay={group.weight_decay} must be >= 0")
    check_schedule(prefix, group.schedule, group.warmup_steps, group.min_lr_ratio)
    for key, value, kind in (("checkpoint_every_steps", group.checkpoint_every_steps, int),
                             ("checkpoint_every_minutes", group.checkpoint_every_minutes, float)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, kind)) or value <= 0):
            allowed = "an integer >= 1" if kind is int else "a number > 0"
            raise ConfigError(f"{prefix}.{key}={value!r} is not allowed; allowed: {allowed}, or null")


@dataclass
class Phase1Config(OptimizerConfig):
    """Block 1: a `layers`-layer LM trained on every token for a budget of optimizer steps, its learning rate
    annealed over exactly that budget; the weights kept are the best on validation. The dense baselines train
    with these optimizer settings too."""

    layers: int = 2  # Block 1's depth, in layers: an integer >= 1, below phase2.layers
    cache: bool = True  # true | false: share phase 1, the dense baselines and each Block across identical runs
    # The pipeline's budget split in advance: the whole pipeline gets max_epochs x epoch_steps phase-1 steps' worth
    # of training MACs; phase 1 trains round(budget_fraction x those steps), mining costs what it runs, and phase 2
    # trains the rest to the step (lego.pipeline.upper.rest_of_budget). In (0, 1); None: each phase its own budget.
    budget_fraction: Optional[float] = None
    # true | false: train Block 1 inside a scaffold of the full depth (lego.pipeline.scaffold): the phase2.layers-layer
    # model on every token with the loss at its last layer, Block 1's exit head beside it on a detached hidden state
    # (the layers learn what the upper layers need, not what a shallow model predicts); phase 1's budget is counted
    # in multiply-adds, and phase 2's upper Block starts from the scaffold's upper layers and head
    scaffold: bool = False


@dataclass
class HardExamplesConfig:
    """Threshold calibration and hard-token mining with the phase-1 model."""

    confidence: str = "max_prob"  # the routing confidence measure: max_prob | margin | entropy
    calibration_split: str = "validation"  # split the threshold is calibrated on: validation | train
    store: str = "memory"  # where hard-example states live: memory | disk | recompute (from token ids)
    # store=memory: the states' dtype, float32 | bfloat16 | float16; bytes per token: 4 x model.dim in float32
    # (3,072 at dim 768), half that in the others. The disk store always writes float16, recompute keeps none.
    store_dtype: str = "float32"


@dataclass
class Phase2Config(OptimizerConfig):
    """Block 2: layers phase1.layers+1..layers trained on hard tokens of the training split (and every later Block
    of `blocks`, with these settings)."""

    layers: int = 4  # total depth after growing, in layers: an integer > phase1.layers
    lr: float = 1e-4
    patience: Optional[int] = 3
    max_epochs: int = 4  # the budget (without phase1.budget_fraction), in epochs of epoch_steps optimizer steps
    batch_size: int = 32  # hard sequences per batch: an integer >= 1
    deep_head: bool = True  # true | false: the deep exit trains its own copy of the head (the exit's stays frozen)
    upper_context: str = "full"  # full | propagate | skip: what upper layers see of easy tokens
    # propagate | skip: train the upper Block with fixed-capacity routed layers (static shapes, no host sync in the
    # layers, so they compile): each row runs its first C hard tokens, C = (the mined sequences' hard share + this
    # slack) x data.seq_len rounded up to a multiple of 8; hard tokens beyond C are left out of the loss and
    # counted (phase2/result.json `capacity`). A number >= 0; null = exact selection (the default)
    capacity_slack: Optional[float] = None
    init: str = "random"  # random | copy: new layer phase1.layers + j starts as a copy of layer j mod phase1.layers
    loss_tokens: str = "hard"  # hard (spec) | all | weighted: deep-exit loss positions; all/weighted need full context
    easy_weight: float = 0.1  # loss_tokens=weighted: the loss weight of an easy position (hard ones weigh 1): >= 0
    # frozen (spec) | finetune: Block 1 keeps training with the loss at both exits on every training token
    # (needs loss_tokens=all); the threshold is then recalibrated on validation (phase2/threshold.json)
    lower: str = "frozen"
    exit_loss_weight: float = 1.0  # lower=finetune: loss weight of the exit layer (the last layer's is 1): >= 0


@dataclass
class EvalConfig:
    """Final metrics on the test split, with baselines and the trade-off analysis."""

    split: str = "test"  # test | validation (validation only with allow_validation_split: it is the calibration split)
    allow_validation_split: bool = False  # true | false: say so explicitly to score on the calibration split
    standard_baseline: bool = True  # true | false: train the dense models below (phase1's optimizer and schedule)
    baseline_budget: str = "matched"  # matched: the ASHEM pipeline's training multiply-adds, to the step | steps: its
    #   optimizer steps (phase 1 + later Blocks) | phase1: phase 1's own budget (max_epochs x epoch_steps)
    # a number in [0, 0.01]: a dense model already in the model cache whose steps are within this fraction of the
    # budget's is reused (dense<depth>/ records asked_steps and macs_off); 0 = trained for exactly the budget's steps
    baseline_tolerance: float = 0.0
    # depths added to the dense frontier, in layers: integers in [1, phase2.layers]; every Block boundary is always on
    # it; None = those alone
    dense_depths: Optional[List[int]] = None
    analysis: bool = True  # true | false: trade-off curve, oracle, confidence measures, pictures
    html_tokens: int = 400  # how many tokens of the split eval/tokens.html shows: an integer
    # true | false: also fit a logistic probe on the exit's hidden state (validation) that predicts whether the last
    # layer beats the exit, route on it at hard_example_ratio, and report it in metrics.json by_label (lego.labels)
    learned_router: bool = False
    # what the learned router's probe predicts: wins (logistic: does the last layer beat the exit, CALM's "meta") |
    # gain (ridge: by how much, nll_exit - nll_deep: tokens no depth helps stay at the exit)
    learned_router_target: str = "wins"


@dataclass
class GenerateConfig:
    """Text from the finished model with each decoder, timed (lego.generate); changes no other stage's result."""

    enabled: bool = True  # true | false: false = stage generate does nothing
    prompt: Optional[str] = None  # text from the command line (not empty); None = prompts from the test split
    num_prompts: int = 4  # test-split prompts: an integer >= 1
    batch_size: Optional[int] = None  # prompts decoded together: an integer >= 1; None = every prompt in one batch
    prompt_len: Optional[int] = None  # tokens per test-split prompt, >= 1; None = min(32, model.max_seq_len // 2)
    max_new_tokens: Optional[int] = None  # tokens generated per prompt, >= 1; None = min(32, what the context leaves)
    decoders: List[str] = field(default_factory=lambda: list(DECODERS))  # any of dense, routed, speculative
    k_values: List[int] = field(default_factory=lambda: [2, 4])  # speculative draft lengths in tokens, each >= 1
    adaptive: bool = False  # true | false: also one run per k that stops drafting below the routing threshold
    # adaptive drafting's own threshold, calibrated on validation: the lowest exit confidence above which the exit's
    # top token equals the deep model's on at least this share of tokens (generate/draft_threshold.json): a number
    # in (0, 1]; None = draft while the exit would route (the calibrated routing threshold)
    draft_agreement: Optional[float] = None
    temperature: float = 0.0  # softmax temperature: a number >= 0; 0 = greedy
    top_k: Optional[int] = None  # sample from the k likeliest tokens: an integer >= 1; None = all
    top_p: Optional[float] = None  # nucleus sampling mass in (0, 1]; None = all
    seed: int = 0  # prompt offsets and sampling: any integer


def validate_generate(g: GenerateConfig, m: ModelConfig, runs: bool) -> None:
    """The generate group's ranges and choices; the fit into model.max_seq_len only when the stage `runs`."""
    if g.prompt == "":
        raise ConfigError("generate.prompt is empty; give some text, or null for prompts from the test split")
    for key in ("num_prompts", "prompt_len", "max_new_tokens"):
        check_positive(f"generate.{key}", getattr(g, key))
    if g.batch_size is not None:
        check_positive("generate.batch_size", g.batch_size)
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
    if g.draft_agreement is not None and not (isinstance(g.draft_agreement, (int, float))
                                              and 0.0 < g.draft_agreement <= 1.0):
        raise ConfigError(f"generate.draft_agreement={g.draft_agreement!r} must be in (0, 1], or null")
    if runs and g.enabled:
        # a text prompt has at least one token; its real length is checked once it is tokenized
        need, what = ((g.prompt_len, f"generate.prompt_len={g.prompt_len}") if g.prompt is None
                      else (1, "a one-token generate.prompt"))
        if need + g.max_new_tokens > m.max_seq_len:
            raise ConfigError(f"generate.max_new_tokens={g.max_new_tokens}: {what} + new tokens exceed "
                              f"model.max_seq_len={m.max_seq_len}")


@dataclass
class LoggerConfig:
    """Which experiment trackers a run writes to (`lego-run logger=<option>`; lego.trackers)."""

    kinds: List[str] = field(default_factory=lambda: ["csv"])  # any of csv, tensorboard, wandb, mlflow; [none] = off
    project: str = "lego"  # wandb project / mlflow experiment name: any text
    wandb_mode: str = "offline"  # offline | online | disabled; online only when asked (needs network + login)
    mlflow_uri: Optional[str] = None  # tracking uri (http://..., sqlite:///...); None = file store <run_dir>/mlruns
    log_every: int = 10  # train metrics every this many optimizer steps, an integer >= 1 (each reads the device)

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
    hard_example_ratio: float = 0.5  # share of calibration tokens that are hard (continue past Block 1): in (0, 1)
    blocks: Optional[List[int]] = None  # cumulative layer counts of the Blocks, e.g. [2, 4, 6]; None = [phase1.layers,
    #   phase2.layers]. Given, it overrides both (phase1.layers := first, phase2.layers := last); every Block after
    #   the first trains with phase2's settings (lr, patience, epochs, upper_context, ...)
    hard_example_ratios: Optional[List[float]] = None  # per exit, the share of the tokens reaching it that continue
    #   past it, each in (0, 1); None = [hard_example_ratio] * (len(blocks) - 1); one value applies to every exit
    seed: int = 42  # seeds every model's initialisation and the batch order: any integer
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_threads: int = 0  # torch.set_num_threads, in threads: an integer >= 0; 0 keeps torch's default
    # which stages run, any of phase1, hard_examples, phase2, eval, generate (in the run's order whatever the list's);
    # a stage left out reads what an earlier invocation wrote into the run dir
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    objective: str = "val_ppl"  # what lego-run returns to a sweeper: the routed model's val_ppl | val_loss
    progress: bool = True  # true | false: progress bars at a terminal, progress lines in a log; false = neither
    progress_interval_s: float = 30.0  # seconds between progress lines when stderr is not a terminal: a number > 0

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


def rewrite_alias_overrides(args: List[str]) -> List[str]:
    """Command-line `phase2_lr=3e-4` (also `+`/`~` forms) -> `phase2.lr=3e-4`."""
    out = []
    for arg in args:
        prefix = arg[:1] if arg[:1] in "+~" else ""
        key, sep, value = arg[len(prefix):].partition("=")
        out.append(f"{prefix}{FLAT_ALIASES[key]}{sep}{value}" if key in FLAT_ALIASES else arg)
    return out
