"""One LEGO run: phase1 -> hard_examples -> phase2 -> eval, each a function with explicit inputs.

`run(config, run_dir)` is what `lego-run` calls after Hydra has composed the config; tests call
it directly. Splits are used as SPEC section 4 says: phase 1 trains on train and early-stops on
validation; the threshold is calibrated on validation; phase 2 trains on the training split's
hard examples and early-stops on the validation split's; every reported number is on test.

A stage whose result file exists is skipped, and an interrupted phase resumes from its last
epoch checkpoint, so rerunning the same command in the same run directory finishes the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from lego import __version__, distributed
from lego.analysis import analyze
from lego.artifacts import (LockBusy, file_lock, load_checkpoint, read_json, remove_partial_writes, save_checkpoint,
                            write_json, write_jsonl, write_text)
from lego.ashem import (collect_hard_examples, create_hard_example_loader, evaluate_on_hard_examples,
                        exact_quantile, gather_confidences, train_upper_layers)
from lego.config import ASHEMConfig, to_dict, validate
from lego.cost import routed_macs
from lego.data import Corpus, cache_root, load_corpus, make_loader
from lego.model import DeepSupervisionTransformer, resolve_precision
from lego.training import (StageConfig, Trainer, TrainingConfig, create_standard_config, early_stopping_loop,
                           set_loader_epoch)

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run (missing prerequisite, foreign run directory); the message says why."""


class RunDirTaken(StageError):
    """The run directory holds a run of another config."""


# -- setup ---------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine; use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r} but MPS is not available on this machine")
    return device


def setup_torch(cfg: ASHEMConfig) -> torch.device:
    device = distributed.device_for_rank(resolve_device(cfg.device))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    return device


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys that change what a run computes. Others (stages, device, threads, display) may differ on resume.
_NON_SCIENCE = {"stages", "device", "num_threads", "objective"}


def science_config(cfg: ASHEMConfig) -> Dict[str, Any]:
    d = to_dict(cfg)
    for k in _NON_SCIENCE:
        d.pop(k, None)
    d["data"].pop("cache_dir", None)
    d["model"].pop("compile", None)
    # The precision that runs, not "auto" (that depends on the GPU). fp32 is what every run did
    # before the key existed, so it is left out: older run dirs and phase-1 cache keys stay valid.
    precision = run_precision(cfg)
    if precision == "fp32":
        d["model"].pop("precision", None)
    else:
        d["model"]["precision"] = precision
    return d


def run_precision(cfg: ASHEMConfig) -> str:
    """model.precision with "auto" resolved for the run's device."""
    return resolve_precision(cfg.model.precision, resolve_device(cfg.device))


def _diff(a: Dict, b: Dict, prefix: str = "") -> list:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def claim_run_dir(run_dir: Path, cfg: ASHEMConfig) -> None:
    """Record the config in `run_dir`, or refuse if the directory holds a run of another config."""
    record = run_dir / "run.json"
    new = science_config(cfg)
    if record.exists():
        old = read_json(record)["science_config"]
        diff = _diff(old, new)
        if diff:
            raise RunDirTaken(f"run dir {run_dir} holds a run with another config ({'; '.join(diff[:5])}); "
                             "use a new hydra.run.dir or the same overrides")
    elif distributed.is_main():  # every rank checks (and refuses alike); rank 0 writes
        write_json(record, {"science_config": new, "lego_version": __version__, "torch": torch.__version__,
                            "created": time.strftime("%Y-%m-%d %H:%M:%S")})


# -- models and checkpoints ---------------------------------------------------------------------
def model_args(model: DeepSupervisionTransformer) -> Dict[str, Any]:
    """Constructor arguments that rebuild `model` exactly (stored in every checkpoint)."""
    return dict(model.shape, exit_layer=model.exit_layer, routing_threshold=model.routing_threshold,
                deep_head=model.deep_head is not None, upper_context=model.upper_context,
                confidence=model.confidence, precision=model.precision)


def build_model(cfg: ASHEMConfig, vocab_size: int, num_layers: int) -> DeepSupervisionTransformer:
    m = cfg.model
    return DeepSupervisionTransformer(
        vocab_size, m.dim, num_layers, m.num_heads, max_seq_len=m.max_seq_len, dropout=m.dropout,
        norm=m.norm, pos=m.pos, ffn=m.ffn, ffn_mult=m.ffn_mult, confidence=cfg.hard_examples.confidence,
        upper_context=cfg.phase2.upper_context, precision=run_precision(cfg),
    )


_ROUTING_ATTRS = ("routing_threshold", "upper_context", "confidence")  # behaviour, not weights


def save_model(path: Path, model: DeepSupervisionTransformer, cfg: ASHEMConfig, **meta) -> None:
    save_checkpoint(path, {"model_args": model_args(model), "state_dict": model.state_dict(),
                           "config": to_dict(cfg), "meta": meta})


def load_model(path: Path, expect_args: Dict[str, Any], device, what: str) -> DeepSupervisionTransformer:
    """Rebuild the model stored at `path`; refuse one whose shape differs from what the config asks."""
    state = load_checkpoint(path, what=what)
    args = {"precision": "fp32", **state["model_args"]}  # checkpoints older than the key ran in fp32
    diff = [f"{k}: {args.get(k)!r} (checkpoint) vs {v!r} (config)" for k, v in expect_args.items()
            if k not in _ROUTING_ATTRS and args.get(k) != v]
    if diff:
        raise StageError(f"{what} {path} has another model shape: {'; '.join(diff[:4])}")
    model = DeepSupervisionTransformer(**{**args, **{k: expect_args[k] for k in _ROUTING_ATTRS}})
    model.load_state_dict(state["state_dict"])
    if args.get("exit_layer") is not None:  # a grown model: lower Block and exit head stay frozen
        for module in [model.embedding, model.output_head, *model.layers[: args["exit_layer"]]]:
            module.requires_grad_(False)
    return model.to(device)


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused kernel not available for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, foreach=device.type == "cuda")


class EpochSteps:
    """At most `steps` batches of `loader` per epoch; the epoch's seeded order picks which.

    Under torch.distributed `steps` still counts the epoch's batches over all ranks, and every
    rank takes the same number (`distributed.common_steps`).
    """

    def __init__(self, loader, steps: Optional[int]):
        self.loader, self.steps = loader, distributed.common_steps(len(loader), steps)

    def set_epoch(self, epoch: int) -> None:
        set_loader_epoch(self.loader, epoch)

    def __iter__(self):
        return iter(self.loader) if self.steps is None else itertools.islice(self.loader, self.steps)

    def __len__(self) -> int:
        return len(self.loader) if self.steps is None else min(self.steps, len(self.loader))


@dataclass
class Loaders:
    """Under torch.distributed each loader holds this rank's share of the batches."""

    train: Any  # shuffled by (seed, epoch), for training
    train_ordered: Any  # the same windows in corpus order, for mining and calibration
    validation: Any
    test: Any


def make_loaders(cfg: ASHEMConfig, corpus: Corpus, *, shard: bool = True, device=None) -> Loaders:
    """The four loaders; pinned batches when `device` is a GPU."""
    d = cfg.data
    kw = dict(rank=distributed.rank(), world_size=distributed.world_size()) if shard else {}
    kw["device"] = device
    return Loaders(
        train=make_loader(corpus.train, d.seq_len, d.batch_size, shuffle=True, seed=cfg.seed, **kw),
        train_ordered=make_loader(corpus.train, d.seq_len, d.eval_batch_size, shuffle=False, seed=cfg.seed, **kw),
        validation=make_loader(corpus.validation, d.seq_len, d.eval_batch_size, shuffle=False, seed=cfg.seed,
                               **kw),
        test=make_loader(corpus.test, d.seq_len, d.eval_batch_size, shuffle=False, seed=cfg.seed, **kw),
    )


# -- training a standard LM (phase 1 and the standard baseline) -----------------------------------
def train_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, work_dir: Path,
                   device: torch.device, name: str) -> DeepSupervisionTransformer:
    """Train a `num_layers`-layer LM on all tokens with phase 1's optimizer and early stopping.

    Writes work_dir/model.pt (best weights), history.jsonl, result.json; resumes from
    work_dir/last.pt. Returns the model with its best weights.
    """
    final = work_dir / "model.pt"
    model = build_model(cfg, corpus.vocab_size, num_layers).to(device)
    if distributed.broadcast(final.exists()):  # rank 0 decides: it may be writing this file soon
        return load_model(final, model_args(model), device, f"{name} checkpoint")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, corpus.vocab_size, num_layers).to(device)
    p1 = cfg.phase1
    optimizer = make_optimizer(model, p1.lr, p1.weight_decay, device)
    tc = create_standard_config(num_layers)
    tc.grad_clip = p1.grad_clip
    trainer = Trainer(tc, corpus.vocab_size, device)
    resume = _load_resume(work_dir / "last.pt", model, name)
    if cfg.model.compile:
        model.compile_blocks()
    result = trainer.train_with_early_stopping(
        model, EpochSteps(loaders.train, p1.epoch_steps), loaders.validation, optimizer,
        max_epochs=p1.max_epochs, patience=p1.patience, name=name, resume=resume,
        on_epoch_end=lambda state: _save_resume(work_dir, state),
    )
    if distributed.is_main():
        write_jsonl(work_dir / "history.jsonl", result["history"])
        write_json(work_dir / "result.json", {k: v for k, v in result.items() if k != "history"})
        save_model(final, model, cfg, stage=name, result={k: v for k, v in result.items() if k != "history"})
        (work_dir / "last.pt").unlink(missing_ok=True)
    return model


def _save_resume(work_dir: Path, state: dict) -> None:
    if not distributed.is_main():  # the ranks hold the same state; one copy on disk
        return
    save_checkpoint(work_dir / "last.pt", {"resume": state})
    write_jsonl(work_dir / "history.jsonl", state["history"])


def _load_resume(path: Path, model, name: str) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path, what=f"{name} resume checkpoint")["resume"]
        model.load_state_dict(state["model"])  # shape check before trusting it
    except (ValueError, RuntimeError, KeyError) as e:
        log.warning("%s: ignoring unusable resume checkpoint %s (%s); starting this phase over", name, path,
                    str(e).splitlines()[0])
        return None
    return state


def cached_standard(cfg: ASHEMConfig, corpus: Corpus, loaders: Loaders, num_layers: int, run_sub: Path,
                    device: torch.device, name: str) -> DeepSupervisionTransformer:
    """`train_standard`, shared through a content-addressed cache when `phase1.cache` is on.

    The key hashes exactly what determines the result: model, data, phase-1 optimisation,
    depth, seed, corpus content and device type. Concurrent jobs with one key train it once
    (a file lock); the result is copied into the run directory.
    """
    if not cfg.phase1.cache or distributed.broadcast((run_sub / "model.pt").exists()):
        return train_standard(cfg, corpus, loaders, num_layers, run_sub, device, name)
    key_src = {"model": science_config(cfg)["model"], "data": science_config(cfg)["data"],
               "phase1": {k: v for k, v in to_dict(cfg)["phase1"].items() if k not in ("cache", "layers")},
               "num_layers": num_layers, "seed": cfg.seed, "corpus": corpus.cache_key, "device": device.type,
               "lego": __version__}
    if distributed.world_size() > 1:  # more ranks = larger batches: another model (1 keeps old keys)
        key_src["world_size"] = distributed.world_size()
    key = fingerprint(key_src)
    entry = cache_root(cfg.data) / "models" / f"{name}-{key}"
    # Rank 0 holds the lock for all ranks (they train together and only rank 0 writes).
    with file_lock(entry.parent / f"{name}-{key}.lock") if distributed.is_main() else contextlib.nullcontext():
        hit = (entry / "model.pt").exists()
        if distributed.is_main() and entry.is_dir():
            remove_partial_writes(entry)  # a killed trainer's litter; we hold this entry's lock
        log.info("%s: %s cache entry %s", name, "reusing" if hit else "training into", entry)
        model = train_standard(cfg, corpus, loaders, num_layers, entry, device, name)
        if not distributed.is_main():
            return model
        run_sub.mkdir(parents=True, exist_ok=True)
        for fname in ("model.pt", "history.jsonl", "result.json"):
            shutil.copy2(entry / fname, run_sub / f".{fname}.tmp")
            (run_sub / f".{fname}.tmp").replace(run_sub / fname)
        write_json(run_sub / "cache.json", {"key": key, "entry": str(entry), "hit": hit, "key_source": key_src})
    return model


# -- stages --------------------------------------------------------------------------------------
def stage_phase1(cfg, corpus, loaders, run_dir: Path, device) -> DeepSupervisionTransformer:
    return cached_standard(cfg, corpus, loaders, cfg.phase1.layers, run_dir / "phase1", device, "phase1")


def require_phase1(cfg, corpus, run_dir: Path, device) -> DeepSupervisionTransformer:
    path = run_dir / "phase1" / "model.pt"
    if not path.exists():
        raise StageError(f"stages={cfg.stages} needs phase 1's result at {path}; include phase1 in stages")
    expect = model_args(build_model(cfg, corpus.vocab_size, cfg.phase1.layers))
    return load_model(path, expect, device, "phase1 checkpoint")


def stage_hard_examples(cfg, model1, loaders, run_dir: Path, device) -> Dict[str, Any]:
    """Calibrate the threshold on the calibration split; write hard_examples/threshold.json."""
    path = run_dir / "hard_examples" / "threshold.json"
    if distributed.broadcast(path.exists()):
        return read_json(path)
    split = cfg.hard_examples.calibration_split
    loader = loaders.validation if split == "validation" else loaders.train_ordered
    conf = gather_confidences(model1, loader, device, measure=cfg.hard_examples.confidence)  # every rank's tokens
    threshold = exact_quantile(conf, cfg.hard_example_ratio)
    hard = int((conf < threshold).sum())
    qs = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    info = {
        "threshold": threshold,
        "target_ratio": cfg.hard_example_ratio,
        "achieved_ratio": hard / conf.numel(),
        "calibration_split": split,
        "confidence": cfg.hard_examples.confidence,
        "exit_layer": cfg.phase1.layers,
        "num_tokens": conf.numel(),
        "num_hard": hard,
        "num_easy": conf.numel() - hard,
        "confidence_stats": {"mean": float(conf.double().mean()), "std": float(conf.double().std()),
                             "min": float(conf.min()), "max": float(conf.max()),
                             **{f"q{int(q * 100):02d}": exact_quantile(conf, q) for q in qs}},
    }
    if distributed.is_main():
        write_json(path, info)
    log.info("threshold %.6g on %s: %d of %d tokens hard (%.3f, target %.3f)", threshold, split, hard,
             conf.numel(), info["achieved_ratio"], cfg.hard_example_ratio)
    return info


def require_threshold(cfg, run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "hard_examples" / "threshold.json"
    if not path.exists():
        raise StageError(f"stages={cfg.stages} needs the threshold at {path}; include hard_examples in stages")
    return read_json(path)


def hard_loader(cfg, model1, loader, threshold: float, device, store_dir: Path, *, shuffle: bool, what: str):
    """Hard examples of `loader` (this rank's shard under torch.distributed) and a loader over them."""
    if distributed.is_distributed():
        store_dir = store_dir / f"rank{distributed.rank()}"  # scratch; removed with its stage's scratch dir
    hard = collect_hard_examples(model1, loader, threshold, device, measure=cfg.hard_examples.confidence,
                                 store=cfg.hard_examples.store, store_dir=str(store_dir))
    counts = distributed.all_reduce_sum([hard["num_hard"], hard["num_tokens"], len(hard["targets"])])
    log.info("%s: %d hard tokens of %d in %d sequences", what, *map(int, counts))
    return create_hard_example_loader(hard, cfg.phase2.batch_size, shuffle=shuffle, seed=cfg.seed,
                                      device=device), hard


def stage_phase2(cfg, corpus, model1, threshold: float, loaders, run_dir: Path, device) -> DeepSupervisionTransformer:
    """Grow the phase-1 model and train its upper Block on the training split's hard tokens."""
    out = run_dir / "phase2"
    L1, L2 = cfg.phase1.layers, cfg.phase2.layers
    grown = lambda: model1.grow(L2, routing_threshold=threshold, deep_head=cfg.phase2.deep_head,  # noqa: E731
                                upper_context=cfg.phase2.upper_context)
    if distributed.broadcast((out / "model.pt").exists()):
        return load_model(out / "model.pt", model_args(grown()), device, "phase2 checkpoint")
    scratch = out / "scratch"
    train_hard, _ = hard_loader(cfg, model1, loaders.train_ordered, threshold, device, scratch / "train", shuffle=True,
                                what="phase2 train")
    val_hard, _ = hard_loader(cfg, model1, loaders.validation, threshold, device, scratch / "validation",
                              shuffle=False, what="phase2 validation")
    torch.manual_seed(cfg.seed + 1)
    model2 = grown()
    if cfg.model.compile:
        model2.compile_blocks()
    p2 = cfg.phase2
    optimizer = make_optimizer(model2, p2.lr, p2.weight_decay, device)
    train_batches = EpochSteps(train_hard, p2.epoch_steps)
    resume = _load_resume(out / "last.pt", model2, "phase2")

    def train_epoch(epoch: int) -> float:
        train_batches.set_epoch(epoch)
        return train_upper_layers(model2, train_batches, optimizer, corpus.vocab_size, device, L1,
                                  grad_clip=p2.grad_clip)

    result = early_stopping_loop(
        model2, train_epoch,
        lambda: evaluate_on_hard_examples(model2, val_hard, corpus.vocab_size, device, L1)["loss"],
        max_epochs=p2.max_epochs, patience=p2.patience, optimizer=optimizer, resume=resume, name="phase2",
        on_epoch_end=lambda state: _save_resume(out, state),
    )
    summary = {k: v for k, v in result.items() if k != "history"}
    if distributed.is_main():
        write_jsonl(out / "history.jsonl", result["history"])
        write_json(out / "result.json", summary)
        save_model(out / "model.pt", model2, cfg, stage="phase2", result=summary, threshold=threshold)
        (out / "last.pt").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return model2


def stage_eval(cfg, corpus, model1, model2, threshold_info, loaders, run_dir: Path, device) -> Dict[str, Any]:
    """Every reported number, on the test split: routed ASHEM, its parts, and the baselines."""
    out = run_dir / "eval"
    L1, L2 = cfg.phase1.layers, cfg.phase2.layers
    thr = threshold_info["threshold"]
    loader = loaders.test if cfg.eval.split == "test" else loaders.validation
    V = corpus.vocab_size
    routed_cfg = TrainingConfig(stages=[StageConfig((L2, L2))], routing_threshold=thr, exit_layer=L1,
                                confidence=cfg.hard_examples.confidence, upper_context=cfg.phase2.upper_context)
    metrics: Dict[str, Any] = {"split": cfg.eval.split, "threshold": thr, "exit_layer": L1, "num_layers": L2,
                               "upper_context": cfg.phase2.upper_context, "confidence": cfg.hard_examples.confidence}
    t0 = time.perf_counter()
    metrics["ashem"] = Trainer(routed_cfg, V, device).evaluate(model2, loader)
    metrics["ashem"]["wall_s"] = time.perf_counter() - t0
    # A sweep's objective (SPEC 6: nothing is chosen on test): the routed model on validation.
    metrics["ashem_validation"] = (metrics["ashem"] if cfg.eval.split == "validation"
                                   else Trainer(routed_cfg, V, device).evaluate(model2, loaders.validation))
    t0 = time.perf_counter()
    metrics["phase1_only"] = Trainer(create_standard_config(L1), V, device).evaluate(model1, loader)
    metrics["phase1_only"]["wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics["no_routing"] = Trainer(create_standard_config(L2), V, device).evaluate(model2, loader)
    metrics["no_routing"]["wall_s"] = time.perf_counter() - t0
    m = cfg.model
    metrics["ashem"].update(routed_macs(
        dim=m.dim, ffn_mult=m.ffn_mult, ffn=m.ffn, vocab_size=V, seq_len=cfg.data.seq_len, exit_layer=L1,
        num_layers=L2, shallow_ratio=metrics["ashem"]["shallow_ratio"], policy=cfg.phase2.upper_context))
    metrics["ashem"]["wall_cost"] = metrics["ashem"]["wall_s"] / metrics["no_routing"]["wall_s"]
    test_hard, _ = hard_loader(cfg, model1, loader, thr, device, out / "scratch", shuffle=False,
                               what=f"{cfg.eval.split} hard tokens")
    metrics["hard_tokens"] = {
        "phase1": evaluate_on_hard_examples(model1, test_hard, V, device, L1),
        "ashem": evaluate_on_hard_examples(model2, test_hard, V, device, L1),
    }
    shutil.rmtree(out / "scratch", ignore_errors=True)
    if cfg.eval.standard_baseline:
        std = cached_standard(cfg, corpus, loaders, L2, run_dir / "baseline", device, "baseline")
        metrics["standard"] = Trainer(create_standard_config(L2), V, device).evaluate(std, loader)
    if cfg.eval.analysis and distributed.is_main():  # per-token analysis of the whole split, on rank 0 alone
        whole = make_loaders(cfg, corpus, shard=False, device=device) if distributed.is_distributed() else loaders
        metrics["analysis"] = run_analysis(cfg, corpus, model2, metrics,
                                           whole.test if cfg.eval.split == "test" else whole.validation, out, device)
    if distributed.is_main():
        write_json(out / "metrics.json", metrics)
    return metrics


def run_analysis(cfg, corpus, model2, metrics: Dict[str, Any], loader, out: Path, device) -> Dict[str, Any]:
    """Trade-off curve, oracle, confidence diagnostics and pictures (lego.analysis) in eval/;
    returns the headline numbers kept in metrics.json (the rest is in eval/analysis.json)."""
    L1, L2 = cfg.phase1.layers, cfg.phase2.layers
    baselines = {"ashem (routed, measured)": metrics["ashem"],
                 f"phase-1 model ({L1} layers)": {**metrics["phase1_only"], "shallow_ratio": 1.0,
                                                  "compute_cost": L1 / L2},
                 "ashem, no routing": metrics["no_routing"]}
    if "standard" in metrics:
        baselines[f"standard {L2}-layer model"] = metrics["standard"]
    s = analyze(out, model=model2, loader=loader, device=device, threshold=metrics["threshold"],
                measure=cfg.hard_examples.confidence, exit_layer=L1, baselines=baselines,
                tokenizer=corpus.tokenizer, train_tokens=np.asarray(corpus.train), vocab_size=corpus.vocab_size,
                html_tokens=cfg.eval.html_tokens)
    keep = ("ppl_compute_auc", "ppl_compute_auc_per_unit", "compute_saved_at_1pct_ppl", "oracle_shallow_ratio",
            "auroc", "ece_exit")
    return {k: s[k] for k in keep if k in s}


# -- the run ------------------------------------------------------------------------------------
def run(config: ASHEMConfig, run_dir, *, resolved_yaml: Optional[str] = None) -> Dict[str, Any]:
    """Run the configured stages in `run_dir`; return the summary also written to metrics.json.

    `resolved_yaml` is the composed config as Hydra printed it (written as config_resolved.yaml);
    without it the dataclass is written as YAML. Under torchrun (WORLD_SIZE > 1) every rank
    calls this with the same `run_dir`: the ranks train together and rank 0 alone writes.
    """
    validate(config)
    distributed.setup()
    run_dir = Path(run_dir)
    busy = f"run dir {run_dir} is in use by another lego-run process; wait for it or pick another hydra.run.dir"
    if not distributed.is_main():  # rank 0 holds the lock and claims the directory for all ranks
        if not distributed.broadcast(None):  # ...and says whether it got it: every rank stops alike
            raise LockBusy(busy)
        return _run_locked(config, run_dir, resolved_yaml)
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(run_dir / ".lock", blocking=False, busy_message=busy))
        except LockBusy:
            distributed.broadcast(False)
            raise
        distributed.broadcast(True)
        remove_partial_writes(run_dir)  # litter of a killed run; nobody else writes here while we hold the lock
        return _run_locked(config, run_dir, resolved_yaml)


def _run_locked(cfg: ASHEMConfig, run_dir: Path, resolved_yaml: Optional[str]) -> Dict[str, Any]:
    claim_run_dir(run_dir, cfg)
    if distributed.is_main():
        if resolved_yaml is None:
            from omegaconf import OmegaConf

            resolved_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        write_text(run_dir / "config_resolved.yaml", resolved_yaml)
    device = setup_torch(cfg)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    with distributed.main_first():  # rank 0 tokenizes into the cache; the others then read it
        corpus = load_corpus(cfg.data)
    if distributed.is_main():
        corpus.tokenizer.save(run_dir / "tokenizer")
    loaders = make_loaders(cfg, corpus, device=device)
    timings["data"] = time.perf_counter() - t0
    log.info("corpus %s: %d / %d / %d tokens (train/validation/test), vocabulary %d", cfg.data.name,
             len(corpus.train), len(corpus.validation), len(corpus.test), corpus.vocab_size)

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        return result

    stages = set(cfg.stages)
    model1 = (timed("phase1", lambda: stage_phase1(cfg, corpus, loaders, run_dir, device)) if "phase1" in stages
              else require_phase1(cfg, corpus, run_dir, device))
    if "hard_examples" in stages:
        thr = timed("hard_examples", lambda: stage_hard_examples(cfg, model1, loaders, run_dir, device))
    elif stages & {"phase2", "eval"}:
        thr = require_threshold(cfg, run_dir)
    model2 = None
    if "phase2" in stages:
        model2 = timed("phase2", lambda: stage_phase2(cfg, corpus, model1, thr["threshold"], loaders, run_dir,
                                                      device))
    elif "eval" in stages:
        path = run_dir / "phase2" / "model.pt"
        if not path.exists():
            raise StageError(f"stages={cfg.stages} needs phase 2's result at {path}; include phase2 in stages")
        model2 = load_model(path, model_args(model1.grow(cfg.phase2.layers, routing_threshold=thr["threshold"],
                                                         deep_head=cfg.phase2.deep_head,
                                                         upper_context=cfg.phase2.upper_context)),
                            device, "phase2 checkpoint")
    metrics = None
    if "eval" in stages:
        metrics = timed("eval", lambda: stage_eval(cfg, corpus, model1, model2, thr, loaders, run_dir, device))
    summary = summarize_run(cfg, run_dir, corpus, metrics, timings)
    if distributed.is_main():
        write_json(run_dir / "metrics.json", summary)
    log.info("\n%s", format_table(summary))
    distributed.barrier()  # no rank returns before rank 0 has written everything
    return summary


def summarize_run(cfg, run_dir: Path, corpus: Corpus, metrics: Optional[dict], timings: Dict[str, float]) -> dict:
    summary: Dict[str, Any] = {"run_dir": str(run_dir), "stages": list(cfg.stages),
                               "hard_example_ratio": cfg.hard_example_ratio, "seed": cfg.seed,
                               "data": cfg.data.name, "vocab_size": corpus.vocab_size, "wall_s": timings}
    if distributed.is_distributed():
        summary["world_size"] = distributed.world_size()
    if metrics is not None:
        a = metrics["ashem"]
        summary.update({k: a[k] for k in ("acc", "ppl", "shallow_ratio", "compute_cost", "flop_cost", "wall_cost")})
        summary["threshold"] = metrics["threshold"]
        summary["val_ppl"] = metrics["ashem_validation"]["ppl"]
        summary["val_loss"] = metrics["ashem_validation"]["loss"]
        summary["phase1_ppl"] = metrics["phase1_only"]["ppl"]
        summary["no_routing_ppl"] = metrics["no_routing"]["ppl"]
        if "standard" in metrics:
            summary["standard_ppl"] = metrics["standard"]["ppl"]
        summary["hard_ppl_phase1"] = metrics["hard_tokens"]["phase1"]["ppl"]
        summary["hard_ppl_ashem"] = metrics["hard_tokens"]["ashem"]["ppl"]
        for k in ("ppl_compute_auc", "compute_saved_at_1pct_ppl", "oracle_shallow_ratio"):
            if k in metrics.get("analysis", {}):
                summary[k] = metrics["analysis"][k]
    return summary


def format_table(summary: dict) -> str:
    rows = [("run dir", summary["run_dir"])]
    if "ppl" in summary:
        rows += [("test ppl (routed)", f"{summary['ppl']:.2f}"), ("test acc (routed)", f"{summary['acc']:.4f}"),
                 ("shallow_ratio", f"{summary['shallow_ratio']:.3f}"),
                 ("compute_cost (layers)", f"{summary['compute_cost']:.3f}"),
                 ("flop_cost / wall_cost", f"{summary['flop_cost']:.3f} / {summary['wall_cost']:.3f}"),
                 ("phase-1 model ppl", f"{summary['phase1_ppl']:.2f}"),
                 ("no-routing ppl", f"{summary['no_routing_ppl']:.2f}"),
                 ("validation ppl (routed; sweep objective)", f"{summary['val_ppl']:.2f}")]
        if "standard_ppl" in summary:
            rows.append(("standard baseline ppl", f"{summary['standard_ppl']:.2f}"))
        rows.append(("hard-token ppl phase1 -> ashem",
                     f"{summary['hard_ppl_phase1']:.2f} -> {summary['hard_ppl_ashem']:.2f}"))
        if "oracle_shallow_ratio" in summary:
            rows += [("oracle exit share", f"{summary['oracle_shallow_ratio']:.3f}"),
                     ("compute saved at <=1% ppl loss", f"{summary['compute_saved_at_1pct_ppl']:.3f}")]
    rows.append(("wall time", ", ".join(f"{k} {v:.1f}s" for k, v in summary["wall_s"].items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

