"""The honest comparison (SPEC section 6): what the ASHEM pipeline spent in training, dense models of
every depth trained on the same budget, and the verdict at equal inference and training compute."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from lego.artifacts import read_json
from lego.batches import EpochSteps
from lego.config import ASHEMConfig, block_layers
from lego.cost import dense_training_macs, forward_macs_per_token, mining_macs, steps_for_macs
from lego.data import Corpus
from lego.stages.setup import Loaders, model_macs

PIPELINE = ("phase1", "mining", "phase2")
RECORDED = ("steps", "tokens", "train_s", "train_macs", "epochs_run", "converged", "last_epoch_gain")


def positions(tokens, seq_len: int) -> int:
    """Input positions of a split cut into windows of seq_len + 1 tokens (what a pass over it runs on)."""
    return (len(tokens) // (seq_len + 1)) * seq_len


def stage_record(stage_dir: Path) -> Dict[str, Any]:
    """Steps, tokens, seconds, training MACs and convergence from a stage's result.json."""
    result = read_json(stage_dir / "result.json")
    return {k: result[k] for k in RECORDED if k in result}


def pipeline_names(cfg: ASHEMConfig) -> List[str]:
    """The pipeline's training stages: phase1, mining, phase2, then block3, block4, ... for more Blocks."""
    return [*PIPELINE, *(f"block{k + 1}" for k in range(2, len(block_layers(cfg))))]


def pipeline_compute(cfg: ASHEMConfig, corpus: Corpus, run_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Training compute of the ASHEM pipeline: phase 1 (forward + backward of every layer), mining
    (forward through the Blocks below each exit and its head: calibration, then mining the training and
    validation splits for the next Block), phase 2 and each later Block (trained on hard sequences), and
    their total."""
    T = cfg.data.seq_len
    calibration = corpus.validation if cfg.hard_examples.calibration_split == "validation" else corpus.train
    mined = positions(calibration, T) + positions(corpus.train, T) + positions(corpus.validation, T)
    exits = block_layers(cfg)[:-1]
    out = {"phase1": stage_record(run_dir / "phase1"),
           "mining": {"tokens": mined * len(exits),
                      "train_macs": sum(mining_macs(tokens=mined, exit_layer=e, **model_macs(cfg, corpus.vocab_size))
                                        for e in exits)},
           **{name: stage_record(run_dir / name) for name in pipeline_names(cfg)[2:]}}
    out["total"] = {k: sum(out[s].get(k, 0) for s in pipeline_names(cfg))
                    for k in ("steps", "tokens", "train_s", "train_macs")}
    return out


def dense_depths(cfg: ASHEMConfig) -> List[int]:
    """The dense frontier's depths: every Block boundary, and eval.dense_depths or else every depth from
    phase1.layers to phase2.layers."""
    depths = cfg.eval.dense_depths or range(cfg.phase1.layers, cfg.phase2.layers + 1)
    return sorted({*depths, *block_layers(cfg)})


def dense_epochs(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, depth: int, compute: Dict[str, Any]) -> int:
    """Epochs (of phase1.epoch_steps steps) that give a dense `depth`-layer model the budget
    `eval.baseline_budget` asks: the pipeline's training MACs (matched), its optimizer steps
    (steps), or phase 1's epochs (phase1). Rounded to whole epochs: within half an epoch."""
    p1 = cfg.phase1
    if cfg.eval.baseline_budget == "phase1":
        return p1.max_epochs
    per_epoch = len(EpochSteps(loaders.train, p1.epoch_steps))
    if cfg.eval.baseline_budget == "steps":
        steps = sum(compute[name]["steps"] for name in pipeline_names(cfg) if name != "mining")
    else:
        step_macs = dense_training_macs(tokens=cfg.data.batch_size * cfg.data.seq_len, num_layers=depth,
                                        **model_macs(cfg, corpus.vocab_size))
        steps = steps_for_macs(compute["total"]["train_macs"], step_macs)
    return max(1, math.floor(steps / per_epoch + 0.5))


def inference_cost(cfg: ASHEMConfig, vocab_size: int, depth: int) -> float:
    """A dense `depth`-layer model's forward MACs per token over the full `phase2.layers` model's."""
    shape = model_macs(cfg, vocab_size)
    return (forward_macs_per_token(num_layers=depth, **shape)
            / forward_macs_per_token(num_layers=cfg.phase2.layers, **shape))


def pareto(points: List[tuple]) -> List[tuple]:
    """The (cost, ppl) points no cheaper point beats: the dense frontier proper. A deeper dense model
    that scores worse than a shallower one at the same training budget is off it (the shallow one
    is both cheaper and better)."""
    out: List[tuple] = []
    for x, y in sorted(points):
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out


def interpolate(points: List[tuple], x: float) -> Dict[str, Any]:
    """The dense frontier's ppl at inference cost `x`: linear between its Pareto points (`pareto`);
    past the dearest, the dearest's (a model costing more does no better than it); below the
    cheapest, the cheapest's, flagged (no dense model is that cheap)."""
    pts = pareto(points)
    if x <= pts[0][0]:
        return {"ppl": pts[0][1], "where": "below the frontier's cheapest model" if x < pts[0][0] else "on it"}
    if x >= pts[-1][0]:
        return {"ppl": pts[-1][1], "where": "on it" if x == pts[-1][0] else "at or beyond its dearest point"}
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return {"ppl": y0 + (y1 - y0) * (x - x0) / (x1 - x0), "where": "interpolated"}
    raise AssertionError("unreachable")


def gap(routed_ppl: float, dense_ppl: float) -> float:
    """How much worse (+) or better (-) the routed model's perplexity is, in percent of the dense one's."""
    return 100 * (routed_ppl / dense_ppl - 1)


def verdict(metrics: Dict[str, Any], budget: str) -> Dict[str, Any]:
    """The routed model against the dense frontier at its realized inference cost (flop_cost), and at
    the same training budget against the dense full-depth model and the best dense model of any depth."""
    routed = metrics["ashem"]
    dense = metrics["dense"]
    at = interpolate([(d["inference_cost"], d["ppl"]) for d in dense.values()], routed["flop_cost"])
    out = {"inference": {"cost": routed["flop_cost"], "routed_ppl": routed["ppl"], "dense_ppl": at["ppl"],
                         "gap_pct": gap(routed["ppl"], at["ppl"]), "where": at["where"]}}
    full = dense.get(str(metrics["num_layers"]))
    best_depth = min(dense, key=lambda d: dense[d]["ppl"])
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
    line += f"the best dense model ({tr['best_depth']} layers) {tr['best_ppl']:.2f} ({tr['best_gap_pct']:+.1f}%)."
    return line
