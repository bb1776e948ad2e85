"""The honest comparison (SPEC section 6): what the ASHEM pipeline spent in training, dense models of
every depth trained on the same budget, and the verdict at equal inference and training compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from lego.artifacts import read_json
from lego.config import ASHEMConfig, block_layers
from lego.cost import dense_training_macs, forward_macs_per_token, mining_macs, steps_for_macs
from lego.stages.setup import Loaders, budget_steps, epoch_steps, model_macs
from lego.stages.standard import window_positions

PIPELINE = ("phase1", "mining", "phase2")
RECORDED = ("steps", "budget_steps", "tokens", "train_s", "train_macs", "epochs_run", "stopped_early", "last_lr",
            "validations", "val_macs", "converged", "last_fifth_gain", "budget_macs", "rest_macs", "step_macs",
            "tokens_per_s", "model_tflops_per_s", "mfu", "peak_memory_bytes")


def positions(tokens, seq_len: int) -> int:
    """Input positions of a split cut into windows of seq_len + 1 tokens (what a pass over it runs on)."""
    return (len(tokens) // (seq_len + 1)) * seq_len


def stage_record(stage_dir: Path) -> Dict[str, Any]:
    """Steps, budget, tokens, seconds, training MACs, validation passes and convergence from a stage's result.json."""
    result = read_json(stage_dir / "result.json")
    return {k: result[k] for k in RECORDED if k in result}


def pipeline_names(cfg: ASHEMConfig) -> List[str]:
    """The pipeline's training stages: phase1, mining, phase2, then block3, block4, ... for more Blocks."""
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
    shape = model_macs(cfg, vocab_size)

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
    out = {"phase1": stage_record(run_dir / "phase1"), "mining": mining_compute(cfg, loaders, vocab_size),
           **{name: stage_record(run_dir / name) for name in pipeline_names(cfg)[2:]}}
    out["total"] = {k: sum(out[s].get(k, 0) for s in pipeline_names(cfg))
                    for k in ("steps", "tokens", "train_s", "train_macs", "val_macs")}
    return out


def dense_depths(cfg: ASHEMConfig) -> List[int]:
    """The dense frontier's depths: every Block boundary of the resolved `blocks`, and eval.dense_depths."""
    return sorted({*(cfg.eval.dense_depths or ()), *block_layers(cfg)})


def dense_budget(cfg: ASHEMConfig, loaders: Loaders, vocab_size: int, depth: int,
                 compute: Dict[str, Any]) -> Dict[str, Any]:
    """The optimizer steps that give a dense `depth`-layer model the budget `eval.baseline_budget` asks: the
    pipeline's training MACs to the nearest step (matched: within half of one of its steps, `steps_for_macs`),
    the pipeline's optimizer steps (steps), or phase 1's budget (phase1). Returns steps, budget_macs (matched:
    the pipeline's total) and step_macs."""
    step_macs = dense_training_macs(tokens=cfg.data.batch_size * cfg.data.seq_len * cfg.phase1.grad_accum,
                                    num_layers=depth,
                                    **model_macs(cfg, vocab_size))
    budget = cfg.eval.baseline_budget
    if budget == "phase1":
        steps = budget_steps(cfg.phase1, epoch_steps(loaders.train, cfg.phase1)[1])
    elif budget == "steps":
        steps = sum(compute[name]["steps"] for name in pipeline_names(cfg) if name != "mining")
    else:
        steps = steps_for_macs(compute["total"]["train_macs"], step_macs)
    return {"steps": steps, "budget_macs": compute["total"]["train_macs"] if budget == "matched" else steps * step_macs,
            "step_macs": step_macs}


def inference_cost(cfg: ASHEMConfig, vocab_size: int, depth: int) -> float:
    """A dense `depth`-layer model's forward MACs per token over the full `phase2.layers` model's."""
    shape = model_macs(cfg, vocab_size)
    return (forward_macs_per_token(num_layers=depth, **shape)
            / forward_macs_per_token(num_layers=cfg.phase2.layers, **shape))


def pareto(points: List[tuple]) -> List[tuple]:
    """The points (cost, ppl, ...) that no cheaper point beats on ppl: the dense frontier proper. A deeper dense
    model that scores worse than a shallower one at the same training budget is off it (the shallow one is both
    cheaper and better). Items past the first two ride along (e.g. the test ppl of a point chosen on validation)."""
    out: List[tuple] = []
    for point in sorted(points):
        if not out or point[1] < out[-1][1]:
            out.append(point)
    return out


def interpolate(points: List[tuple], x: float, value: int = 1) -> Dict[str, Any]:
    """The dense frontier's ppl at inference cost `x`: item `value` of its Pareto points (`pareto`, chosen on
    item 1), linear between them; past the dearest, the dearest's (a model costing more does no better than
    it); below the cheapest, the cheapest's, flagged (no dense model is that cheap)."""
    pts = pareto(points)
    if x <= pts[0][0]:
        return {"ppl": pts[0][value], "where": "below the frontier's cheapest model" if x < pts[0][0] else "on it"}
    if x >= pts[-1][0]:
        return {"ppl": pts[-1][value], "where": "on it" if x == pts[-1][0] else "at or beyond its dearest point"}
    for a, b in zip(pts, pts[1:]):
        if a[0] <= x <= b[0]:
            return {"ppl": a[value] + (b[value] - a[value]) * (x - a[0]) / (b[0] - a[0]), "where": "interpolated"}
    raise AssertionError("unreachable")


def gap(routed_ppl: float, dense_ppl: float) -> float:
    """How much worse (+) or better (-) the routed model's perplexity is, in percent of the dense one's."""
    return 100 * (routed_ppl / dense_ppl - 1)


def verdict(metrics: Dict[str, Any], budget: str) -> Dict[str, Any]:
    """The routed model against the dense frontier at its realized inference cost (flop_cost), and at the same
    training budget against the dense full-depth model and the best dense model of any depth.

    Nothing is chosen on the reported split (SPEC section 6): the frontier's Pareto points and the best dense
    model are chosen on each dense model's validation perplexity (`val_ppl`), and the perplexities reported for
    them are on the evaluated split (`ppl`)."""
    routed = metrics["ashem"]
    dense = metrics["dense"]
    points = [(d["inference_cost"], d["val_ppl"], d["ppl"], int(depth)) for depth, d in dense.items()]
    at = interpolate(points, routed["flop_cost"], value=2)
    out = {"chosen_on": "validation", "frontier_depths": [p[3] for p in pareto(points)],
           "inference": {"cost": routed["flop_cost"], "routed_ppl": routed["ppl"], "dense_ppl": at["ppl"],
                         "gap_pct": gap(routed["ppl"], at["ppl"]), "where": at["where"]}}
    full = dense.get(str(metrics["num_layers"]))
    best_depth = min(dense, key=lambda d: dense[d]["val_ppl"])
    out["training"] = {"budget": budget, "routed_ppl": routed["ppl"],
                       "ashem_train_macs": metrics["train_compute"]["total"]["train_macs"],
                       "best_depth": int(best_depth), "best_ppl": dense[best_depth]["ppl"],
                       "best_gap_pct": gap(routed["ppl"], dense[best_depth]["ppl"])}
    if full is not None:
        out["training"].update(dense_ppl=full["ppl"], gap_pct=gap(routed["ppl"], full["ppl"]),
                               dense_train_macs=full.get("train_macs"))
    out["line"] = verdict_line(out, metrics["num_layers"])
    return out


def verdict_line(v: Dict[str, Any], depth: int) -> str:
    """The final table's last line: plain words, both comparisons, signed gaps (+ = routed is worse)."""
    inf, tr = v["inference"], v["training"]
    where = "" if inf["where"] in ("interpolated", "on it") else f" ({inf['where']})"
    line = (f"At its realized inference cost ({inf['cost']:.3f} of the dense {depth}-layer model), routed test ppl "
            f"{inf['routed_ppl']:.2f} against the dense frontier's {inf['dense_ppl']:.2f}{where}: "
            f"{inf['gap_pct']:+.1f}%.")
    what = "equal training compute" if tr["budget"] == "matched" else f"the '{tr['budget']}' training budget"
    line += f" At {what}: "
    if "dense_ppl" in tr:
        line += f"the dense {depth}-layer model {tr['dense_ppl']:.2f} ({tr['gap_pct']:+.1f}%), "
    line += (f"the best dense model on validation ({tr['best_depth']} layers) {tr['best_ppl']:.2f} "
             f"({tr['best_gap_pct']:+.1f}%).")
    return line
