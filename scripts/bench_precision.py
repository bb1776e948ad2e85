"""The training step in fp32 and under bf16 autocast on this CPU, the default run's shape.

    python scripts/bench_precision.py                    # model=tiny, 4 layers, T 128, batch 32, vocab 2048
    python scripts/bench_precision.py --threads 1 --rounds 7

A 4-layer model of `conf/model/<model>.yaml` on seeded random tokens: forward, loss, backward and a fused
AdamW step, as phase 1 trains. The two precisions alternate round by round (the fastest round of each is kept:
load from other processes hits both alike). Prints a table, and whether this CPU multiplies bf16 natively
(`lego.model.cpu_bf16`). Not a test: timings go in the README, never in assertions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lego.config import ModelConfig
from lego.model import Model, ModelArgs, cpu_bf16

CONF = Path(__file__).resolve().parents[1] / "lego" / "conf" / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{a.model}.yaml"))
    shape = ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__})
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=g)
    models, opts, best = {}, {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        shape.precision = precision
        models[precision] = Model(ModelArgs.from_config(shape, a.vocab, a.layers)).train()
        opts[precision] = torch.optim.AdamW(models[precision].parameters(), lr=1e-4, fused=True)

    def step(precision: str) -> None:
        m, opt = models[precision], opts[precision]
        loss = F.cross_entropy(m(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for precision in models:  # warm-up
        step(precision)
    for _ in range(a.rounds):
        for precision in models:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(precision)
            ms = 1e3 * (time.perf_counter() - t0) / a.steps
            best[precision] = min(best.get(precision, ms), ms)
    print(f"model={a.model} ({a.layers} layers, dim {shape.dim}), vocab {a.vocab}, batch {a.batch} x {a.seq_len}, "
          f"{torch.get_num_threads()} threads; native bf16: {cpu_bf16() or 'none'}")
    print("| precision | ms per training step (fastest round) | vs fp32 |\n|---|---|---|")
    for precision, ms in best.items():
        print(f"| {precision} | {ms:.0f} | {best['fp32'] / ms:.2f}x |")
    if a.out is not None:
        a.out.write_text(json.dumps({"settings": {**vars(a), "out": str(a.out), "threads": torch.get_num_threads(),
                                                  "native_bf16": cpu_bf16()},
                                     "ms_per_step": best, "bf16_speedup": best["fp32"] / best["bf16"]}, indent=1))


if __name__ == "__main__":
    main()
