"""Routed evaluation: the specification's metrics with two-stage routing, in one pass per batch.

    stats = evaluate(TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=t, exit_layer=2),
                     model, test_loader, "cpu")   # acc, ppl, shallow_ratio, compute_cost, ...

`Trainer.evaluate` is this function with the trainer's config.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch

from lego import distributed
from lego.config import TrainingConfig
from lego.confidence import token_stats
from lego.progress import progress as show_progress


def summarize(nll_sum: float, correct: float, n_tokens: int, n_easy: int, exit_layer: Optional[int],
              num_layers: int) -> Dict[str, float]:
    """The specification's four numbers from token totals (SPEC section 3)."""
    if n_tokens == 0:
        raise ValueError("loader: no tokens to evaluate (empty loader or all targets ignored)")
    n_hard = n_tokens - n_easy
    exit_layer = num_layers if exit_layer is None else exit_layer
    return {
        "acc": correct / n_tokens,
        "ppl": math.exp(nll_sum / n_tokens),
        "loss": nll_sum / n_tokens,
        "shallow_ratio": n_easy / n_tokens,
        "compute_cost": (n_easy * exit_layer + n_hard * num_layers) / (n_tokens * num_layers),
        "n_tokens": n_tokens,
    }


def routed_metrics(nll: float, correct: float, n_tokens: int, n_easy: int, nll_exit: float, correct_exit: float,
                   nll_hard_deep: float, *, threshold: float, exit_layer: int, num_layers: int) -> Dict[str, float]:
    """`summarize` plus what a two-exit router reports: the exit alone on every token
    (exit_acc, exit_ppl), the deep exit on the hard tokens (hard_deep_ppl), and the router."""
    out = summarize(nll, correct, n_tokens, n_easy, exit_layer, num_layers)
    n_hard = n_tokens - n_easy
    out.update({
        "exit_acc": correct_exit / n_tokens,
        "exit_ppl": math.exp(nll_exit / n_tokens),
        "hard_deep_ppl": math.exp(nll_hard_deep / n_hard) if n_hard else float("nan"),
        "threshold": float(threshold),
        "exit_layer": exit_layer,
        "num_layers": num_layers,
    })
    return out


@torch.no_grad()
def evaluate(config: TrainingConfig, model, loader: Iterable, device, *, progress: bool = True,
             progress_interval_s: float = 30.0) -> Dict[str, float]:
    """acc, ppl, shallow_ratio, compute_cost (+ per-exit extras) in one pass per batch.

    With `routing_threshold` and `exit_layer`: a token whose confidence at `exit_layer` is
    >= the threshold is predicted there, the others at the last layer; deep logits are
    computed only for those. Without routing: plain metrics at the last stage layer.
    Under torch.distributed each rank passes its shard and gets the metrics of all shards.
    """
    cfg, device = config, torch.device(device)
    model.eval()
    deep = cfg.last_layer or model.num_layers
    if deep > model.num_layers:
        raise ValueError(f"stage layer {deep} exceeds the model's {model.num_layers} layers")
    routed = cfg.exit_layer is not None and cfg.routing_threshold is not None
    if cfg.exit_layer is not None and not 1 <= cfg.exit_layer < deep:
        raise ValueError(f"exit_layer={cfg.exit_layer} must be in [1, {deep})")
    exit_layer = cfg.exit_layer if routed else deep
    policy = cfg.upper_context or getattr(model, "upper_context", "full")
    nll = correct = n_tok = n_easy = 0.0
    nll_exit = correct_exit = nll_hard_deep = 0.0
    for inputs, targets in show_progress(loader, desc="evaluate", interval_s=progress_interval_s,
                                         enabled=progress and distributed.is_main()):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        valid = targets != cfg.ignore_index
        with model.autocast():  # the precision calibration and mining ran under
            h = model.run_layers(model.embed(inputs), 0, exit_layer)
            exit_logits = model.logits_at(h, exit_layer).float()
        if not routed:
            st = token_stats(exit_logits, targets, None, cfg.ignore_index)
            nll += float(st["nll"].sum())  # 0 at ignored targets
            correct += float(((st["pred"] == targets) & valid).sum())
            n_tok += int(valid.sum())
            continue
        # One log-softmax of the exit logits gives the routing confidence (bit-identical to
        # calibration's), the exit's NLL and its top-1.
        ex = token_stats(exit_logits, targets, cfg.confidence, cfg.ignore_index)
        easy = (ex["conf"] >= cfg.routing_threshold) & valid
        hard = ~easy & valid
        with model.autocast():
            h_deep = model.run_layers(h, exit_layer, deep, hard=hard, policy=policy)
            deep_logits = model.logits_at(h_deep[hard], deep).float()  # hard positions only
        d_y = targets[hard]
        dp = token_stats(deep_logits, d_y, None)
        e_ok = (ex["pred"] == targets) & valid
        d_nll, d_ok = dp["nll"].sum(), (dp["pred"] == d_y).sum()
        nll += float(ex["nll"][easy].sum() + d_nll)
        correct += float(e_ok[easy].sum() + d_ok)
        nll_exit += float(ex["nll"].sum())
        correct_exit += float(e_ok.sum())
        nll_hard_deep += float(d_nll)
        n_tok += int(valid.sum())
        n_easy += int(easy.sum())
    if distributed.is_distributed():
        nll, correct, n_tok, n_easy, nll_exit, correct_exit, nll_hard_deep = distributed.all_reduce_sum(
            [nll, correct, n_tok, n_easy, nll_exit, correct_exit, nll_hard_deep])
    if not routed:
        return summarize(nll, correct, int(n_tok), 0, None, deep)
    return routed_metrics(nll, correct, int(n_tok), int(n_easy), nll_exit, correct_exit, nll_hard_deep,
                          threshold=cfg.routing_threshold, exit_layer=exit_layer, num_layers=deep)
