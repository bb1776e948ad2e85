"""Is the chains lookup learnable, and when does it appear? A dense model trained with the loss on answers.

    python scripts/chains_answer_probe.py --name V_dense2_answers --depth 2 --loss answers --lr 3e-3 \\
        --steps 40000 --eval-every 500 --max-minutes 20 -- experiment=chains

For one setting (Hydra overrides after `--`, composed with the packaged config as `lego-run` composes them),
trains a dense `--depth`-layer `lego.model.Model` (fp32) with its own small loop: AdamW (no decay on biases and
norms, `lego.pipeline.train.make_optimizer`), warmup then cosine over `--steps` (`lego.schedule.lr_factor`),
gradients clipped to phase 1's grad_clip, batches of the training split's windows (`lego.batches.make_loader`,
with labels). With `--grow-from` (a run's phase1/model.pt) the model is that lower model grown to `--depth` layers
(`lego.ashem.grow`: fresh layers and a deep head over the frozen embedding, layers and exit head), as ASHEM's
phase 2 trains it, without hard-example mining; `--lower-layers K` keeps only the checkpoint's first K layers (a
dense model's lower half as Block 1), `--unfreeze` trains the lower model too. `--joint-exit K` trains a model
with an exit head at layer K, every exit at once as LayerSkip and EE-LLM train them: the loss is `--exit-weight`
x the exit's + (1 - it) x the last layer's (0.5: the mean); with `--exit-detach` the exit head is trained on a
detached hidden state beside a dense model (the layers get the last layer's loss alone, the exit head is clipped
on its own). A joint model's record holds `joint_tables` (`routed_tables`: its routers at `--exit-share`, chosen on
one half of the validation split and reported on the other, and their curves over exit shares); `--tables-from`
scores a saved joint model so without training. `--save-model` keeps the trained model for a later `--grow-from`,
which then takes the layers below the exit and the exit's head. The loss (`--loss`):

    all       cross-entropy on every target (the ordinary LM loss)
    answers   cross-entropy on answer targets only (label = hop count >= 1, `lego.chains`), averaged over them
    weighted  every target, answers weighed `--answer-weight` and the rest 1 (a weighted mean)

Every `--eval-every` steps the validation split is scored by label (`lego.labels.labelled_tokens` +
`label_table`): one JSON line per evaluation in <out>/histories/<name>.jsonl and one printed line. Training
stops at `--steps` or after `--max-minutes` of wall clock (then evaluated once more). Writes <out>/<name>.json:
the settings, steps, seconds, training MACs (`lego.cost.dense_training_macs`), the history, and the final
per-label table. Choose on validation: the test split is not read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from lego.batches import make_loader, set_loader_epoch
from lego.cascade import share_threshold
from lego.ashem import grow
from lego.artifacts import load_checkpoint
from lego.checkpoint import model_vocab_size, save_model, stored_args
from lego.cli import to_config
from lego.config import IGNORE_INDEX, resolve
from lego.cost import dense_training_macs
from lego.data import load_corpus
from lego.labels import (fit_gain_probe, fit_probe, label_table, labelled_tokens, oracle_by_label, router_summary,
                         solved_hops)
from lego.model import Model, ModelArgs
from lego.pipeline.compute import cost_shape
from lego.pipeline.scaffold import joint_from_dense, lower_block
from lego.pipeline.train import make_optimizer
from lego.schedule import lr_factor

CONF = Path(__file__).resolve().parents[1] / "lego" / "conf"
LOSSES = ("all", "answers", "weighted")
CURVE_SHARES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # exit shares of the routers' curves in a joint record


def token_weights(labels: torch.Tensor, targets: torch.Tensor, loss: str, answer_weight: float) -> torch.Tensor:
    """The weight of each target (B, T) float32 under `loss`: answers are labels >= 1 (a hop count)."""
    answer = (labels.long() >= 1).float()
    counted = (targets != IGNORE_INDEX).float()
    if loss == "all":
        w = torch.ones_like(answer)
    elif loss == "answers":
        w = answer
    elif loss == "weighted":
        w = 1.0 + (answer_weight - 1.0) * answer
    else:
        raise ValueError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    return w * counted


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * CE) / sum(w) over the targets (a batch without weight gives 0, with a graph)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().clamp_min(0), reduction="none")
    w = weights.flatten()
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def joint_loss(model: Model, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, exit_layer: int,
               exit_weight: float, detach: bool = False) -> torch.Tensor:
    """exit_weight x the weighted CE at `exit_layer`'s head + (1 - exit_weight) x the last layer's, one pass.
    With `detach` the exit's head reads a detached hidden state and the last layer's CE weighs 1: the layers get
    the dense model's gradient alone, the exit head its own (a probe trained beside the model)."""
    h = model.run_layers(model.embed(inputs), 0, exit_layer)
    top = model.run_layers(h, exit_layer, model.num_layers)
    deep = weighted_ce(model.logits_at(top, model.num_layers), targets, weights)
    if detach:
        return weighted_ce(model.logits_at(h.detach(), exit_layer), targets, weights) + deep
    return exit_weight * weighted_ce(model.logits_at(h, exit_layer), targets, weights) + (1 - exit_weight) * deep


def routed_tables(model: Model, loader, exit_layer: int, share: float) -> Dict[str, dict]:
    """A joint model's routers at `share` of the tokens stopped at its exit, each chosen on the first half of
    `loader`'s tokens and reported on the second (`lego.labels.router_summary`: acc, ppl, per-label table with
    the exit share, `truth`): 'max_prob' (the exit's confidence, as ASHEM calibrates it), 'learned' (a logistic
    probe on the exit's hidden state that predicts the last layer's lower NLL, `lego.labels.fit_probe`),
    'learned_gain' (a ridge probe that predicts by how much, `lego.labels.fit_gain_probe`),
    'oracle_by_label' (every token exits but the answers deeper than the exit solves, `oracle_by_label`) and
    'oracle' (the tokens the last layer gains least on exit: no router does better at this share). Also 'exit' and
    'deep' on the second half (every token at the exit, or at the last layer), and each router's 'threshold'."""
    tok = labelled_tokens(model, loader, "cpu", exit_layer=exit_layer, hidden=True, progress=False)
    model.train()
    n = tok["label"].numel()
    first, second = {k: v[: n // 2] for k, v in tok.items()}, {k: v[n // 2:] for k, v in tok.items()}
    first_exit = label_table(first["label"], first["nll_exit"], first["ok_exit"])
    first_deep = label_table(first["label"], first["nll_deep"], first["ok_deep"])
    probe = fit_probe(first["hidden"], first["nll_deep"] < first["nll_exit"])
    regress = fit_gain_probe(first["hidden"], first["nll_exit"] - first["nll_deep"])
    gain = second["nll_exit"] - second["nll_deep"]
    thresholds = {"max_prob": share_threshold(first["conf"], share),
                  "learned": share_threshold(probe(first["hidden"]), share),
                  "learned_gain": share_threshold(regress(first["hidden"]), share)}
    stops = {"max_prob": second["conf"] >= thresholds["max_prob"],
             "learned": probe(second["hidden"]) >= thresholds["learned"],
             "learned_gain": regress(second["hidden"]) >= thresholds["learned_gain"],
             "oracle_by_label": oracle_by_label(second["label"], solved_hops(first_exit, first_deep)),
             "oracle": -gain >= share_threshold(-gain, share)}
    every = dict(exit_layer=exit_layer, num_layers=model.num_layers)
    out = {name: {**router_summary(second, stop, **every), "threshold": thresholds.get(name)}
           for name, stop in stops.items()}
    # each router over exit shares (chosen on the first half as above; the oracle on the second half itself)
    scores = {"max_prob": (first["conf"], second["conf"]), "learned": (probe(first["hidden"]), probe(second["hidden"])),
              "learned_gain": (regress(first["hidden"]), regress(second["hidden"])), "oracle": (-gain, -gain)}
    out["curves"] = {name: [{"share": s, **{k: v for k, v in router_summary(
        second, b >= share_threshold(a, s), **every).items() if k in ("ppl", "acc", "shallow_ratio")}}
        for s in CURVE_SHARES] for name, (a, b) in scores.items()}
    out["exit"] = label_table(second["label"], second["nll_exit"], second["ok_exit"])
    out["deep"] = label_table(second["label"], second["nll_deep"], second["ok_deep"])
    deep_ppl = out["deep"]["all"]["ppl"]  # each router's ppl over the last layer's on the same tokens, in percent
    for row in [*(out[name] for name in stops), *(p for curve in out["curves"].values() for p in curve)]:
        row["gap_pct"] = 100 * (row["ppl"] / deep_ppl - 1)
    return out


def hop_accuracies(table: Dict[str, dict]) -> Dict[str, float]:
    """{'1 hops': acc, ...} from a per-label table."""
    return {k: v["acc"] for k, v in table.items() if k.endswith("hops")}


def lower_model(path: Path, layers: Optional[int] = None) -> Model:
    """The dense model stored at `path`, or its embedding, first `layers` layers and output head."""
    state = load_checkpoint(path, what="--grow-from")
    args = stored_args(state["model_args"])
    full = Model(ModelArgs(**args))
    full.load_state_dict(state["state_dict"])
    if args["exits"]:  # a model trained with one exit (--joint-exit): below it, with the exit's head
        if len(args["exits"]) != 1 or layers not in (None, args["exits"][0]):
            raise ValueError(f"--grow-from {path}: exits {args['exits']}; only the model below a single exit "
                             f"(--lower-layers {args['exits'][0]}) can be grown")
        layers = args["exits"][0]
    elif layers is None or layers == full.num_layers:
        return full
    if not 1 <= layers < full.num_layers:
        raise ValueError(f"--lower-layers {layers}: between 1 and {full.num_layers}")
    return lower_block(full, layers)


def score(model: Model, loader) -> Dict[str, dict]:
    tok = labelled_tokens(model, loader, "cpu", progress=False)
    model.train()
    return label_table(tok["label"], tok["nll_deep"], tok["ok_deep"])


def train_probe(cfg, corpus, *, depth: int, loss: str, answer_weight: float = 10.0, lr: float, weight_decay: float,
                steps: int, warmup: int, min_lr_ratio: float, batch_size: int, eval_every: int,
                max_minutes: Optional[float] = None, seed: int = 0, history_path: Optional[Path] = None,
                grow_from: Optional[Path] = None, lower_layers: Optional[int] = None, unfreeze: bool = False,
                joint_exit: Optional[int] = None, exit_weight: float = 0.5, exit_detach: bool = False,
                exit_share: float = 0.8, log=print) -> dict:
    """Train one dense model as the module docstring says; returns the record (settings, history, final table).
    The model is returned under 'model' (not serialisable; the caller drops it)."""
    if loss not in LOSSES:
        raise ValueError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    torch.manual_seed(seed)
    if grow_from is None:
        shape = replace(cfg.model, precision="fp32")
        args = ModelArgs.from_config(shape, model_vocab_size(cfg, corpus.vocab_size), depth)
        if joint_exit is not None:  # an exit head at layer `joint_exit`, trained with the last layer's
            if not 1 <= joint_exit < depth:
                raise ValueError(f"--joint-exit {joint_exit}: between 1 and {depth - 1}")
        model = Model(args)  # the dense model's initial weights, with or without the exit
        if joint_exit is not None:  # same start as the dense model; both heads begin as its head
            model = joint_from_dense(model, joint_exit)
    else:  # ASHEM's phase 2: fresh layers over a trained, frozen lower model (`lego.ashem.grow`)
        lower = lower_model(grow_from, lower_layers)
        model = grow(lower, depth, deep_head=True)
        if unfreeze:
            model.requires_grad_(True)
    model.train()
    opt = make_optimizer(model, lr, weight_decay, torch.device("cpu"))
    params = list(model.parameters())
    exit_head = set(map(id, model.output_head.parameters())) if joint_exit is not None and exit_detach else set()
    clip_groups = [g for g in ([p for p in params if id(p) not in exit_head], [p for p in params if id(p) in exit_head])
                   if g]
    T = cfg.data.seq_len
    train = make_loader(corpus.train, T, batch_size, shuffle=True, seed=seed, drop_last=True,
                        labels=corpus.labels["train"])
    val = make_loader(corpus.validation, T, cfg.data.eval_batch_size, shuffle=False, seed=seed,
                      labels=corpus.labels["validation"])
    grad_clip = cfg.phase1.grad_clip
    if history_path is not None:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        history_path.write_text("")
    history: List[dict] = []
    t0 = time.time()
    train_s = 0.0  # wall seconds in training steps, evaluations excluded
    step, epoch, losses, stopped = 0, 0, [], "steps"

    def evaluate() -> dict:
        table = score(model, val)
        row = {"step": step, "wall_s": round(time.time() - t0, 1), "train_s": round(train_s, 1),
               "lr": lr * lr_factor(max(step - 1, 0), schedule="cosine", warmup_steps=warmup, total_steps=steps,
                                    min_lr_ratio=min_lr_ratio),
               "train_loss": (sum(losses) / len(losses)) if losses else None,
               "val_loss_all": math.log(table["all"]["ppl"]),
               "acc": {k: round(v["acc"], 4) for k, v in table.items()},
               "ppl": {k: round(v["ppl"], 4) for k, v in table.items()}}
        losses.clear()
        history.append(row)
        if history_path is not None:
            with history_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        hops = " ".join(f"{k.split()[0]}hop {v:.3f}" for k, v in hop_accuracies(table).items())
        log(f"step {step:6d} {row['wall_s']:7.0f}s lr {row['lr']:.2e} train {row['train_loss'] or float('nan'):.4f} "
            f"val {row['val_loss_all']:.4f} | {hops} | unpred {row['acc'].get('unpredictable', float('nan')):.3f} "
            f"format {row['acc'].get('format', float('nan')):.3f}", flush=True)
        return table

    table = evaluate()
    while step < steps and stopped == "steps":
        set_loader_epoch(train, epoch)
        for inputs, targets, labels in train:
            t1 = time.time()
            f = lr_factor(step, schedule="cosine", warmup_steps=warmup, total_steps=steps, min_lr_ratio=min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr * f
            w = token_weights(labels, targets, loss, answer_weight)
            if joint_exit is None:
                value = weighted_ce(model(inputs), targets, w)
            else:
                value = joint_loss(model, inputs, targets, w, joint_exit, exit_weight, exit_detach)
            opt.zero_grad(set_to_none=True)
            value.backward()
            if grad_clip:  # a detached exit head is clipped on its own: the layers' update is the dense model's
                for group in clip_groups:
                    torch.nn.utils.clip_grad_norm_(group, grad_clip)
            opt.step()
            losses.append(float(value.detach()))
            step += 1
            train_s += time.time() - t1
            if step % eval_every == 0 or step == steps:
                table = evaluate()
            if step >= steps:
                break
            if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
                stopped = "max_minutes"
                break
        epoch += 1
    if history[-1]["step"] != step:
        table = evaluate()
    routed = None if joint_exit is None else routed_tables(model, val, joint_exit, exit_share)
    return {"depth": depth, "loss": loss, "answer_weight": answer_weight if loss == "weighted" else None, "lr": lr,
            "weight_decay": weight_decay, "steps_planned": steps, "steps": step, "stopped_by": stopped,
            "warmup": warmup, "min_lr_ratio": min_lr_ratio, "batch_size": batch_size, "seq_len": T, "seed": seed,
            "grow_from": None if grow_from is None else str(grow_from), "lower_layers": lower_layers,
            "unfreeze": unfreeze, "joint_exit": joint_exit,
            "exit_weight": exit_weight if joint_exit is not None and not exit_detach else None,
            "exit_detach": exit_detach, "exit_share": exit_share if joint_exit is not None else None,
            "joint_tables": routed,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "wall_s": round(time.time() - t0, 1), "train_s": round(train_s, 1), "history": history,
            "by_label": table, "model": model}


def summary(history: List[dict]) -> dict:
    """The best evaluation by mean answer accuracy, and the first step where 1-hop accuracy exceeded 0.9."""
    def mean_ans(h):
        v = [a for k, a in h["acc"].items() if k.endswith("hops")]
        return sum(v) / len(v)

    best = max(history, key=mean_ans)
    first = next((h["step"] for h in history if h["acc"].get("1 hops", 0.0) > 0.9), None)
    return {"best_step": best["step"], "best_acc": {k: v for k, v in best["acc"].items() if k.endswith("hops")},
            "first_step_1hop_over_0.9": first,
            "final_acc": {k: v for k, v in history[-1]["acc"].items() if k.endswith("hops")}}


def compose_config(overrides: List[str]):
    """The resolved config of `overrides`, composed as `lego-run` composes them (progress off)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return resolve(to_config(compose(config_name="config", overrides=["progress=false", *overrides])))


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--loss", choices=LOSSES, default="answers")
    ap.add_argument("--answer-weight", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=None, help="default: phase1.lr")
    ap.add_argument("--weight-decay", type=float, default=None, help="default: phase1.weight_decay")
    ap.add_argument("--steps", type=int, default=None, help="the cosine's budget of optimizer steps (required but "
                                                            "with --tables-from)")
    ap.add_argument("--warmup", type=int, default=None, help="default: phase1.warmup_steps")
    ap.add_argument("--min-lr-ratio", type=float, default=None, help="default: phase1.min_lr_ratio")
    ap.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall clock")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grow-from", type=Path, default=None,
                    help="a lower model's checkpoint (a run's phase1/model.pt): train --depth minus its layers of "
                         "fresh layers over it, frozen, as ASHEM's phase 2 does (no hard-example mining)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("outputs/reference/chains_search"))
    ap.add_argument("--lower-layers", type=int, default=None,
                    help="with --grow-from: keep only the checkpoint's first layers (its embedding and head stay)")
    ap.add_argument("--unfreeze", action="store_true", help="with --grow-from: train the lower model too")
    ap.add_argument("--joint-exit", type=int, default=None,
                    help="an exit head at this layer, its loss averaged with the last layer's (every exit trained "
                         "at once, as LayerSkip trains them); --grow-from takes the model below it")
    ap.add_argument("--exit-weight", type=float, default=0.5,
                    help="with --joint-exit: the exit loss's weight, the last layer's 1 minus it (0.5: the mean)")
    ap.add_argument("--exit-detach", action="store_true",
                    help="with --joint-exit: the exit head reads a detached hidden state and the last layer's loss "
                         "weighs 1, so the layers train as the dense model's do (--exit-weight is unused)")
    ap.add_argument("--exit-share", type=float, default=0.8,
                    help="with --joint-exit: the share of validation tokens the final routed table stops at the "
                         "exit (max-prob threshold at that share, calibrated on validation itself)")
    ap.add_argument("--tables-from", type=Path, default=None,
                    help="no training: a --joint-exit model saved with --save-model, scored as a joint record's "
                         "joint_tables (the routers, at --exit-share and over shares) into <out>/<name>.json")
    ap.add_argument("--save-model", type=Path, default=None, help="write the trained model's checkpoint here")
    ap.add_argument("overrides", nargs="*")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    if a.steps is None and a.tables_from is None:
        ap.error("--steps is required (but with --tables-from)")
    torch.set_num_threads(a.threads)
    cfg = compose_config(a.overrides)
    corpus = load_corpus(cfg.data)
    if a.tables_from is not None:
        return tables_record(a, argv, cfg, corpus)
    p1 = cfg.phase1
    batch = a.batch_size or cfg.data.batch_size
    hist_path = a.out / "histories" / f"{a.name}.jsonl"
    rec = train_probe(cfg, corpus, depth=a.depth, loss=a.loss, answer_weight=a.answer_weight,
                      lr=p1.lr if a.lr is None else a.lr,
                      weight_decay=p1.weight_decay if a.weight_decay is None else a.weight_decay,
                      steps=a.steps, warmup=p1.warmup_steps if a.warmup is None else a.warmup,
                      min_lr_ratio=p1.min_lr_ratio if a.min_lr_ratio is None else a.min_lr_ratio,
                      batch_size=batch, eval_every=a.eval_every, max_minutes=a.max_minutes, seed=a.seed,
                      history_path=hist_path, grow_from=a.grow_from,
                      lower_layers=a.lower_layers, unfreeze=a.unfreeze, joint_exit=a.joint_exit,
                      exit_weight=a.exit_weight, exit_detach=a.exit_detach, exit_share=a.exit_share)
    model = rec.pop("model")
    if a.save_model is not None:
        a.save_model.parent.mkdir(parents=True, exist_ok=True)
        save_model(a.save_model, model, cfg)
    shape = cost_shape(cfg, corpus.vocab_size)
    rec["train_macs"] = dense_training_macs(tokens=rec["steps"] * batch * cfg.data.seq_len, num_layers=a.depth,
                                            **shape)
    record = {"name": a.name, "overrides": a.overrides, "argv": argv,
              "machine": "2 shared CPU cores, 1 torch thread; seconds are not speeds",
              "dim": cfg.model.dim, "num_heads": cfg.model.num_heads, "chains": vars(cfg.data.chains)
              if hasattr(cfg.data.chains, "__dict__") else str(cfg.data.chains),
              "train_tokens": len(corpus.train), **rec, "summary": summary(rec["history"])}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(record, indent=1, default=str))
    s = record["summary"]
    print(f"{a.name}: {rec['steps']} steps ({rec['stopped_by']}), {rec['wall_s']:.0f} s; final {s['final_acc']}; "
          f"best {s['best_acc']} at step {s['best_step']}; 1-hop > 0.9 first at {s['first_step_1hop_over_0.9']}",
          flush=True)
    return record


def tables_record(a, argv: List[str], cfg, corpus) -> dict:
    """--tables-from: the saved joint model's routers on the validation split, written to <out>/<name>.json."""
    state = load_checkpoint(a.tables_from, what="--tables-from")
    model = Model(ModelArgs(**stored_args(state["model_args"])))
    model.load_state_dict(state["state_dict"])
    if len(model.exit_layers) != 1:
        raise ValueError(f"--tables-from {a.tables_from}: exits {list(model.exit_layers)}; a model with one exit "
                         f"(--joint-exit) is needed")
    val = make_loader(corpus.validation, cfg.data.seq_len, cfg.data.eval_batch_size, shuffle=False, seed=0,
                      labels=corpus.labels["validation"])
    record = {"name": a.name, "overrides": a.overrides, "argv": argv, "tables_from": str(a.tables_from),
              "exit_share": a.exit_share,
              "joint_tables": routed_tables(model, val, model.exit_layers[0], a.exit_share)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(record, indent=1, default=str))
    return record


if __name__ == "__main__":
    main()
