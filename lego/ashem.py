"""ASHEM: Adaptive Supervision via Hard Example Mining.

Phase 1 trains a shallow model on every token. Its confidence at the exit layer splits tokens
into easy (>= threshold, exit there) and hard (< threshold, continue). The threshold is the
exact `target_ratio` quantile of confidences on a calibration split. Phase 2 trains only the
upper Block of a grown model on the hard tokens, keeping their left context (SPEC section 4):

    threshold = compute_confidence_threshold(model, val_loader, target_ratio=0.5, device="cpu")
    hard = collect_hard_examples(model, train_loader, threshold, "cpu")
    big = grow(model, 4)                     # exits=(2,): Block 1 frozen, layers 3-4 fresh
    batches = create_hard_example_loader(hard, batch_size=64)
    loss = train_upper_layers(big, batches, optimizer, vocab_size, "cpu", num_lower_layers=2)
    stats = Trainer(TrainingConfig(stages=[StageConfig((4, 4))], routing_threshold=threshold, exit_layer=2),
                    device="cpu").evaluate(big, test_loader)
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from lego import distributed
from lego.confidence import IGNORE_INDEX, exact_quantile
from lego.config import PHASE2_INITS, STORE_DTYPES, STORES, check_choice, check_ratio
from lego.evaluation import cascade_exits
from lego.model import Model
from lego.progress import progress as show_progress
from lego.routed_layer import capacity_mask
from lego.store import STATE_DTYPES, HalfRowWriter, RowBuffer
from lego.training import train_epoch

log = logging.getLogger(__name__)



def _exit_layer(model, exit_layer: Optional[int]) -> int:
    if exit_layer is not None:
        return exit_layer
    return model.exit_layer if model.exit_layer is not None else model.num_layers


def _batches(batches: Iterable, name: str):
    """Yield (inputs, targets); fail with a clear message on an empty loader."""
    empty = True
    for batch in batches:
        empty = False
        yield batch[0], batch[1]
    if empty:
        raise ValueError(f"{name}: the loader yielded no batches")


@torch.no_grad()
def exit_states(model, inputs: torch.Tensor, exit_layer: int, measure: str, valid: torch.Tensor,
                thresholds: Sequence[float] = ()):
    """(hidden state after `exit_layer` (B, T, C), confidence there (B, T), the counted tokens that reach it (B, T)),
    under the model's precision. A token reaches it when no exit of `model` below it took it at that exit's entry of
    `thresholds` (`cascade_exits`): every counted token for Block 1's exit, and in a grown model the layers between
    exits run as routing runs them."""
    below = [e for e in model.exit_layers if e < exit_layer]
    if len(thresholds) < len(below):
        raise ValueError(f"exit_layer={exit_layer} lies above the exits {below}: thresholds={list(thresholds)} "
                         "needs one per exit below it")
    h, passes, _ = cascade_exits(model, inputs, [*below, exit_layer], list(thresholds)[:len(below)], measure,
                                 valid=valid)
    return h, passes[-1]["stats"]["conf"], passes[-1]["reach"]


@torch.no_grad()
def gather_confidences(model, batches: Iterable, device, *, exit_layer: Optional[int] = None,
                       measure: str = "max_prob", ignore_index: int = IGNORE_INDEX,
                       name: str = "val_batches", thresholds: Sequence[float] = ()) -> torch.Tensor:
    """Confidences at the exit layer of every counted token that reaches it (past the exits below it, at
    `thresholds`), flattened (float32, on CPU).

    Under torch.distributed each rank passes its shard of the batches and gets every rank's
    confidences (in rank order), so a quantile of them is the global one.
    """
    model.eval()
    layer = _exit_layer(model, exit_layer)
    out = RowBuffer()
    for inputs, targets in _batches(batches, name):
        valid = targets.to(device, non_blocking=True) != ignore_index
        _, conf, reach = exit_states(model, inputs.to(device, non_blocking=True), layer, measure, valid, thresholds)
        out.append(conf[reach])
    return distributed.all_gather_varlen(out.tensor(torch.empty(0)))


def compute_confidence_threshold(model, val_batches: Iterable, target_ratio: float, device="cpu", *,
                                 exit_layer: Optional[int] = None, measure: str = "max_prob",
                                 thresholds: Sequence[float] = ()) -> float:
    """Threshold below which a share `target_ratio` of tokens falls: the exact quantile of confidences.

    Tokens with confidence >= threshold are easy (exit early); the rest are hard. The exit
    layer defaults to the model's `exit_layer`, or its last layer for a phase-1 model; at a later
    exit of a grown model only the tokens that reach it (past the exits below, at `thresholds`) count.
    """
    check_ratio("target_ratio", target_ratio)
    conf = gather_confidences(model, val_batches, device, exit_layer=exit_layer, measure=measure,
                              thresholds=thresholds)
    return exact_quantile(conf, target_ratio)


@torch.no_grad()
def collect_hard_examples(model, batches: Iterable, threshold: float, device="cpu", *,
                          exit_layer: Optional[int] = None, measure: str = "max_prob",
                          thresholds: Sequence[float] = (), store: str = "memory", store_dir: Optional[str] = None,
                          ignore_index: int = IGNORE_INDEX, progress: bool = True,
                          progress_interval_s: float = 30.0, keep_easy: bool = False,
                          store_dtype: str = "float32") -> Dict[str, object]:
    """The sequences that hold at least one hard token, with their context. A hard token reaches the
    exit layer (no exit of `model` below it took it at its entry of `thresholds`) and its confidence there is below
    `threshold`.

    Returns {'inputs' (N, T) long, 'hidden_states' (N, T, C) exit-layer states or None,
    'targets' (N, T) with every easy position set to `ignore_index`, 'confidences' (N, T),
    'num_tokens', 'num_hard'}, and with `keep_easy` also 'all_targets' (N, T), the targets of
    every position (for phase2.loss_tokens=all|weighted; the rest is unchanged).
    `store`: "memory" keeps states in RAM as `store_dtype` (float32 | bfloat16 | float16), "disk" writes
    float16 states to a file in `store_dir` and reads rows back on demand (`HalfRows`),
    "recompute" keeps no states (the loader recomputes them through the frozen lower Block).
    """
    if store not in STORES:
        raise ValueError(f"store={store!r} is not allowed; choose one of {', '.join(STORES)}")
    check_choice("store_dtype", store_dtype, STORE_DTYPES)
    if store == "disk" and not store_dir:
        raise ValueError("store='disk' needs store_dir")
    model.eval()
    layer = _exit_layer(model, exit_layer)
    inputs_b, targets_b, conf_b, hidden_b, all_b = RowBuffer(), RowBuffer(), RowBuffer(), RowBuffer(), RowBuffer()
    disk, n_tok, n_hard = None, 0, 0
    shown = show_progress(_batches(batches, "batches"), desc="hard examples", interval_s=progress_interval_s,
                          total=len(batches) if hasattr(batches, "__len__") else None,
                          enabled=progress and distributed.is_main())
    for inputs, targets in shown:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        valid = targets != ignore_index
        h, conf, reach = exit_states(model, inputs, layer, measure, valid, thresholds)
        hard = (conf < threshold) & reach
        n_tok += int(valid.sum())
        n_hard += int(hard.sum())
        keep = hard.any(dim=1)
        if not keep.any():
            continue
        inputs_b.append(inputs[keep])
        targets_b.append(torch.where(hard, targets, torch.full_like(targets, ignore_index))[keep])
        conf_b.append(conf[keep])
        if keep_easy:
            all_b.append(targets[keep])
        if store == "memory":
            hidden_b.append(h[keep].to(STATE_DTYPES[store_dtype]))
        elif store == "disk":
            if disk is None:
                disk = HalfRowWriter(os.path.join(store_dir, "hidden_states.f16"), h.shape[1:])
            disk.append(h[keep])
    if not inputs_b.rows:
        log.warning("collect_hard_examples: no token fell below threshold %.6g", threshold)
    hidden = None
    if store == "memory" and hidden_b.rows:
        hidden = hidden_b.tensor(None)
    elif store == "disk" and disk is not None:
        hidden = disk.close()
    out = {
        "inputs": inputs_b.tensor(torch.empty(0, 0, dtype=torch.long)),
        "hidden_states": hidden,
        "targets": targets_b.tensor(torch.empty(0, 0, dtype=torch.long)),
        "confidences": conf_b.tensor(torch.empty(0, 0)),
        "num_tokens": n_tok,
        "num_hard": n_hard,
    }
    if keep_easy:
        out["all_targets"] = all_b.tensor(torch.empty(0, 0, dtype=torch.long))
    return out


def upper_states(model, batch_x: torch.Tensor, num_lower_layers: int) -> torch.Tensor:
    """States after the lower Block: stored ones as they are, or recomputed from token ids
    (under the model's precision, as mining computed the stored ones)."""
    if batch_x.dtype in (torch.int64, torch.int32):
        with torch.no_grad(), model.autocast():
            was = [m.training for m in model.layers[:num_lower_layers]]
            model.embedding.eval()
            for m in model.layers[:num_lower_layers]:
                m.eval()
            h = model.run_layers(model.embed(batch_x), 0, num_lower_layers)
            for m, w in zip(model.layers[:num_lower_layers], was):
                m.train(w)
        return h
    return batch_x.float()


def upper_logits(model, h: torch.Tensor, targets: torch.Tensor, num_lower_layers: int,
                 ignore_index: int = IGNORE_INDEX, policy: str = "full", capacity: Optional[int] = None):
    """Deep-exit logits at the hard positions only (N_hard, V) float32, under the model's
    precision, and their targets (N_hard,). With `capacity` (propagate or skip) the upper layers run each row's
    first `capacity` hard tokens in fixed shapes (`lego.routed_layer.capacity_mask`); the others are left out."""
    hard = targets != ignore_index
    if capacity is not None:
        hard, _ = capacity_mask(hard, capacity)
    with model.autocast():
        h = model.run_layers(h, num_lower_layers, model.num_layers, hard=hard, policy=policy, capacity=capacity)
        logits = model.logits_at(h[hard], model.num_layers).float()
    return logits, targets[hard]


def train_upper_layers(model_extended, hard_batches: Iterable, optimizer, vocab_size: int, device="cpu",
                       num_lower_layers: int = 2, *, grad_clip: Optional[float] = 1.0,
                       policy: str = "full", ignore_index: int = IGNORE_INDEX,
                       epoch: Optional[int] = None, lr_factor=None, totals=None,
                       easy_weight: Optional[float] = None, capacity: Optional[int] = None, **report) -> float:
    """One pass over `hard_batches` training the layers above `num_lower_layers`; mean loss per hard token.

    The loss is cross-entropy at the last layer over hard positions only (easy positions
    carry `ignore_index`). With `easy_weight` (phase2.loss_tokens=all: 1, weighted: its
    easy_weight) it is taken at every position, an easy one weighing `easy_weight`, and
    divided by the weights' sum; the batches then carry (B, 2, T) targets (hard-only, all),
    mined with `keep_easy` (`create_hard_example_loader` stacks them), and the upper layers
    must run every token (upper_context=full). `capacity`: fixed-capacity upper layers (`upper_logits`). Warns when the early exit's head is trainable, since training it
    would move the exit's confidences away from the calibrated threshold. Under
    torch.distributed every rank must pass the same number of batches; gradients are averaged
    over ranks (DDP) and the returned loss is over every rank's hard tokens. `epoch`,
    `lr_factor`, `totals` and `report` (progress, tracker, prefix, ...): as in `lego.training.train_epoch`.
    """
    model = model_extended
    shared = model.deep_head is None and model.exit_layer is not None
    if shared and any(p.requires_grad for p in model.output_head.parameters()):
        log.warning("output_head is trainable and shared with the early exit: exit confidences will drift "
                    "from the calibrated threshold (use grow(model, ..., deep_head=True) or freeze it)")
    return train_epoch(model, hard_batches, optimizer,
                       lambda m, x, t: _upper_loss(m, x, t, num_lower_layers, ignore_index, policy, easy_weight,
                                                   capacity),
                       device, epoch=epoch, grad_clip=grad_clip, name="hard_batches", lr_factor=lr_factor,
                       totals=totals, **report)


def _upper_loss(model, x: torch.Tensor, targets: torch.Tensor, num_lower_layers: int, ignore_index: int,
                policy: str, easy_weight: Optional[float] = None, capacity: Optional[int] = None):
    """Summed cross-entropy at the last layer over the hard positions of one batch, and their count;
    with `easy_weight`, over every position (easy ones weighted), and the weights' sum."""
    if easy_weight is None:
        h = upper_states(model, x, num_lower_layers)
        logits, y = upper_logits(model, h, targets, num_lower_layers, ignore_index, policy, capacity)
        return F.cross_entropy(logits, y, reduction="sum"), y.numel()
    if targets.dim() != 3:
        raise ValueError("easy_weight needs (B, 2, T) targets (hard-only, all): mine with keep_easy=True")
    if policy != "full":
        raise ValueError(f"easy_weight scores easy positions at the deep exit; upper_context="
                         f"{policy} never computes them there (use full)")
    hard_t, all_t = targets.unbind(1)  # (B, T) each
    valid = all_t != ignore_index
    h = upper_states(model, x, num_lower_layers)
    with model.autocast():
        h = model.run_layers(h, num_lower_layers, model.num_layers)  # every position
        logits = model.logits_at(h[valid], model.num_layers).float()  # (N_valid, V)
    ce = F.cross_entropy(logits, all_t[valid], reduction="none")
    if easy_weight == 1.0:
        return ce.sum(), valid.sum()
    w = torch.where(hard_t[valid] != ignore_index, 1.0, float(easy_weight))  # (N_valid,)
    return (w * ce).sum(), w.sum()


@torch.no_grad()
def evaluate_on_hard_examples(model, hard_batches: Iterable, vocab_size: int = None, device="cpu",
                              num_lower_layers: int = 2, *, policy: str = "full", capacity: Optional[int] = None,
                              ignore_index: int = IGNORE_INDEX) -> Dict[str, float]:
    """Perplexity and accuracy at the model's last layer on the hard positions alone.

    With `num_lower_layers == model.num_layers` this scores a phase-1 model on the same tokens.
    Under torch.distributed each rank passes its own hard examples and gets the totals of all.
    """
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for x, targets in _batches(hard_batches, "hard_batches"):
        x, targets = x.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        h = upper_states(model, x, num_lower_layers)
        logits, y = upper_logits(model, h, targets, num_lower_layers, ignore_index, policy, capacity)
        nll += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += y.numel()
    if distributed.is_distributed():
        nll, correct, count = distributed.all_reduce_sum([nll, correct, count])
        correct, count = int(correct), int(count)
    if count == 0:
        raise ValueError("hard_batches: no hard positions to evaluate")
    return {"loss": nll / count, "ppl": math.exp(nll / count), "acc": correct / count, "n_tokens": count}


# -- growing a model by a Block (phase 2 and each later Block) ----------------------------------------
def grow(model: Model, num_layers: int, *, exit_layer: Optional[int] = None, deep_head: bool = True,
         init: str = "random") -> Model:
    """Build a `num_layers`-layer model on top of `model` (phase 2 of ASHEM, and each later Block).

    Its last layer becomes a new exit (`exit_layer`, which must be this depth), after the exits it
    already has. Copies embedding, every layer and every head (and keeps `precision`). New layers
    are freshly initialised (`init="random"`), or, with `init="copy"`, copies of the lower
    stack in order (progressive stacking): new layer n + j (1-based, n = this depth) starts as
    layer (j - 1) mod n + 1, e.g. 2 -> 4 layers: layers 3, 4 := 1, 2; 2 -> 5: 3, 4, 5 := 1, 2, 1.
    Both draw the same random numbers, so what follows is seeded alike.
    Freezes the embedding, the copied layers and every exit's head, so each exit's logits stay
    bit-identical to this model's. With `deep_head` the deep exit gets a trainable copy of the
    head that read this model's last layer (which stays, frozen, as the new exit's head);
    without it, every exit reads the frozen shared head. Tied heads (`exit_head="tied"`) share the
    first exit's projection, frozen here; the deep exit's own copy is then its final norm.
    How the grown model routes (the new exit's threshold, the policy) is a `Routing` given at call time.
    """
    check_choice("init", init, PHASE2_INITS)
    exit_layer = model.num_layers if exit_layer is None else exit_layer
    if exit_layer != model.num_layers:
        raise ValueError(f"exit_layer={exit_layer} must equal the grown model's depth {model.num_layers}")
    if num_layers <= model.num_layers:
        raise ValueError(f"num_layers={num_layers} must exceed the current depth {model.num_layers}")
    if model.exit_layers and deep_head != (model.deep_head is not None):
        raise ValueError(f"deep_head={deep_head} must match the model being grown (deep_head="
                         f"{model.deep_head is not None})")
    args = replace(model.args, num_layers=num_layers, exits=(*model.exit_layers, exit_layer), deep_head=deep_head)
    big = Model(args).to(next(model.parameters()).device)
    big.embedding.load_state_dict(model.embedding.state_dict())
    for i in range(model.num_layers):
        big.layers[i].load_state_dict(model.layers[i].state_dict())
    if init == "copy":
        for i in range(model.num_layers, num_layers):
            big.layers[i].load_state_dict(model.layers[i % model.num_layers].state_dict())
    big.output_head.load_state_dict(model.output_head.state_dict())
    if deep_head:
        old_heads = [*model.exit_heads, *([model.deep_head] if model.exit_layers else [])]
        for new, old in zip(big.exit_heads, old_heads):  # the old deep head becomes the new exit's
            new.load_state_dict(old.state_dict())
        big.deep_head.load_state_dict(model.head_for(model.num_layers).state_dict())
    freeze_exits(big)
    return big


def freeze_exits(model: Model) -> None:
    """Freeze everything up to the last exit: embedding, those layers and every exit's head."""
    if model.exit_layers:
        for module in [model.embedding, model.output_head, *model.exit_heads, *model.layers[: model.exit_layers[-1]]]:
            module.requires_grad_(False)
