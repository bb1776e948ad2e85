"""Generation rows of scripts/bench.py (`--only gen`): ms per generated token of each decoder over dense decoding.

    python scripts/bench.py --only gen --gen-models deep --gen-layers 8 --gen-exit 2 --gen-adaptive

Per (model, batch): dense KV-cached decoding; routed decoding under each upper-context policy
(threshold = the median exit confidence along the text that routed decoding itself produces under that policy,
found by a few fixed-point rounds from the dense greedy text, so that about half of the generated tokens exit);
self-speculative decoding for each --gen-k, fixed and (with --gen-adaptive) adaptive (drafting stops
below the dense text's median exit confidence); and "upper=0", whose zeroed upper layers make the deep model equal the draft
(acceptance 1, the best case). Random weights: acceptance and exit shares say little about text.
Each (model, batch) also gets c, Block 1 + the exit head over a dense one-token step (FLOPs from
lego/cost.py, and wall-clock), the exit head's share of a dense step, and R, the upper Block over a 3-position
verification chunk over one position (wall-clock); then the share of decode
time spent outside matmul/attention kernels (torch.profiler), the per-token Python overhead.
"""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import OmegaConf

from lego.confidence import confidence_from_logits, exact_quantile
from lego.config import UPPER_CONTEXTS, Routing
from lego.cost import head_macs, routed_macs
from lego.generate import generate
from lego.kvcache import CachedModel, Positions

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")


def outside_matmul(fn) -> float:
    """Share of `fn()`'s self CPU time spent outside matmul and attention kernels (torch.profiler).

    Both the kernels' time and the total come from the same profiled run, so the share stays in
    [0, 1] however busy the machine is (a wall-clock total from another run did not)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kernels = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS or "scaled_dot_product" in e.key)
    return 1 - kernels / total if total else float("nan")


def step_costs(model, prompts, repeats: int = 20, verify: int = 3) -> dict:
    """Median seconds of one cached one-token step at the prompts' end: the dense step, Block 1 + the
    exit head, the exit head alone, the upper Block + deep head over one position and over `verify` positions
    (a k = verify - 1 verification chunk); c = (Block 1 + exit head) / dense step, head share = head / step,
    R = upper over `verify` positions / upper over one (1 where a chunk costs what one position does)."""
    B, P = len(prompts), len(prompts[0])
    state = CachedModel(model, B, P + verify)
    tok = torch.tensor([p[-1] for p in prompts])
    at, chunk = Positions.aligned(P, 1), Positions.aligned(P, verify)
    with torch.inference_mode():
        state.prefill(torch.tensor(prompts), [P] * B)
        h = state.lower(tok.unsqueeze(1), at)
        hv = state.lower(tok.unsqueeze(1).expand(B, verify), chunk)
        fns = {"dense": lambda: state.step(tok, at), "lower_exit": lambda: state.exit_logits(state.lower(
            tok.unsqueeze(1), at)), "head": lambda: state.exit_logits(h),
            "upper": lambda: state.deep_logits(state.upper(h, at)),
            "upper_chunk": lambda: state.deep_logits(state.upper(hv, chunk))}
        times = {name: [] for name in fns}
        for _ in range(repeats + 2):  # interleaved, the first two rounds are warm-up
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    sec = {name: statistics.median(t[2:]) for name, t in times.items()}
    return {"step_ms": 1e3 * sec["dense"], "c_wall": sec["lower_exit"] / sec["dense"],
            "head_share_wall": sec["head"] / sec["dense"], "verify_positions": verify,
            "verify_ratio": sec["upper_chunk"] / sec["upper"]}


def exit_confidences(model, prompts, tokens, exit_layer: int) -> torch.Tensor:
    """Max-prob exit confidences at the positions that predicted each new token (B, N)."""
    P = len(prompts[0])
    with torch.no_grad():
        seq = torch.tensor([p + t for p, t in zip(prompts, tokens)], device=next(model.parameters()).device)
        h = model.run_layers(model.embed(seq), 0, exit_layer)
        return confidence_from_logits(model.logits_at(h, exit_layer).float(), "max_prob")[:, P - 1:-1]


def routed_median(model, prompts, N: int, exit_layer: int, threshold: float, policy: str, rounds: int = 4) -> float:
    """A threshold at which about half of routed decoding's own tokens exit: routed text changes with the
    threshold, so take the median exit confidence along the routed text, decode again, `rounds` times."""
    for _ in range(rounds):
        r = generate(model, prompts, max_new_tokens=N, decoder="routed", routing=Routing((threshold,), policy))
        threshold = exact_quantile(exit_confidences(model, prompts, r.tokens, exit_layer), 0.5)
    return threshold


def bench_generation(args, device, build, grown, conf_dir) -> dict:
    """Rows per (model, batch, decoder): ms per generated token, time and FLOP ratios over dense decoding.
    `build(preset, vocab, seed, num_layers)` and `grown(model, exit_layer)` make the
    models; presets are `conf_dir/<name>.yaml`."""
    V, P, N, E, L = args.vocab, args.gen_prompt, args.gen_tokens, args.gen_exit, args.gen_layers
    rows, overhead, steps = [], [], []
    for name in args.gen_models:
        preset = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{name}.yaml"))
        if args.exit_head:
            preset.update(exit_head=args.exit_head, exit_rank=args.exit_rank)
        rank = preset.get("exit_rank") if preset.get("exit_head") == "lowrank" else None
        base = build(preset, V, args.seed, L).to(device)
        agree = grown(base, E).eval()  # upper layers add nothing: the deep model equals the draft
        with torch.no_grad():
            for layer in agree.layers[E:]:
                for lin in (layer.attn_out, layer.mlp.proj):
                    lin.weight.zero_()
                    lin.bias.zero_()
        cost_args = dict(dim=preset["dim"], ffn_mult=preset["ffn_mult"], ffn=preset["ffn"], vocab_size=V,
                         seq_len=P + N, exit_layer=E, num_layers=L, exit_rank=rank)
        full_macs = routed_macs(**cost_args, shallow_ratio=0.0, policy="full")["full_depth_macs_per_token"]
        head = head_macs(preset["dim"], V, rank)
        c_flops = routed_macs(**cost_args, shallow_ratio=1.0, policy="skip")["flop_cost"]
        for B in args.gen_batches:
            g = torch.Generator().manual_seed(args.seed + B)
            prompts = torch.randint(0, V, (B, P), generator=g).tolist()
            ref = grown(base, E).eval()
            dense = generate(ref, prompts, max_new_tokens=N)
            thr = exact_quantile(exit_confidences(ref, prompts, dense.tokens, E), 0.5)  # of the dense greedy text
            routed_thr = {policy: routed_median(ref, prompts, N, E, thr, policy) for policy in UPPER_CONTEXTS}
            steps.append({"model": name, "batch": B, "c_flops": c_flops, "head_share_flops": head / full_macs,
                          **step_costs(ref, prompts)})
            cases = {"dense": (ref, dict(decoder="dense"))}
            for policy in UPPER_CONTEXTS:
                cases[f"routed {policy}"] = (ref, dict(decoder="routed", routing=Routing((routed_thr[policy],), policy)))
            for k in args.gen_k:
                cases[f"speculative k={k}"] = (ref, dict(decoder="speculative", k=k))
                if args.gen_adaptive:
                    cases[f"speculative k<={k} adaptive"] = (ref, dict(decoder="speculative", k=k, adaptive=True,
                                                                      routing=Routing((thr,))))
            k = max(args.gen_k)
            cases[f"speculative k={k} upper=0"] = (agree, dict(decoder="speculative", k=k))
            last = {}

            def timed(model, kw, key):
                def fn():
                    last[key] = generate(model, prompts, max_new_tokens=N, **kw)
                    return last[key]
                return fn

            fns = {c: timed(m, kw, c) for c, (m, kw) in cases.items()}
            for fn in fns.values():  # warm-up
                fn()
            per_round = {c: [] for c in cases}
            for _ in range(args.gen_rounds):
                for c, fn in fns.items():
                    r = fn()
                    per_round[c].append(r.decode_s / (r.n_tokens - B))  # the first token comes from the prefill
            for c in cases:
                r = last[c]
                sec = statistics.median(per_round[c])
                ratio = statistics.median(t / d for t, d in zip(per_round[c], per_round["dense"]))
                if c.startswith("routed"):
                    flop = routed_macs(**cost_args, shallow_ratio=r.exit_share, policy=c.split()[1])["flop_cost"]
                elif c.startswith("speculative"):
                    # every verified position runs all layers and the deep head; each exit-head row adds a head
                    flop = ((r.extra["positions_verified"] * full_macs + r.extra["exit_heads"] * head)
                            / ((r.n_tokens - B) * full_macs))
                else:
                    flop = 1.0
                rows.append({"model": name, "batch": B, "case": c, "ms_per_token": 1e3 * sec, "time_ratio": ratio,
                             "flop_ratio": flop, "exit_share": r.exit_share if c.startswith("routed") else None,
                             "acceptance": r.acceptance_rate,
                             "threshold": routed_thr[c.split()[1]] if c.startswith("routed") else None,
                             "drafts_per_round": (r.drafted / B / r.extra["rounds"]) if "rounds" in r.extra else None,
                             "ragged_chunks": r.extra.get("ragged_chunks")})
                if c in ("dense", "routed propagate", f"speculative k={k}"):
                    overhead.append({"model": name, "batch": B, "case": c, "outside_matmul": outside_matmul(fns[c])})
    return {"prompt_len": P, "new_tokens": N, "num_layers": L, "exit_layer": E, "rows": rows, "steps": steps,
            "overhead": overhead}


def format_generation(gen: dict) -> str:
    lines = [f"generation: exit after layer {gen['exit_layer']} of {gen['num_layers']}; prompt {gen['prompt_len']} + "
             f"{gen['new_tokens']} new tokens; ms per generated token (decode only), time and FLOP ratios over dense "
             "KV-cached decoding; drafts = drafts per row per round",
             f"{'model':<6} {'batch':>5} {'case':<28} {'ms/token':>9} {'time ratio':>10} {'flop ratio':>10} "
             f"{'exit':>6} {'accept':>6} {'drafts':>6}"]
    for r in gen["rows"]:
        ex = "" if r["exit_share"] is None else f"{r['exit_share']:.2f}"
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        dr = "" if r.get("drafts_per_round") is None else f"{r['drafts_per_round']:.2f}"
        lines.append(f"{r['model']:<6} {r['batch']:>5} {r['case']:<28} {r['ms_per_token']:9.3f} "
                     f"{r['time_ratio']:10.3f} {r['flop_ratio']:10.3f} {ex:>6} {acc:>6} {dr:>6}")
    for s in gen.get("steps", []):
        lines.append(f"{s['model']} b{s['batch']}: dense step {s['step_ms']:.3f} ms; c (Block 1 + exit head over a "
                     f"dense step) = {s['c_flops']:.3f} FLOPs, {s['c_wall']:.3f} wall; exit head share of a step = "
                     f"{s['head_share_flops']:.3f} FLOPs, {s['head_share_wall']:.3f} wall; R (upper Block over "
                     f"{s['verify_positions']} positions / over one) = {s['verify_ratio']:.2f} wall")
    lines.append("share of generation time outside matmul/attention kernels (per-token overhead): " + ", ".join(
        f"{o['model']} b{o['batch']} {o['case']} {o['outside_matmul']:.2f}" for o in gen["overhead"]))
    return "\n".join(lines)
