"""The LEGO model: a causal decoder whose hidden state can be read out at any layer.

A Block is a run of consecutive layers trained like a standard LM (loss at its last layer).
`Model(ModelArgs(...))` is a plain LM that exposes every step separately, so that training,
hard-example mining and routed inference can stop or start at any layer:

    model = Model(ModelArgs(vocab_size=V, dim=128, num_layers=4, num_heads=4, exits=(2,)))
    h = model.embed(idx)                      # (B, T, C), layer 0
    h = model.run_layers(h, 0, 2)             # after layer 2
    logits = model.logits_at(h, layer=2)      # (B, T, V) through the head used at layer 2
    h4 = model.run_layers(h, 2, 4, hard=mask, policy="skip")  # the upper Block for the hard tokens only

How tokens route is not the model's state: a `lego.config.Routing` value goes to each routed call.
`DeepSupervisionTransformer(...)`, the specification's constructor, builds a `Model` from its keywords.

Layers are numbered from 1, as in the specification: "layer 2" is the output of the second
layer, `model.layers[1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lego.config import (PRECISIONS, UPPER_CONTEXTS, ConfigError, ModelConfig, Routing,
                         check_choice, check_model, check_positive)
from lego.heads import make_head, make_norm
from lego.rope import apply_rope, rope_tables
from lego.routed_layer import layer_routed

def cpu_bf16() -> Optional[str]:
    """The native bfloat16 matrix multiply this CPU has, as torch detects it: "amx" (AMX tiles), "avx512_bf16", or
    None (bf16 would be emulated, slower than fp32)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


def precision_choice(precision: str, device) -> dict:
    """What `model.precision` resolves to on `device` and why: {"asked", "runs", "why"} (run.json records it).

    "auto" is bf16 on a CUDA device that supports it, else fp32; on a CPU that multiplies bf16 natively
    (`cpu_bf16`) the record says so, and model.precision=bf16 uses it.
    Fails early when bf16 is asked of a CUDA device without it (autocast would refuse mid-run)."""
    check_choice("model.precision", precision, ("auto", *PRECISIONS))
    kind = torch.device(device).type
    cuda = kind == "cuda"
    if cuda and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.precision=bf16 but this CUDA device has no bfloat16; use model.precision=fp32 or auto")
    if precision != "auto":
        return {"asked": precision, "runs": precision, "why": "asked"}
    if cuda:
        ok = torch.cuda.is_bf16_supported()
        return {"asked": "auto", "runs": "bf16" if ok else "fp32",
                "why": "CUDA device with bfloat16" if ok else "CUDA device without bfloat16"}
    native = cpu_bf16() if kind == "cpu" else None
    return {"asked": "auto", "runs": "fp32", "why": f"{kind}: auto is fp32 off CUDA" + (
        f" (this CPU has native bf16, {native}: model.precision=bf16 uses it)" if native else "")}


class Embedding(nn.Module):
    """Token embedding plus (optionally) learned absolute positions: everything below layer 1."""

    def __init__(self, vocab_size: int, dim: int, max_seq_len: int, pos: str, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_seq_len, dim) if pos == "learned" else None
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)  # (B, T, C)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.drop(x)


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int, kind: str, dropout: float):
        super().__init__()
        hidden = mult * dim
        self.kind = kind
        self.fc = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden) if kind == "swiglu" else None
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.drop(self.proj(F.silu(self.gate(x)) * self.fc(x)))
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Layer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, num_heads, norm, ffn, ffn_mult, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = make_norm(norm, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm2 = make_norm(norm, dim)
        self.mlp = MLP(dim, ffn_mult, ffn, dropout)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hd)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=2)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.resid_drop(self.attn_out(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.mlp(self.norm2(x))

    def forward_routed(self, x: torch.Tensor, hard: torch.Tensor, policy: str, rope=None,
                       capacity: Optional[int] = None) -> torch.Tensor:
        """This layer for hard tokens (B, T) only; easy tokens keep their state (`lego.routed_layer`)."""
        return layer_routed(self, x, hard, policy, rope, capacity)


@dataclass(frozen=True)
class ModelArgs:
    """Everything that fixes a model's weights and their meaning (stored in every checkpoint as `model_args`).

    vocab_size, dim, num_layers, num_heads: the shape (`dim % num_heads == 0`); max_seq_len: the longest sequence
    the position tables cover; norm / pos / ffn: "layernorm"|"rmsnorm", "learned"|"rope", "gelu"|"swiglu";
    exit_head / exit_rank: "separate"|"tied"|"lowrank" vocabulary heads and a low-rank one's rank (`lego.heads`;
    tied heads share `output_head.proj`, which freezes with Block 1); precision: "fp32"|"bf16", the autocast
    every forward runs under (weights stay float32); exits: the layers (1-based, increasing, below num_layers)
    whose states a head reads for an early exit, one per Block boundary of a grown model (empty: a plain LM);
    deep_head: the layers above the first exit read heads of their own (`lego.ashem.grow`).
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    max_seq_len: int = 512
    dropout: float = 0.0
    norm: str = "layernorm"
    pos: str = "learned"
    ffn: str = "gelu"
    ffn_mult: int = 4
    exit_head: str = "separate"
    exit_rank: Optional[int] = None
    precision: str = "fp32"
    exits: Tuple[int, ...] = ()
    deep_head: bool = False

    def __post_init__(self):
        object.__setattr__(self, "exits", tuple(int(e) for e in self.exits))
        for key in ("vocab_size", "num_layers"):
            check_positive(key, getattr(self, key))
        check_model(self.model_config)
        check_choice("precision", self.precision, PRECISIONS)
        e = self.exits
        if e and not 1 <= e[0] < self.num_layers:
            raise ConfigError(f"exit_layer={e[0]} must be in [1, num_layers) = [1, {self.num_layers})")
        if any(b <= a for a, b in zip(e, e[1:])) or (e and e[-1] >= self.num_layers):
            raise ConfigError(f"exit_layers={list(e)} must increase and stay below num_layers={self.num_layers}")
        if self.deep_head and not e:
            raise ConfigError("deep_head=True needs exit_layer")

    @property
    def model_config(self) -> ModelConfig:
        """The `model` group's values for this shape."""
        return ModelConfig(dim=self.dim, num_heads=self.num_heads, max_seq_len=self.max_seq_len, dropout=self.dropout,
                           norm=self.norm, pos=self.pos, ffn=self.ffn, ffn_mult=self.ffn_mult,
                           precision=self.precision, exit_head=self.exit_head, exit_rank=self.exit_rank)

    @classmethod
    def from_config(cls, config: ModelConfig, vocab_size: int, num_layers: int, **more) -> "ModelArgs":
        """The arguments of a model of the `model` group's shape (`config.precision` resolved to fp32 or bf16)."""
        return cls(vocab_size, config.dim, num_layers, config.num_heads, max_seq_len=config.max_seq_len,
                   dropout=config.dropout, norm=config.norm, pos=config.pos, ffn=config.ffn, ffn_mult=config.ffn_mult,
                   exit_head=config.exit_head, exit_rank=config.exit_rank, precision=config.precision, **more)


class Model(nn.Module):
    """Causal decoder LM whose hidden state can be read out at any layer, with a head at each exit.

    A plain LM built from its arguments (`Model(ModelArgs(...))`): it holds weights only. How tokens route
    (thresholds, confidence measure, upper-context policy, a learned router) is a `lego.config.Routing` value
    that routed evaluation and decoding take at call time; the layers take the policy per call (`run_layers`).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        a = args
        self.embedding = Embedding(a.vocab_size, a.dim, a.max_seq_len, a.pos, a.dropout)
        self.layers = nn.ModuleList(Layer(a.dim, a.num_heads, a.norm, a.ffn, a.ffn_mult, a.dropout)
                                    for _ in range(a.num_layers))
        rank = a.exit_rank if a.exit_head == "lowrank" else None
        self.output_head = make_head(a.dim, a.vocab_size, a.norm, rank)

        def head():  # every head after the first: tied ones share its projection
            tied = self.output_head.proj if a.exit_head == "tied" else None
            return make_head(a.dim, a.vocab_size, a.norm, rank, tied)

        # exit_heads[j]: the head of exit j + 2 (the head its Block trained with); empty for two Blocks
        self.exit_heads = nn.ModuleList(head() for _ in a.exits[1:] if a.deep_head)
        self.deep_head = head() if a.deep_head else None
        if a.pos == "rope":
            cos, sin = rope_tables(a.max_seq_len, a.dim // a.num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.apply(self._init_weights)

    # the shape, read from the arguments
    vocab_size = property(lambda self: self.args.vocab_size)
    dim = property(lambda self: self.args.dim)
    num_layers = property(lambda self: self.args.num_layers)
    num_heads = property(lambda self: self.args.num_heads)
    max_seq_len = property(lambda self: self.args.max_seq_len)
    precision = property(lambda self: self.args.precision)
    config = property(lambda self: self.args.model_config)

    @property
    def exit_layers(self) -> List[int]:
        """Every exit, in order (empty for a plain LM)."""
        return list(self.args.exits)

    @property
    def exit_layer(self) -> Optional[int]:
        """The first exit (where Block 1 ends); None for a plain LM."""
        return self.args.exits[0] if self.args.exits else None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def autocast(self) -> torch.autocast:
        """The context every forward of this model runs in: bf16 autocast on the parameters'
        device when `precision == "bf16"`, else disabled (plain float32). Wrap the forward, not
        the backward; cast logits `.float()` before softmax or cross entropy."""
        device = next(self.parameters()).device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # -- pieces ----------------------------------------------------------------------------
    @property
    def rope(self):
        return None if self.rope_cos is None else (self.rope_cos, self.rope_sin)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> layer-0 state (B, T, C)."""
        if idx.shape[1] > self.max_seq_len:
            raise ConfigError(f"sequence length {idx.shape[1]} exceeds max_seq_len={self.max_seq_len}")
        return self.embedding(idx)

    def run_layers(self, h: torch.Tensor, start: int, end: int, hard: Optional[torch.Tensor] = None,
                   policy: str = "full", capacity: Optional[int] = None) -> torch.Tensor:
        """Run layers start+1 .. end (1-based) on the state after layer `start`.

        With `hard` (B, T) bool and a policy other than "full" (`Routing.policy`), only hard tokens are computed
        (see `Layer.forward_routed`); easy tokens leave with their input state. With `capacity`
        (slots per row), at most that many hard tokens per row run, in static shapes without a host
        sync; the rest keep their state (`lego.routed_layer.capacity_mask` counts them).
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range ({start}, {end}] is outside 0..{self.num_layers}")
        check_choice("upper_context", policy, UPPER_CONTEXTS)  # forward_routed treats any unknown name as skip
        routed = hard is not None and policy != "full"
        for layer in self.layers[start:end]:
            h = layer.forward_routed(h, hard, policy, self.rope, capacity) if routed else layer(h, self.rope)
        return h

    def head_for(self, layer: int) -> nn.Module:
        """The head that reads layer `layer`: with deep heads, the head of the first exit at or above it
        (`output_head` up to the first exit, `exit_heads[j]` up to exit j + 2), above the last exit the deep head."""
        if self.deep_head is None or layer <= self.exit_layer:
            return self.output_head
        for exit_layer, head in zip(self.exit_layers[1:], self.exit_heads):
            if layer <= exit_layer:
                return head
        return self.deep_head

    def logits_at(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.head_for(layer)(h)

    def hidden_states(self, idx: torch.Tensor, upto: Optional[int] = None) -> List[torch.Tensor]:
        """[state after layer 0 (embedding), after layer 1, ..., after layer `upto`]."""
        upto = self.num_layers if upto is None else upto
        with self.autocast():
            states = [self.embed(idx)]
            for i in range(upto):
                states.append(self.run_layers(states[-1], i, i + 1))
        return states

    def forward(self, idx: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """Logits (B, T, V) at `layer` (default: the last), every token through every layer."""
        layer = self.num_layers if layer is None else layer
        with self.autocast():
            return self.logits_at(self.run_layers(self.embed(idx), 0, layer), layer)

    def compile_blocks(self, **compile_kwargs) -> "Model":
        """torch.compile each layer, the embedding and the heads in place; returns self.

        Not `torch.compile(model)`: training, calibration and routing call `embed`,
        `run_layers` and `logits_at`, never the model's `forward`, so a compiled wrapper would
        run nothing compiled. Compiled parts keep their parameters and state-dict keys, so
        checkpoints are the same as eager ones. `forward_routed` (dynamic token counts) stays eager.
        """
        for module in (self.embedding, *self.layers, self.output_head, *self.exit_heads, self.deep_head):
            if module is not None:
                module.compile(**compile_kwargs)
        return self


def DeepSupervisionTransformer(
    vocab_size: int,
    dim: int,
    num_layers: int,
    num_heads: int,
    exit_layer: Optional[int] = None,
    routing_threshold: Optional[float] = None,
    max_seq_len: int = 512,
    dropout: float = 0.0,
    *,
    norm: str = "layernorm",
    pos: str = "learned",
    ffn: str = "gelu",
    ffn_mult: int = 4,
    deep_head: bool = False,
    upper_context: str = "full",
    confidence: str = "max_prob",
    precision: str = "fp32",
    exit_layers: Optional[Sequence[int]] = None,
    routing_thresholds: Optional[Sequence[Optional[float]]] = None,
    exit_head: str = "separate",
    exit_rank: Optional[int] = None,
) -> Model:
    """The specification's constructor: a `Model` with exits at `exit_layer` (or every layer of `exit_layers`).

    Its routing keywords (`routing_threshold` / `routing_thresholds`, `upper_context`, `confidence`) are
    checked and returned as `model.routing`, a `lego.config.Routing` to pass where a routed call takes one
    (`generate(..., routing=model.routing)`); the model itself does not read them. As the specification
    does, `Trainer.evaluate` routes by its `TrainingConfig`.
    """
    exits = list(exit_layers) if exit_layers is not None else [] if exit_layer is None else [exit_layer]
    if exit_layer is not None and exits[:1] != [exit_layer]:
        raise ConfigError(f"exit_layer={exit_layer} must be the first of exit_layers={exits}")
    thresholds = list(routing_thresholds) if routing_thresholds is not None else [routing_threshold]
    if routing_thresholds is not None and routing_threshold is not None and thresholds[0] != routing_threshold:
        raise ConfigError(f"routing_threshold={routing_threshold} must be the first of "
                          f"routing_thresholds={thresholds}")
    if routing_thresholds is not None and len(thresholds) != len(exits):
        raise ConfigError(f"routing_thresholds={thresholds} needs one entry per exit of exit_layers={exits}")
    model = Model(ModelArgs(vocab_size, dim, num_layers, num_heads, max_seq_len=max_seq_len, dropout=dropout,
                            norm=norm, pos=pos, ffn=ffn, ffn_mult=ffn_mult, exit_head=exit_head, exit_rank=exit_rank,
                            precision=precision, exits=tuple(exits), deep_head=deep_head))
    calibrated = [t for t in thresholds if t is not None]
    model.routing = Routing(tuple(calibrated[:len(exits)]), upper_context, confidence)
    return model
