"""Routed upper layers with and without a fixed capacity: the time of one training step of the upper Block.

    python scripts/bench_capacity.py                     # model=tiny, 4 layers (exit 2), T 256, batch 16
    python scripts/bench_capacity.py --threads 1 --no-compile --ratios 0.3

A 4-layer model of `conf/model/<model>.yaml` on seeded random exit-layer states and a random hard mask (each
token hard with probability --ratios): forward and backward of layers 3-4 (`run_layers(..., hard=)`), as
phase 2 trains them. Cases, per policy and hard ratio:
  - full: every token through every layer, the reference;
  - routed: exactly the hard tokens (`capacity=None`: nonzero and a host sync per layer);
  - capacity: `routing_capacity(ratio, T, --slack)` slots per row (static shapes, no host sync);
  - capacity compiled: the same under torch.compile(fullgraph=True) (skip with --no-compile).
Cases alternate round by round and the fastest round of each is kept (load from other processes hits
every case alike). Prints a table with the overflow share (hard tokens beyond capacity). Not a test:
timings go in the README or a report, never in assertions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lego.config import ModelConfig
from lego.model import Model, ModelArgs
from lego.routed_layer import capacity_mask, routing_capacity

CONF = Path(__file__).resolve().parents[1] / "lego" / "conf" / "model"
EXIT_LAYER, NUM_LAYERS = 2, 4


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--policies", nargs="+", default=["propagate", "skip"])
    ap.add_argument("--slack", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{a.model}.yaml"))
    shape = ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__})
    shape.precision, shape.max_seq_len = "fp32", max(shape.max_seq_len, a.seq_len)
    torch.manual_seed(0)
    model = Model(ModelArgs.from_config(shape, 64, NUM_LAYERS)).train()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.batch, a.seq_len, shape.dim, generator=g)  # (B, T, C) exit-layer states
    w = torch.randn(h.shape, generator=g)  # a fixed readout, so backward has something to carry

    def step(hard, policy, capacity, run=None):
        run = run or (lambda x: model.run_layers(x, EXIT_LAYER, NUM_LAYERS, hard=hard, policy=policy,
                                                 capacity=capacity))
        x = h.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        (run(x) * w).sum().backward()

    cases = {"full": dict(hard=None, policy="full", capacity=None, ratio=1.0, slots=a.seq_len, overflow=0.0)}
    for ratio in a.ratios:
        hard = torch.rand(a.batch, a.seq_len, generator=g) < ratio
        slots = routing_capacity(ratio, a.seq_len, slack=a.slack)
        overflow = float(capacity_mask(hard, slots)[1]) / max(1, int(hard.sum()))
        for policy in a.policies:
            common = dict(hard=hard, policy=policy, ratio=ratio, slots=slots, overflow=overflow)
            cases[f"routed {policy} @{ratio}"] = dict(common, capacity=None, slots=int(hard.sum(1).max()), overflow=0.0)
            cases[f"capacity {policy} @{ratio}"] = dict(common, capacity=slots)
            if not a.no_compile:
                fn = (lambda hard, policy, slots: lambda x: model.run_layers(
                    x, EXIT_LAYER, NUM_LAYERS, hard=hard, policy=policy, capacity=slots))(hard, policy, slots)
                cases[f"capacity compiled {policy} @{ratio}"] = dict(common, capacity=slots,
                                                                     run=torch.compile(fn, fullgraph=True))
    best, compile_s = {}, {}
    for name, c in cases.items():  # warm-up (and compilation, timed apart)
        t0 = time.perf_counter()
        step(c["hard"], c["policy"], c["capacity"], c.get("run"))
        compile_s[name] = time.perf_counter() - t0
    for _ in range(a.rounds):
        for name, c in cases.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(c["hard"], c["policy"], c["capacity"], c.get("run"))
            ms = 1e3 * (time.perf_counter() - t0) / a.steps
            best[name] = min(best.get(name, ms), ms)
    rows = [dict(case=name, hard_ratio=c["ratio"], slots_per_row=c["slots"], overflow_share=round(c["overflow"], 4),
                 ms_per_step=round(best[name], 2), vs_full=round(best["full"] / best[name], 2),
                 first_call_s=round(compile_s[name], 1)) for name, c in cases.items()]
    print(f"model={a.model} (dim {shape.dim}, layers {EXIT_LAYER + 1}-{NUM_LAYERS} of {NUM_LAYERS}), batch "
          f"{a.batch} x {a.seq_len}, slack {a.slack}, {torch.get_num_threads()} threads, forward + backward")
    print("| case | slots per row | overflow | ms per step (fastest round) | speed vs full | first call (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['slots_per_row']} | {100 * r['overflow_share']:.1f}% | {r['ms_per_step']:.1f} | "
              f"{r['vs_full']:.2f}x | {r['first_call_s']:.1f} |")
    if a.out is not None:
        a.out.write_text(json.dumps({"settings": {**vars(a), "out": str(a.out), "threads": torch.get_num_threads()},
                                     "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
