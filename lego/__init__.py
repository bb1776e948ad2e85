"""LEGO: layered Transformer LMs with confidence-routed early exit (ASHEM).

The public API follows the original specification (see SPEC.md): build a model (`Model(ModelArgs(...))`, or the
specification's `DeepSupervisionTransformer(...)`; routing is a `Routing` value given at call time), train Block 1
with `Trainer`, mine hard tokens with `compute_confidence_threshold` / `collect_hard_examples`,
grow the model and train the upper Block with `train_upper_layers`, evaluate with routing.
"""

__version__ = "0.1.0"

from lego.ashem import (collect_hard_examples, compute_confidence_threshold, evaluate_on_hard_examples,
                        train_upper_layers)
from lego.confidence import compute_confidence, confidence_from_logits, exact_quantile
from lego.config import (CONFIDENCE_MEASURES, ASHEMConfig, ConfigError, Routing, StageConfig, TrainingConfig,
                         create_standard_config)
from lego.model import DeepSupervisionTransformer, Model, ModelArgs
from lego.store import create_hard_example_loader
from lego.training import Trainer

__all__ = [
    "ASHEMConfig", "CONFIDENCE_MEASURES", "ConfigError", "DeepSupervisionTransformer", "Model", "ModelArgs", "Routing",
    "StageConfig", "Trainer", "TrainingConfig",
    "collect_hard_examples", "compute_confidence", "compute_confidence_threshold", "confidence_from_logits",
    "create_hard_example_loader", "create_standard_config", "evaluate_on_hard_examples", "exact_quantile",
    "train_upper_layers",
]
