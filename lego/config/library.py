"""The library's training controls (SPEC section 2): where the loss is taken and how tokens route."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from lego.config.values import IGNORE_INDEX


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
