"""Generation with early exit: dense, routed (under a `Routing`) and self-speculative decoding.

    result = generate(model, [[5, 3, 9], [7]], max_new_tokens=16, decoder="routed",
                      routing=Routing((threshold,), policy="propagate"))
    result.tokens   # new tokens per prompt; result.exited: which came from the exit head

- dense: every token through every layer, deep head at the last layer (the reference).
- routed: at each position the exit confidence (`routing.measure` or its learned router, as
  `Trainer.evaluate` computes it) >= `routing.threshold` predicts the next token from the exit head;
  other positions continue to the last layer. What an exited position leaves in the upper
  layers' caches follows `routing.policy` (full: everything; propagate: keys/values of its
  exit-layer state; skip: nothing), so the logits decoding produces equal those of the
  teacher-forced routed forward of the same sequence (`teacher_forced_logits`).
- speculative: layers 1..exit_layer with the exit head draft k tokens; the dense model verifies
  them in one pass over the drafted positions from the drafted exit-layer states; the longest
  agreeing prefix plus one corrected token is kept and the rest is rolled back from every cache
  (`lego.speculative`). `adaptive=True` stops drafting below the routing threshold (up to k).
  Greedy output equals dense greedy; sampling keeps the dense model's distribution.

Rows of a batch keep their own positions (slot = position), so batched prompts of different
lengths give the tokens each prompt gives alone. Prompts of one length stay aligned: speculative rows
then keep the smallest accepted count of the batch, so no step takes the per-row-position path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from lego.artifacts import write_json, write_text
from lego.config import DECODERS, ConfigError, Routing
from lego.confidence import exit_confidence
from lego.kvcache import CachedModel, Positions
from lego.model import Model
from lego.sampling import Sampler
from lego.speculative import speculative_round


@dataclass
class Generation:
    """What `generate` returns; lists are per prompt, in the prompts' order."""

    tokens: List[List[int]]  # new tokens (cut after `stop_token`, inclusive)
    exited: List[List[bool]]  # routed: predicted by the exit head; speculative: an accepted draft
    decoder: str
    drafted: int = 0  # speculative: drafts proposed
    accepted: int = 0  # speculative: drafts accepted
    prefill_s: float = 0.0
    decode_s: float = 0.0
    logits: Optional[List[torch.Tensor]] = None  # (n_new, V) float32 logits each new token came from
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def acceptance_rate(self) -> Optional[float]:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def exit_share(self) -> float:
        n = self.n_tokens
        return sum(sum(e) for e in self.exited) / n if n else 0.0


def check_generate_args(model, prompts, max_new_tokens, decoder, temperature, top_k, top_p, k,
                        routing: Optional[Routing] = None) -> None:
    """One-line ConfigErrors (a ValueError) naming the config key, before anything runs."""
    if decoder not in DECODERS:
        raise ConfigError(f"generate.decoders: {decoder!r} is not a decoder; choose from {', '.join(DECODERS)}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate.prompt: every prompt needs at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"generate.max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.max_seq_len:
        raise ConfigError(f"generate.max_new_tokens={max_new_tokens}: prompt ({longest} tokens) + new tokens "
                         f"exceed model.max_seq_len={model.max_seq_len}")
    if any(t < 0 or t >= model.vocab_size for p in prompts for t in p):
        raise ConfigError(f"generate.prompt: token ids must be in [0, {model.vocab_size})")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"generate.k={k!r} must be an integer >= 1")
    if temperature < 0:
        raise ConfigError(f"generate.temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"generate.top_k={top_k!r} must be None or an integer >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"generate.top_p={top_p!r} must be None or in (0, 1]")
    if decoder in ("routed", "speculative") and model.exit_layer is None:
        raise ConfigError(f"generate.decoders: {decoder} needs a model with exit_layer (a grown model)")
    if decoder == "routed" and (routing is None or routing.threshold is None):
        raise ConfigError("generate.decoders: routed needs a routing with the exit's threshold (routing=Routing(...))")


def _pad(prompts: List[List[int]], device) -> torch.Tensor:
    T = max(len(p) for p in prompts)
    return torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- decoders -----------------------------------------------------------------------------------------
def generate(model: Model, prompts: List[List[int]], *, max_new_tokens: int,
             decoder: str = "dense", routing: Optional[Routing] = None, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
             stop_token: Optional[int] = None, k: int = 4, adaptive: bool = False, align: Optional[bool] = None,
             return_logits: bool = False) -> Generation:
    """Continue every prompt by `max_new_tokens` tokens (fewer after `stop_token`) with `decoder`.

    temperature 0 is greedy; otherwise draws come from one `torch.Generator` seeded with `seed`,
    so a call is reproducible. `routing` (threshold, policy, confidence measure or learned router; the exit
    layer is the model's) is how the routed decoder routes. `k` is the speculative draft length; with
    `adaptive` at most k, drafting stops where the exit's confidence under `routing` falls below its threshold; `align`: every row keeps the smallest
    accepted count of the batch (None: when the prompts share one length, so rows never leave the aligned
    path). `return_logits` (dense, routed) keeps the
    (n_new, V) logits each new token was chosen from.
    """
    check_generate_args(model, prompts, max_new_tokens, decoder, temperature, top_k, top_p, k, routing)
    if adaptive and decoder == "speculative" and (routing is None or routing.threshold is None):
        raise ConfigError("generate.adaptive: adaptive drafting needs a routing with the exit's threshold")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    sampler = Sampler(temperature, top_k, top_p, gen)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if decoder == "speculative":
                align = len({len(p) for p in prompts}) == 1 if align is None else align
                return _speculative(model, prompts, max_new_tokens, sampler, stop_token, k,
                                    routing if adaptive else None, align, device)
            return _autoregressive(model, prompts, max_new_tokens, sampler, stop_token,
                                   routing if decoder == "routed" else None, return_logits, device)
    finally:
        model.train(was_training)


def _prefill(state: CachedModel, prompts, device):
    """Next-token logits (B, V) and exit flags (B,) at each prompt's last position."""
    lengths = [len(p) for p in prompts]
    logits, exited = state.prefill(_pad(prompts, device), lengths)
    rows = torch.arange(len(prompts), device=device)
    last = torch.tensor(lengths, device=device) - 1
    return logits[rows, last], exited[rows, last]


def _autoregressive(model, prompts, N, sampler, stop_token, routing, return_logits, device) -> Generation:
    B, lengths = len(prompts), [len(p) for p in prompts]
    state = CachedModel(model, B, max(lengths) + N - 1, routing)  # the last new token is never fed
    t0 = time.perf_counter()
    logits, exited = _prefill(state, prompts, device)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    flags = torch.zeros(B, N, dtype=torch.bool, device=device)
    kept = [logits] if return_logits else None
    tok = sampler(logits)
    out[:, 0], flags[:, 0] = tok, exited
    _sync(device)
    t1 = time.perf_counter()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ragged = len(set(lengths)) > 1
    last = torch.tensor(lengths, device=device).unsqueeze(1) - 1  # (B, 1) each prompt's last position
    n = N
    for i in range(1, N):
        if stop_token is not None:
            done |= tok == stop_token
            if bool(done.all()):
                n = i
                break
        # the pending token goes to position len + i - 1 of each row (no host-to-device copy per step)
        if ragged:
            at = Positions(None, None, last + i, 1, max(lengths) + i)
        else:
            at = Positions.aligned(lengths[0] + i - 1, 1)
        logits, exited = state.step(tok, at)
        tok = sampler(logits)
        out[:, i] = tok
        if exited is not None:
            flags[:, i] = exited
        if return_logits:
            kept.append(logits)
    _sync(device)
    t2 = time.perf_counter()
    tokens, exits = _cut_at_stop(out[:, :n].tolist(), flags[:, :n].tolist(), stop_token)
    result = Generation(tokens, exits, "dense" if routing is None else "routed", prefill_s=t1 - t0, decode_s=t2 - t1)
    if return_logits:
        stacked = torch.stack(kept, 1)  # (B, n, V)
        result.logits = [stacked[b, :len(tokens[b])].clone() for b in range(B)]
    return result


def _speculative(model, prompts, N, sampler, stop_token, k, drafting, align, device) -> Generation:
    B, lengths = len(prompts), [len(p) for p in prompts]
    state = CachedModel(model, B, max(lengths) + N - 1)
    t0 = time.perf_counter()
    logits, _ = _prefill(state, prompts, device)
    tok = sampler(logits)  # (B,) the pending token of every row: sampled, not yet in the cache
    tokens = [[t] for t in tok.tolist()]
    exits = [[False] for _ in range(B)]
    cached = list(lengths)  # positions in the cache; the pending token goes at position cached[b]
    t1 = time.perf_counter()
    drafted = accepted = fed = rounds = probed = 0
    while True:
        active = [b for b in range(B) if len(tokens[b]) < N and not (stop_token is not None
                                                                   and tokens[b][-1] == stop_token)]
        if not active:
            break
        kk = min(k, min(N - len(tokens[b]) - 1 for b in active))  # never past max_new_tokens
        tok, new, n, heads = speculative_round(state, tok, cached, active, kk, sampler, drafting, align)
        rounds += 1
        probed += len(active) * heads  # exit-head rows: the drafts and the ones that stopped drafting
        drafted += len(active) * n
        fed += len(active) * (n + 1)  # positions through every layer (and the deep head) this round
        for b, row in zip(active, new):
            accepted += len(row) - 1
            tokens[b] += row
            exits[b] += [True] * (len(row) - 1) + [False]
    _sync(device)
    t2 = time.perf_counter()
    tokens, exits = _cut_at_stop(tokens, exits, stop_token)
    return Generation(tokens, exits, "speculative", drafted=drafted, accepted=accepted, prefill_s=t1 - t0,
                      decode_s=t2 - t1, extra={"k": k, "adaptive": drafting is not None, "positions_verified": fed,
                                               "rounds": rounds, "exit_heads": probed, "ragged_chunks": state.ragged_chunks,
                                               "align": align})


def _cut_at_stop(tokens, exits, stop_token):
    """Each row up to and including its first `stop_token`."""
    if stop_token is not None:
        for b, row in enumerate(tokens):
            if stop_token in row:
                cut = row.index(stop_token) + 1
                tokens[b], exits[b] = row[:cut], exits[b][:cut]
    return tokens, exits


def teacher_forced_logits(model: Model, idx: torch.Tensor, routing: Optional[Routing] = None):
    """The logits the routed forward of `Trainer.evaluate` predicts each position from under `routing`.

    idx (B, T) -> (logits (B, T, V) float32: exit logits at exited positions, deep logits at
    the others; exited (B, T) bool). `routing=None`: the dense model's deep logits.
    """
    E, L = model.exit_layer or model.num_layers, model.num_layers
    with torch.inference_mode(), model.autocast():
        h = model.run_layers(model.embed(idx), 0, E)
        if routing is None:
            return model.logits_at(model.run_layers(h, E, L), L).float(), torch.zeros_like(idx, dtype=torch.bool)
        ex = model.logits_at(h, E).float()
        easy = exit_confidence(routing, h, ex) >= routing.threshold
        deep = model.logits_at(model.run_layers(h, E, L, hard=~easy, policy=routing.policy), L).float()
    return torch.where(easy.unsqueeze(-1), ex, deep), easy


# -- a report ----------------------------------------------------------------------------------------
def test_prompts(tokens, n: int, prompt_len: int, seed: int) -> List[List[int]]:
    """`n` prompts of `prompt_len` tokens from a 1-D array of test-split token ids, at start
    offsets drawn without replacement by numpy's generator seeded with `seed` (sorted, so the
    same (tokens, n, prompt_len, seed) always gives the same prompts in the same order)."""
    import numpy as np

    if n < 1:
        raise ConfigError(f"generate.num_prompts={n} must be >= 1")
    if prompt_len < 1:
        raise ConfigError(f"generate.prompt_len={prompt_len} must be >= 1")
    starts_available = len(tokens) - prompt_len + 1
    if starts_available < n:
        raise ConfigError(f"generate.prompt_len={prompt_len}: the test split ({len(tokens)} tokens) holds fewer "
                         f"than generate.num_prompts={n} prompts")
    starts = np.sort(np.random.default_rng(seed).choice(starts_available, size=n, replace=False))
    return [[int(t) for t in tokens[s:s + prompt_len]] for s in starts]


def agreement(tokens: List[List[int]], reference: List[List[int]]) -> float:
    """Share of the reference's tokens that `tokens` matches position by position."""
    total = sum(len(r) for r in reference)
    same = sum(a == b for row, ref in zip(tokens, reference) for a, b in zip(row, ref))
    return same / total if total else 1.0


def mark_exits(tokenizer, tokens: List[int], exited: List[bool]) -> str:
    """Decoded continuation with every early-exited (or accepted-draft) token in [brackets]."""
    return "".join(f"[{tokenizer.decode([t])}]" if e else tokenizer.decode([t]) for t, e in zip(tokens, exited))


TIMING_ROUNDS = 3


COUNTED_EXTRA = ("positions_verified", "rounds", "exit_heads", "ragged_chunks")  # speculative counters, per batch


def generate_batched(model: Model, prompts: List[List[int]], batch_size: Optional[int], **kw) -> Generation:
    """`generate` over consecutive batches of `batch_size` prompts (None: one batch), as one `Generation`: lists in
    the prompts' order, counts and seconds summed (in `extra`, the counters COUNTED_EXTRA; the settings as given)."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"generate.batch_size={batch_size!r} must be an integer >= 1, or null")
    if batch_size is None or batch_size >= len(prompts):
        return generate(model, prompts, **kw)
    parts = [generate(model, prompts[i:i + batch_size], **kw) for i in range(0, len(prompts), batch_size)]
    extra = {}
    for p in parts:
        for key, value in p.extra.items():
            extra[key] = extra.get(key, 0) + value if key in COUNTED_EXTRA else value
    logits = None if parts[0].logits is None else [x for p in parts for x in p.logits]
    return Generation(tokens=[t for p in parts for t in p.tokens], exited=[e for p in parts for e in p.exited],
                      decoder=parts[0].decoder, drafted=sum(p.drafted for p in parts),
                      accepted=sum(p.accepted for p in parts), prefill_s=sum(p.prefill_s for p in parts),
                      decode_s=sum(p.decode_s for p in parts), logits=logits, extra=extra)


def run_generation(model: Model, tokenizer, prompts: List[List[int]], *,
                   decoders=DECODERS, k_values=(2, 4), max_new_tokens: int, temperature: float = 0.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                   adaptive: bool = False, routing: Optional[Routing] = None, drafting: Optional[Routing] = None,
                   batch_size: Optional[int] = None, out_dir) -> dict:
    """Generate with each decoder (routed under `routing`; speculative once per k, and with `adaptive` once more
    per k with adaptive drafting, `speculative_adaptive_k<k>`, which stops below `drafting`'s threshold, default
    `routing`'s), write `out_dir/samples.md` and `out_dir/metrics.json`, return the metrics.

    Timings are of batches of `batch_size` prompts (None: one batch holding every prompt; 1: each prompt alone,
    the times summed over prompts), after an untimed warm-up of each decoder at that batch shape: the fastest of
    TIMING_ROUNDS rounds, decoders interleaved (the same tokens every round: greedy, or sampling from the same seed). `agreement_with_dense` compares greedy outputs (extra greedy runs when
    temperature > 0) with dense greedy, position by position.
    """
    for d in decoders:
        if d not in DECODERS:
            raise ConfigError(f"generate.decoders: {d!r} is not a decoder; choose from {', '.join(DECODERS)}")
    runs = [(d, kk) for d in decoders for kk in (k_values if d == "speculative" else (None,))]
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    routed = dict(routing=routing)
    drafted = dict(routing=drafting or routing)  # adaptive drafting: its own threshold, or the routing's
    results, greedy = {}, {}
    named = [(d if kk is None else f"speculative_k{kk}", d, {} if kk is None else {"k": kk}) for d, kk in runs]
    named += [(f"speculative_adaptive_k{kk}", d, {"k": kk, "adaptive": True, **drafted}) for d, kk in runs
              if adaptive and kk is not None]
    named = [(name, d, {**routed, **kw}) for name, d, kw in named]
    for name, d, kw in named:  # warm-up at the timed batch shape (allocator, kernel caches), untimed
        generate(model, prompts[:batch_size], **dict(opts, max_new_tokens=min(4, max_new_tokens)), decoder=d, **kw)
    for _ in range(TIMING_ROUNDS):  # decoders interleaved, each keeps its fastest round: one noisy round misleads
        for name, d, kw in named:
            r = generate_batched(model, prompts, batch_size, decoder=d, **opts, **kw)
            if name not in results or r.decode_s + r.prefill_s < results[name].decode_s + results[name].prefill_s:
                results[name] = r
    for name, d, kw in named:
        greedy[name] = results[name] if temperature == 0 else generate_batched(
            model, prompts, batch_size, decoder=d, **dict(opts, temperature=0.0), **kw)
    ref = greedy["dense"].tokens if "dense" in greedy else generate_batched(
        model, prompts, batch_size, decoder="dense", **dict(opts, temperature=0.0)).tokens
    metrics = {"settings": dict(opts, num_prompts=len(prompts), prompt_lens=[len(p) for p in prompts],
                                batch_size=batch_size or len(prompts),
                                exit_layer=model.exit_layer, num_layers=model.num_layers,
                                routing_threshold=None if routing is None else routing.threshold,
                                upper_context=None if routing is None else routing.policy,
                                confidence=None if routing is None else
                                "learned" if routing.probe is not None else routing.measure,
                                draft_threshold=None if not adaptive or (drafting or routing) is None
                                else (drafting or routing).threshold)}
    dense_ms = None
    for name, r in results.items():
        ms = 1e3 * r.decode_s / max(1, r.n_tokens - len(prompts))  # the first token comes from the prefill
        dense_ms = ms if name == "dense" else dense_ms
        metrics[name] = {"tokens": r.n_tokens, "tokens_per_s": r.n_tokens / (r.prefill_s + r.decode_s),
                         "ms_per_token": ms, "prefill_s": r.prefill_s, "decode_s": r.decode_s,
                         "exit_share": r.exit_share, "acceptance_rate": r.acceptance_rate,
                         "agreement_with_dense": agreement(greedy[name].tokens, ref)}
    for name in results:
        if dense_ms:
            metrics[name]["time_over_dense"] = metrics[name]["ms_per_token"] / dense_ms
    lines = ["# Samples", "", f"Decoders: {', '.join(results)}; max_new_tokens={max_new_tokens}, "
             f"temperature={temperature}, top_k={top_k}, top_p={top_p}, seed={seed}. "
             "[Bracketed] tokens came from the exit head (routed: exited early; speculative: accepted drafts).", ""]
    for i, p in enumerate(prompts):
        lines += [f"## Prompt {i + 1}", "", "```", tokenizer.decode(p), "```", ""]
        for name, r in results.items():
            lines += [f"**{name}**", "", "```", mark_exits(tokenizer, r.tokens[i], r.exited[i]), "```", ""]
    out_dir = Path(out_dir)
    write_text(out_dir / "samples.md", "\n".join(lines))
    write_json(out_dir / "metrics.json", metrics)
    return metrics
