"""The library's training controls (SPEC section 2): where the loss is taken and how tokens route."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Tuple

from lego.config.values import CONFIDENCE_MEASURES, IGNORE_INDEX, UPPER_CONTEXTS, check_choice


@dataclass
class StageConfig:
    """Loss at every layer in the inclusive range `layers` (mean over them), times `loss_weight`."""

    layers: Tuple[int, int]  # (first, last) layer, 1-based and inclusive: 1 <= first <= last <= the model's depth
    loss_weight: float = 1.0  # the term's weight in the summed loss: a number (1 = as is)

    def __post_init__(self):
        a, b = self.layers
        if not 1 <= a <= b:
            raise ValueError(f"StageConfig.layers={self.layers} must satisfy 1 <= start <= end")


@dataclass
class TrainingConfig:
    """Stages whose weighted losses add up, plus the inference-time routing controls."""

    stages: List[StageConfig] = field(default_factory=list)  # the loss terms, at least one to train or evaluate
    routing_threshold: Optional[float] = None  # confidence at exit_layer at or above which a token exits; None = none
    exit_layer: Optional[int] = None  # the layer (1-based, below the last) where easy tokens exit; None = no routing
    exit_layers: Optional[List[int]] = None  # every exit of a cascade (more than two Blocks); the first is exit_layer
    routing_thresholds: Optional[List[float]] = None  # their thresholds; the first is routing_threshold
    confidence: str = "max_prob"  # measure used by routing: one of CONFIDENCE_MEASURES
    upper_context: Optional[str] = None  # what layers above an exit do with easy tokens (UPPER_CONTEXTS); None = full
    router_probe: Any = None  # a learned router at the first exit (`lego.heads.RouterProbe`) in place of `confidence`
    grad_clip: Optional[float] = 1.0  # Trainer.train_epoch's largest gradient norm (L2); None or 0 = no clipping
    ignore_index: int = IGNORE_INDEX  # the target value no loss or metric counts

    @property
    def last_layer(self) -> Optional[int]:
        return max(s.layers[1] for s in self.stages) if self.stages else None


@dataclass(frozen=True)
class Routing:
    """How a model with exits routes, passed at call time (routed evaluation, decoding, the mining of a later
    Block): the model itself holds no routing state, so one model routes at any threshold or policy.

        routing = Routing((threshold,), policy="propagate")
        generate(model, prompts, max_new_tokens=32, decoder="routed", routing=routing)

    A token stops at the first exit (`model.exit_layers`, in order) where its confidence reaches that exit's
    threshold; the others go on to the last layer.
    """

    thresholds: Tuple[float, ...] = ()  # one per exit of the model, in order (a prefix: the exits calibrated so far)
    policy: str = "full"  # upper_context: full | propagate | skip (what layers above an exit do with easy tokens)
    measure: str = "max_prob"  # the confidence at every exit: max_prob | margin | entropy
    probe: Any = None  # a learned router at the first exit (`lego.heads.RouterProbe`), replacing `measure` there

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        check_choice("upper_context", self.policy, UPPER_CONTEXTS)
        check_choice("confidence", self.measure, CONFIDENCE_MEASURES)

    @property
    def threshold(self) -> Optional[float]:
        """The first exit's threshold (None: not calibrated)."""
        return self.thresholds[0] if self.thresholds else None

    def learned(self, probe: Any, threshold: float) -> "Routing":
        """The same routing with a learned router at the first exit, at `threshold` (the exits above unchanged)."""
        return replace(self, probe=probe, thresholds=(threshold, *self.thresholds[1:]))


def create_standard_config(num_layers: int) -> TrainingConfig:
    """A standard LM: one stage, loss at the last layer."""
    return TrainingConfig(stages=[StageConfig(layers=(num_layers, num_layers), loss_weight=1.0)])
