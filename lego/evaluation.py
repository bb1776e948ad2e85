"""Routed evaluation: the specification's metrics with cascaded routing, in one pass per batch.

    stats = evaluate(TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=t, exit_layer=2),
                     model, test_loader, "cpu")   # acc, ppl, shallow_ratio, compute_cost, exits, ...
    stats = evaluate(TrainingConfig(stages=[StageConfig((6, 6))], exit_layers=[2, 4], routing_thresholds=[t1, t2]),
                     model, test_loader, "cpu")   # three Blocks: a token stops at the first confident exit

`Trainer.evaluate` is this function with the trainer's config.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from lego import distributed
from lego.config import IGNORE_INDEX, TrainingConfig
from lego.confidence import token_stats
from lego.progress import progress as show_progress


def summarize(nll_sum: float, correct: float, n_tokens: int, n_easy, exit_layer, num_layers: int) -> Dict[str, float]:
    """The specification's four numbers from token totals (SPEC section 3).

    `n_easy` tokens stopped at `exit_layer`; with several exits both are lists (tokens stopping at
    each exit, its layer) and compute_cost is the mean number of layers run over `num_layers`."""
    if n_tokens == 0:
        raise ValueError("loader: no tokens to evaluate (empty loader or all targets ignored)")
    counts = list(n_easy) if isinstance(n_easy, (list, tuple)) else [n_easy]
    exit_layer = num_layers if exit_layer is None else exit_layer
    layers = list(exit_layer) if isinstance(exit_layer, (list, tuple)) else [exit_layer]
    n_hard = n_tokens - sum(counts)
    return {
        "acc": correct / n_tokens,
        "ppl": math.exp(nll_sum / n_tokens),
        "loss": nll_sum / n_tokens,
        "shallow_ratio": sum(counts) / n_tokens,
        "compute_cost": (sum(c * lay for c, lay in zip(counts, layers)) + n_hard * num_layers)
        / (n_tokens * num_layers),
        "n_tokens": n_tokens,
    }


def routed_metrics(nll: float, correct: float, n_tokens: int, n_easy, nll_exit: float, correct_exit: float,
                   nll_hard_deep: float, *, threshold: float, exit_layer, num_layers: int) -> Dict[str, float]:
    """`summarize` plus what a router reports: the first exit alone on every token (exit_acc,
    exit_ppl), the last layer on the tokens that reach it (hard_deep_ppl), and the first threshold.
    With several exits `n_easy` and `exit_layer` are lists, as in `summarize`."""
    out = summarize(nll, correct, n_tokens, n_easy, exit_layer, num_layers)
    n_hard = n_tokens - (sum(n_easy) if isinstance(n_easy, (list, tuple)) else n_easy)
    exit_layer = exit_layer[0] if isinstance(exit_layer, (list, tuple)) else exit_layer
    out.update({
        "exit_acc": correct_exit / n_tokens,
        "exit_ppl": math.exp(nll_exit / n_tokens),
        "hard_deep_ppl": math.exp(nll_hard_deep / n_hard) if n_hard else float("nan"),
        "threshold": float(threshold),
        "exit_layer": exit_layer,
        "num_layers": num_layers,
    })
    return out


def cascade_exits(model, inputs: torch.Tensor, exit_layers: Sequence[int], thresholds: Sequence[float], measure: str,
                  *, valid: torch.Tensor, targets: Optional[torch.Tensor] = None, ignore_index: int = IGNORE_INDEX,
                  policy: str = "full", probe=None):
    """Run `inputs` (B, T) up the cascade, exit by exit, under the model's precision.

    At each exit the head's `token_stats` (conf, and nll/pred with `targets`) are taken over every
    position, exactly as calibration and mining compute them; the layers between two exits run
    the tokens that reached the upper one under `policy` (`Model.run_layers`).
    `thresholds` may be one shorter than `exit_layers` (the last exit not yet calibrated). A learned router
    (`probe`, on the first exit's state) replaces `measure` at the first exit.
    Returns (state after the last exit (B, T, C), one dict per exit {'layer', 'stats', 'reach': the
    counted tokens that got there, 'stop': those predicted there (None without a threshold)},
    the counted tokens that continue past the last thresholded exit).
    """
    h, start, reach, passes = None, 0, valid, []
    with model.autocast():
        h = model.embed(inputs)
    for j, layer in enumerate(exit_layers):
        with model.autocast():
            h = model.run_layers(h, start, layer, hard=None if j == 0 else reach, policy=policy)
            logits = model.logits_at(h, layer)  # (B, T, V)
        learned = probe if j == 0 else None  # a learned router reads the state
        st = token_stats(logits, targets, None if learned is not None else measure, ignore_index)
        if learned is not None:
            st["conf"] = learned(h)
        stop = (st["conf"] >= thresholds[j]) & reach if j < len(thresholds) else None
        passes.append({"layer": layer, "stats": st, "reach": reach, "stop": stop})
        if stop is not None:
            reach = reach & ~stop
        start = layer
    return h, passes, reach


@torch.no_grad()
def evaluate(config: TrainingConfig, model, loader: Iterable, device, *, progress: bool = True,
             progress_interval_s: float = 30.0) -> Dict[str, float]:
    """acc, ppl, shallow_ratio, compute_cost (+ per-exit extras) in one pass per batch.

    With `routing_threshold` and `exit_layer` (or `exit_layers` and `routing_thresholds`): a token
    is predicted at the first exit where its confidence is >= that exit's threshold, the others at
    the last layer; deep logits are computed only for those. The layers above an exit treat easy tokens as
    `upper_context` says (None: full), and a `router_probe` replaces `confidence` at the first exit.
    shallow_ratio is the share predicted
    before the last layer, compute_cost the mean number of layers run over the last layer's, and
    `exits` one row per exit (`exit_table`). Without routing: plain metrics at the last stage layer.
    Under torch.distributed each rank passes its shard and gets the metrics of all shards.
    """
    cfg, device = config, torch.device(device)
    model.eval()
    deep = cfg.last_layer or model.num_layers
    if deep > model.num_layers:
        raise ValueError(f"stage layer {deep} exceeds the model's {model.num_layers} layers")
    exits = list(cfg.exit_layers) if cfg.exit_layers else [] if cfg.exit_layer is None else [cfg.exit_layer]
    thresholds = list(cfg.routing_thresholds) if cfg.routing_thresholds else [cfg.routing_threshold]
    if cfg.exit_layer is not None and exits[0] != cfg.exit_layer:
        raise ValueError(f"exit_layer={cfg.exit_layer} must be the first of exit_layers={exits}")
    routed = bool(exits) and len(thresholds) == len(exits) and None not in thresholds
    if exits and (not 1 <= exits[0] or exits[-1] >= deep or any(b <= a for a, b in zip(exits, exits[1:]))):
        raise ValueError(f"exit_layers={exits} must increase within [1, {deep})")
    exit_layer = exits[0] if routed else deep
    policy = cfg.upper_context or "full"
    nll = correct = n_tok = 0.0
    nll_exit = correct_exit = nll_hard_deep = 0.0
    K = len(exits) if routed else 0
    n_stop, nll_stop, ok_stop = [0.0] * (K + 1), [0.0] * (K + 1), [0.0] * (K + 1)  # per exit; [K]: the last layer
    for inputs, targets in show_progress(loader, desc="evaluate", interval_s=progress_interval_s,
                                         enabled=progress and distributed.is_main()):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        valid = targets != cfg.ignore_index
        if not routed:
            with model.autocast():
                h = model.run_layers(model.embed(inputs), 0, exit_layer)
                exit_logits = model.logits_at(h, exit_layer)
            st = token_stats(exit_logits, targets, None, cfg.ignore_index)
            nll += float(st["nll"].sum(dtype=torch.float64))  # 0 at ignored targets; float64: sums feed identities
            correct += float(((st["pred"] == targets) & valid).sum())
            n_tok += int(valid.sum())
            continue
        # One log-softmax of each exit's logits gives the routing confidence (bit-identical to
        # calibration's), that exit's NLL and its top-1.
        h, passes, hard = cascade_exits(model, inputs, exits, thresholds, cfg.confidence, valid=valid,
                                        targets=targets, ignore_index=cfg.ignore_index, policy=policy,
                                        probe=cfg.router_probe)
        batch_nll = batch_ok = 0
        for j, p in enumerate(passes):
            st, stop = p["stats"], p["stop"]
            ok = (st["pred"] == targets) & valid
            j_nll, j_ok = st["nll"][stop].sum(dtype=torch.float64), ok[stop].sum()
            batch_nll, batch_ok = (j_nll, j_ok) if j == 0 else (batch_nll + j_nll, batch_ok + j_ok)
            n_stop[j] += int(stop.sum())
            nll_stop[j] += float(j_nll)
            ok_stop[j] += float(j_ok)
            if j == 0:  # the first exit alone, on every token
                nll_exit += float(st["nll"].sum(dtype=torch.float64))
                correct_exit += float(ok.sum())
        with model.autocast():
            h_deep = model.run_layers(h, exits[-1], deep, hard=hard, policy=policy)
            deep_logits = model.logits_at(h_deep[hard], deep)  # the tokens that reach it only
        d_y = targets[hard]
        dp = token_stats(deep_logits, d_y, None)
        d_nll, d_ok = dp["nll"].sum(dtype=torch.float64), (dp["pred"] == d_y).sum()
        nll += float(batch_nll + d_nll)
        correct += float(batch_ok + d_ok)
        nll_hard_deep += float(d_nll)
        n_stop[K] += int(hard.sum())
        nll_stop[K] += float(d_nll)
        ok_stop[K] += float(d_ok)
        n_tok += int(valid.sum())
    if distributed.is_distributed():
        nll, correct, n_tok, nll_exit, correct_exit, nll_hard_deep, *per_exit = distributed.all_reduce_sum(
            [nll, correct, n_tok, nll_exit, correct_exit, nll_hard_deep, *n_stop, *nll_stop, *ok_stop])
        n_stop, nll_stop, ok_stop = (per_exit[i * (K + 1):(i + 1) * (K + 1)] for i in range(3))
    if not routed:
        return summarize(nll, correct, int(n_tok), 0, None, deep)
    counts = [int(c) for c in n_stop]
    out = routed_metrics(nll, correct, int(n_tok), counts[:K], nll_exit, correct_exit, nll_hard_deep,
                         threshold=thresholds[0], exit_layer=exits, num_layers=deep)
    if K > 1:
        out.update(exit_layers=exits, thresholds=[float(t) for t in thresholds])
    out["exits"] = exit_table(exits + [deep], counts, nll_stop, ok_stop, int(n_tok), [*thresholds, None])
    return out


def exit_table(layers: Sequence[int], counts: Sequence[int], nll: Sequence[float], correct: Sequence[float],
               n_tokens: int, thresholds: Sequence[Optional[float]]) -> List[Dict[str, Any]]:
    """Per exit (the last layer last): its layer and threshold, the share of tokens stopping there,
    and their accuracy and perplexity (NaN when none stops there)."""
    return [{"layer": lay, "threshold": None if t is None else float(t), "share": c / n_tokens, "n_tokens": c,
             "acc": ok / c if c else float("nan"), "ppl": math.exp(s / c) if c else float("nan")}
            for lay, c, s, ok, t in zip(layers, counts, nll, correct, thresholds)]
