"""Wall-clock against FLOPs: does routing (and training only the upper Block) save real time?

    python scripts/bench.py --model small --out bench.json
    python scripts/bench.py --model tiny --repeats 30 --skip-threshold
    python scripts/bench.py --only gen --threads 1   # generation: tiny and small, batch 1 and 8 (~1 min)

Builds `conf/model/<name>.yaml` with 4 layers (exit after 2) on seeded random tokens and times,
as median tokens/s over repeated steps after warm-up:
  - a full-model training step (loss at layer 4, every parameter, fused AdamW), the training reference;
  - a phase-2 training step (`train_upper_layers` on one batch of stored exit-layer states, loss
    at hard positions only, hard ratio --train-ratio) under each upper-context policy, and once
    recomputing the states from token ids (hard_examples.store=recompute);
  - full-depth evaluation (`Trainer.evaluate`, no routing), the evaluation reference;
  - routed evaluation under full / propagate / skip at hard ratios 0.3 / 0.5 / 0.7 (the threshold
    is the exact quantile of the batch's own exit confidences, so the ratio is met);
  - generation (only with --only gen; scripts/bench_generation.py): per generated token, dense KV-cached
    decoding against routed decoding under each upper-context policy and self-speculative decoding
    (fixed k, adaptive with --gen-adaptive), with c and the exit head's share of a step; the model's depth
    and exit with --gen-layers / --gen-exit, its head with --exit-head / --exit-rank. The deep preset:
    python scripts/bench.py --only gen --gen-models deep --gen-layers 8 --gen-adaptive --threads 2
  - `exact_quantile` over --threshold-n values (default 10^8) in a child process: time, peak RSS,
    and a counting check that the result is the exact order statistic.
Each row gives time / reference time ("time ratio") next to the FLOP ratio from lego/cost.py
that the row should reach ("flop ratio"). Cases run round-robin, so load from other processes
hits every row alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lego.config import IGNORE_INDEX
from lego.confidence import confidence_from_logits, exact_quantile
from lego.ashem import grow, train_upper_layers
from lego.cost import phase2_step_macs, routed_macs
from lego.config import UPPER_CONTEXTS
from lego.model import Model, ModelArgs
from lego.config import StageConfig, TrainingConfig, create_standard_config
from lego.training import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_generation, also when loaded from a file path
from bench_generation import bench_generation, format_generation  # noqa: E402
EXIT_LAYER, NUM_LAYERS = 2, 4


def build(preset: dict, vocab: int, seed: int, num_layers: int = NUM_LAYERS) -> Model:
    torch.manual_seed(seed)
    return Model(ModelArgs(vocab, preset["dim"], num_layers, preset["num_heads"], max_seq_len=preset["max_seq_len"],
                           dropout=preset["dropout"], norm=preset["norm"], pos=preset["pos"], ffn=preset["ffn"],
                           ffn_mult=preset["ffn_mult"], exit_head=preset.get("exit_head", "separate"),
                           exit_rank=preset.get("exit_rank")))


def grown(model: Model, exit_layer: int = EXIT_LAYER) -> Model:
    """A phase-2 model of `model`'s depth: lower Block and exit head of `model` frozen, as `grow` makes it."""
    small = Model(replace(model.args, num_layers=exit_layer))
    small.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < exit_layer}, strict=False)
    big = grow(small, model.num_layers, deep_head=True)
    for i in range(exit_layer, model.num_layers):  # same upper weights for every policy
        big.layers[i].load_state_dict(model.layers[i].state_dict())
    return big


def adamw(model):
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-4)


def time_cases(cases: dict, *, warmup: int, repeats: int, rounds: int, sync) -> dict:
    """Seconds per call of each case: {name: [median of round 1, round 2, ...]}.

    Each round runs every case `repeats` times, one case after another, so a burst of load
    from another process lands on neighbouring cases alike; ratios are taken within a round.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    per_round = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                samples.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(samples))
    return per_round


def rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in GiB.

    Not ru_maxrss: Linux carries that over exec from the parent, so a child would report the
    benchmark's own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{field} not in /proc/self/status")


def threshold_child(n: int, q: float, seed: int) -> dict:
    """Runs in a fresh process so that its peak RSS is the quantile's (plus torch and the input)."""
    base = rss_gb("VmRSS")
    values = torch.rand(n, generator=torch.Generator().manual_seed(seed))  # float32, like confidences
    with_input = rss_gb("VmRSS")
    t0 = time.perf_counter()
    thr = exact_quantile(values, q)
    seconds = time.perf_counter() - t0
    peak = rss_gb("VmHWM")
    # exact: recompute both order statistics independently (torch.kthvalue) and interpolate as torch.quantile
    rank = q * (n - 1)
    lo = int(rank)
    hi = min(lo + 1, n - 1)
    v_lo, v_hi = (float(torch.kthvalue(values, k + 1).values) for k in (lo, hi))
    expect = float(torch.lerp(torch.tensor(v_lo, dtype=torch.float64), torch.tensor(v_hi, dtype=torch.float64),
                              rank - lo))
    return {"n": n, "q": q, "threshold": thr, "seconds": seconds, "peak_rss_gb": peak, "rss_before_input_gb": base,
            "rss_with_input_gb": with_input, "peak_over_input_gb": peak - with_input, "exact": thr == expect,
            "kthvalue_reference": expect}


def bench_threshold(n: int, q: float, seed: int) -> dict:
    code = f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench; " \
           f"print(json.dumps(bench.threshold_child({n}, {q}, {seed})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(f.stem for f in CONF.glob("*.yaml")))
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-ratio", type=float, default=0.5, help="hard ratio of the phase-2 training rows")
    p.add_argument("--eval-ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="calls per case per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threshold-n", type=float, default=1e8)
    p.add_argument("--skip-threshold", action="store_true")
    p.add_argument("--only", choices=["train", "eval", "gen"],
                   help="run only the training, evaluation or generation rows")
    p.add_argument("--gen-models", nargs="+", default=["tiny", "small"])
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gen-prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--gen-k", type=int, nargs="+", default=[2, 4], help="speculative draft lengths")
    p.add_argument("--gen-rounds", type=int, default=3, help="timed runs of each generation case")
    p.add_argument("--gen-layers", type=int, default=NUM_LAYERS, help="generation: the model's depth")
    p.add_argument("--gen-exit", type=int, default=EXIT_LAYER, help="generation: the exit layer")
    p.add_argument("--exit-head", choices=["separate", "tied", "lowrank"], help="generation: model.exit_head")
    p.add_argument("--exit-rank", type=int, help="generation: model.exit_rank (with --exit-head lowrank)")
    p.add_argument("--gen-adaptive", action="store_true", help="generation: adaptive drafting rows, up to each k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    preset = OmegaConf.to_container(OmegaConf.load(CONF / f"{args.model}.yaml"))
    B, T, V = args.batch, args.seq_len, args.vocab
    g = torch.Generator().manual_seed(args.seed)
    seq = torch.randint(0, V, (B, T + 1), generator=g)
    x, y = seq[:, :-1].to(device), seq[:, 1:].to(device)
    base = build(preset, V, args.seed).to(device)
    with torch.no_grad():
        h_exit = base.run_layers(base.embed(x), 0, EXIT_LAYER)  # stored states, (B, T, C)
        conf = confidence_from_logits(base.output_head(h_exit).float(), "max_prob")
    cost_args = dict(dim=preset["dim"], ffn_mult=preset["ffn_mult"], ffn=preset["ffn"], vocab_size=V, seq_len=T,
                     exit_layer=EXIT_LAYER, num_layers=NUM_LAYERS)
    run = dict(warmup=args.warmup, repeats=args.repeats, rounds=args.rounds, sync=sync)
    rows = []
    load_before = os.getloadavg()  # other processes' load skews timings: rerun when these are high

    def add(kind, name, per_round, ref_rounds, flop_ratio, **extra):
        seconds = statistics.median(per_round)
        ratio = statistics.median(t / r for t, r in zip(per_round, ref_rounds))  # within-round ratios
        rows.append({"kind": kind, "case": name, "ms": 1e3 * seconds, "tokens_per_s": B * T / seconds,
                     "time_ratio": ratio, "flop_ratio": flop_ratio, "ms_per_round": [1e3 * t for t in per_round],
                     **extra})

    if args.only in (None, "train"):
        full = build(preset, V, args.seed).to(device).train()
        opt_full, trainer = adamw(full), Trainer(create_standard_config(NUM_LAYERS), V, device, progress=False)

        def full_step():
            total, n = trainer.stage_loss_sum(full, x, y)
            opt_full.zero_grad(set_to_none=True)
            (total / n).backward()
            torch.nn.utils.clip_grad_norm_([q for q in full.parameters() if q.requires_grad], 1.0)
            opt_full.step()

        thr = exact_quantile(conf, args.train_ratio)
        hard_y = torch.where(conf < thr, y, torch.full_like(y, IGNORE_INDEX))
        cases, ratio = {"full-model step": full_step}, {}
        for policy in UPPER_CONTEXTS:
            for store in ("memory", "recompute") if policy == "full" else ("memory",):
                m = grown(base).to(device)
                batch = [(h_exit if store == "memory" else x, hard_y)]
                o = adamw(m)
                name = f"phase-2 step {policy}" + (" (recompute)" if store == "recompute" else "")
                cases[name] = (lambda m=m, o=o, batch=batch, policy=policy: train_upper_layers(
                    m, batch, o, V, device, EXIT_LAYER, grad_clip=1.0, policy=policy))
                ratio[name] = phase2_step_macs(**cost_args, hard_ratio=float((hard_y != IGNORE_INDEX).float().mean()),
                                               policy=policy, recompute=store == "recompute")["flop_ratio"]
        times = time_cases(cases, **run)
        ref = times["full-model step"]
        add("train", "full-model step", ref, ref, 1.0)
        for name, r in ratio.items():
            add("train", name, times[name], ref, r, hard_ratio=args.train_ratio)

    if args.only in (None, "eval"):
        batches = [(x, y)]
        ref_model = grown(base).eval()
        plain = Trainer(create_standard_config(NUM_LAYERS), V, device, progress=False)
        cases, ratio = {"full-depth eval": lambda: plain.evaluate(ref_model, batches)}, {}
        for r in args.eval_ratios:
            thr = exact_quantile(conf, r)
            for policy in UPPER_CONTEXTS:
                cfg = TrainingConfig(stages=[StageConfig((NUM_LAYERS, NUM_LAYERS))], routing_threshold=thr,
                                     exit_layer=EXIT_LAYER, upper_context=policy)
                tr = Trainer(cfg, V, device, progress=False)
                name = f"routed eval {policy} @{r:.1f}"
                cases[name] = (lambda tr=tr: tr.evaluate(ref_model, batches))
                shallow = float((conf >= thr).float().mean())
                ratio[name] = (routed_macs(**cost_args, shallow_ratio=shallow, policy=policy)["flop_cost"], 1 - shallow)
        times = time_cases(cases, **run)
        ref = times["full-depth eval"]
        add("eval", "full-depth eval", ref, ref, 1.0)
        for name, (fr, hr) in ratio.items():
            add("eval", name, times[name], ref, fr, hard_ratio=hr)

    gen = bench_generation(args, device, build, grown, CONF) if args.only == "gen" else None
    load_after = os.getloadavg()
    result = {"model": args.model, "preset": preset, "vocab": V, "seq_len": T, "batch": B,
              "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
              "machine": platform.platform(), "warmup": args.warmup, "repeats": args.repeats,
              "rounds": args.rounds, "loadavg_before": load_before, "loadavg_after": load_after,
              "rows": rows, "generation": gen}
    if not args.skip_threshold and args.only != "gen":
        result["threshold"] = bench_threshold(int(args.threshold_n), 0.5, args.seed)
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    shape = (f"model={result['model']} dim={result['preset']['dim']} seq_len={result['seq_len']} "
             f"batch={result['batch']} " if result["rows"] else "")  # the training and evaluation rows' shape
    head = (f"{shape}vocab={result['vocab']} threads={result['threads']} device={result['device']} "
            f"torch={result['torch']} load avg {result['loadavg_before'][0]:.2f} -> {result['loadavg_after'][0]:.2f}")
    lines = [head]
    if result["rows"]:
        lines.append(f"{'case':<30} {'ms':>9} {'tokens/s':>10} {'time ratio':>10} {'flop ratio':>10}")
    for r in result["rows"]:
        lines.append(f"{r['case']:<30} {r['ms']:9.2f} {r['tokens_per_s']:10.0f} {r['time_ratio']:10.3f} "
                     f"{r['flop_ratio']:10.3f}")
    if result.get("generation"):
        lines.append(format_generation(result["generation"]))
    if "threshold" in result:
        t = result["threshold"]
        lines.append(f"threshold over {t['n']:.0e} values: {t['seconds']:.2f} s, peak RSS {t['peak_rss_gb']:.2f} GB "
                     f"({t['peak_over_input_gb']:.2f} GB over the {t['rss_with_input_gb']:.2f} GB holding the input), "
                     f"exact={t['exact']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
