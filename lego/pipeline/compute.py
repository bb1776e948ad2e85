"""What training cost (SPEC section 6): the shape arguments of `lego.cost` for a run (`cost_shape`), what the
ASHEM pipeline spent (each trained model's record, the mining passes, their total), the budget of a dense
baseline of any depth, and a dense model's inference cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from lego.artifacts import read_json
from lego.checkpoint import model_vocab_size
from lego.config import ASHEMConfig, block_layers
from lego.cost import dense_training_macs, forward_macs_per_token, mining_macs, steps_for_macs
from lego.pipeline.setup import Loaders
from lego.pipeline.train import phase1_budget_steps

PIPELINE = ("phase1", "mining", "phase2")
RECORDED = ("steps", "budget_steps", "tokens", "train_s", "train_macs", "epochs_run", "stopped_early", "last_lr",
            "validations", "val_macs", "converged", "last_fifth_gain", "budget_macs", "rest_macs", "step_macs",
            "tokens_per_s", "model_tflops_per_s", "mfu", "peak_memory_bytes")


def cost_shape(cfg: ASHEMConfig, vocab_size: int) -> Dict[str, Any]:
    """The shape arguments every `lego.cost` function takes, for this run's model; the heads count the padded
    vocabulary (`model.vocab_multiple`), as the model computes it."""
    m = cfg.model
    return dict(dim=m.dim, ffn_mult=m.ffn_mult, ffn=m.ffn, vocab_size=model_vocab_size(cfg, vocab_size),
                seq_len=cfg.data.seq_len, exit_rank=m.exit_rank if m.exit_head == "lowrank" else None)


def window_positions(loader, seq_len: int) -> int:
    """Input positions of one pass over a loader of token windows (every rank's share together)."""
    return len(loader.dataset) * seq_len


def training_record(out: Path) -> Dict[str, Any]:
    """Steps, budget, tokens, seconds, training MACs, validation passes and convergence from a trained model's
    result.json in `out`."""
    result = read_json(out / "result.json")
    return {k: result[k] for k in RECORDED if k in result}


def pipeline_names(cfg: ASHEMConfig) -> List[str]:
    """The parts of the pipeline's training compute: phase1, mining, phase2, then block3, block4, ... for more
    Blocks."""
    return [*PIPELINE, *(f"block{k + 1}" for k in range(2, len(block_layers(cfg))))]


def mining_compute(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int) -> Dict[str, Any]:
    """What the pipeline's forward passes through the exits cost, charged only where they run: for each exit, the
    threshold's calibration and the mining of the training split's hard sequences for the Block above it; under
    phase2.lower=finetune, calibration before phase 2 and again after it (no training-split mining runs).
    Mining the validation split's hard sequences (to validate phase 2) is a validation pass: `val_macs`, not
    training compute. Each pass is forward only, through the layers below its exit and the exit head."""
    T = cfg.data.seq_len
    calibration = window_positions(loaders.validation if cfg.hard_examples.calibration_split == "validation"
                                   else loaders.train_ordered, T)
    exits = block_layers(cfg)[:-1]
    if cfg.phase2.lower == "finetune":
        passes = [("calibration", calibration, exits[0]), ("recalibration", calibration, exits[0])]
        checks = []
    else:
        passes = [(what, n, e) for e in exits
                  for what, n in (("calibration", calibration), ("training-split mining",
                                                                  window_positions(loaders.train_ordered, T)))]
        checks = [("validation-split mining", window_positions(loaders.validation, T), e) for e in exits]
    shape = cost_shape(cfg, vocab_size)

    def rows(items):
        return [{"pass": what, "exit_layer": e, "tokens": n, "macs": mining_macs(tokens=n, exit_layer=e, **shape)}
                for what, n, e in items]

    runs, val = rows(passes), rows(checks)
    return {"tokens": sum(r["tokens"] for r in runs), "train_macs": sum(r["macs"] for r in runs), "passes": runs,
            "val_macs": sum(r["macs"] for r in val), "validation_passes": val}


def pipeline_compute(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int, run_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Training compute of the ASHEM pipeline: phase 1 (forward + backward of every layer), mining
    (`mining_compute`), phase 2 and each later Block (trained on hard sequences), and their total; validation
    passes (`val_macs`) are summed beside it, not in it."""
    out = {"phase1": training_record(run_dir / "phase1"), "mining": mining_compute(cfg, loaders, vocab_size),
           **{name: training_record(run_dir / name) for name in pipeline_names(cfg)[2:]}}
    out["total"] = {k: sum(out[s].get(k, 0) for s in pipeline_names(cfg))
                    for k in ("steps", "tokens", "train_s", "train_macs", "val_macs")}
    return out


def dense_depths(cfg: ASHEMConfig) -> List[int]:
    """The dense frontier's depths: every Block boundary of the resolved `blocks`, and eval.dense_depths."""
    return sorted({*(cfg.eval.dense_depths or ()), *block_layers(cfg)})


def pipeline_budget_macs(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int) -> float:
    """The pipeline's training budget under phase1.budget_fraction (and phase 1's own without it), in MACs:
    phase1.max_epochs x phase1.epoch_steps steps of a phase1.layers-layer model on data.batch_size x seq_len x
    phase1.grad_accum tokens each (`dense_training_macs`)."""
    step1 = dense_training_macs(tokens=cfg.data.batch_size * cfg.data.seq_len * cfg.phase1.grad_accum,
                                num_layers=cfg.phase1.layers, **cost_shape(cfg, vocab_size))
    return phase1_budget_steps(cfg, loaders) * step1


def dense_budget(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int, depth: int,
                 compute: Dict[str, Any]) -> Dict[str, Any]:
    """The optimizer steps that give a dense `depth`-layer model the budget `eval.baseline_budget` asks: the
    pipeline's training MACs to the nearest step (matched: within half of one of its steps, `steps_for_macs`),
    the pipeline's optimizer steps (steps), or phase 1's budget (phase1). Returns steps, budget_macs (matched:
    the pipeline's total) and step_macs."""
    step_macs = dense_training_macs(tokens=cfg.data.batch_size * cfg.data.seq_len * cfg.phase1.grad_accum,
                                    num_layers=depth,
                                    **cost_shape(cfg, vocab_size))
    budget = cfg.eval.baseline_budget
    if budget == "phase1":
        steps = phase1_budget_steps(cfg, loaders)
    elif budget == "steps":
        steps = sum(compute[name]["steps"] for name in pipeline_names(cfg) if name != "mining")
    else:
        steps = steps_for_macs(compute["total"]["train_macs"], step_macs)
    return {"steps": steps, "budget_macs": compute["total"]["train_macs"] if budget == "matched" else steps * step_macs,
            "step_macs": step_macs}


def inference_cost(cfg: ASHEMConfig, vocab_size: int, depth: int) -> float:
    """A dense `depth`-layer model's forward MACs per token over the full `phase2.layers` model's."""
    shape = cost_shape(cfg, vocab_size)
    return (forward_macs_per_token(num_layers=depth, **shape)
            / forward_macs_per_token(num_layers=cfg.phase2.layers, **shape))
