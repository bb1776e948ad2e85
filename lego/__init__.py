"""LEGO: layered Transformer LMs with confidence-routed early exit (ASHEM).

The public API follows the original specification (see SPEC.md): build a model, train Block 1
with `Trainer`, mine hard tokens with `compute_confidence_threshold` / `collect_hard_examples`,
grow the model and train the upper Block with `train_upper_layers`, evaluate with routing.
"""

__version__ = "0.1.0"

from lego.ashem import (
    CONFIDENCE_MEASURES,
    collect_hard_examples,
    compute_confidence,
    compute_confidence_threshold,
    confidence_from_logits,
    create_hard_example_loader,
    evaluate_on_hard_examples,
    exact_quantile,
    train_upper_layers,
)
from lego.model import DeepSupervisionTransformer
from lego.training import StageConfig, Trainer, TrainingConfig, create_standard_config

__all__ = [
    "CONFIDENCE_MEASURES", "DeepSupervisionTransformer", "StageConfig", "Trainer", "TrainingConfig",
    "collect_hard_examples", "compute_confidence", "compute_confidence_threshold", "confidence_from_logits",
    "create_hard_example_loader", "create_standard_config", "evaluate_on_hard_examples", "exact_quantile",
    "train_upper_layers",
]
