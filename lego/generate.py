"""Generation with early exit: dense, routed (the model's exit policy) and self-speculative decoding.

    result = generate(model, [[5, 3, 9], [7]], max_new_tokens=16, decoder="routed")
    result.tokens   # new tokens per prompt; result.exited: which came from the exit head

- dense: every token through every layer, deep head at the last layer (the reference).
- routed: at each position the exit confidence (`model.confidence`, as `Trainer.evaluate`
  computes it) >= `model.routing_threshold` predicts the next token from the exit head;
  other positions continue to the last layer. What an exited position leaves in the upper
  layers' caches follows `model.upper_context` (full: everything; propagate: keys/values of its
  exit-layer state; skip: nothing), so the logits decoding produces equal those of the
  teacher-forced routed forward of the same sequence (`teacher_forced_logits`).
- speculative: layers 1..exit_layer with the exit head draft k tokens; the dense model verifies
  them in one pass over the drafted positions from the drafted exit-layer states; the longest
  agreeing prefix plus one corrected token is kept and the rest is rolled back from every cache.
  Greedy output equals dense greedy; sampling keeps the dense model's distribution.

Rows of a batch keep their own positions (slot = position), so batched prompts of different
lengths give the tokens each prompt gives alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lego.ashem import confidence_from_logits
from lego.kvcache import KVCache, Positions, embed_at, run_cached
from lego.model import DeepSupervisionTransformer

DECODERS = ("dense", "routed", "speculative")


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


def check_generate_args(model, prompts, max_new_tokens, decoder, temperature, top_k, top_p, k) -> None:
    """One-line ValueErrors naming the config key, before anything runs."""
    if decoder not in DECODERS:
        raise ValueError(f"generate.decoders: {decoder!r} is not a decoder; choose from {', '.join(DECODERS)}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate.prompt: every prompt needs at least one token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate.max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.max_seq_len:
        raise ValueError(f"generate.max_new_tokens={max_new_tokens}: prompt ({longest} tokens) + new tokens "
                         f"exceed model.max_seq_len={model.max_seq_len}")
    if any(t < 0 or t >= model.vocab_size for p in prompts for t in p):
        raise ValueError(f"generate.prompt: token ids must be in [0, {model.vocab_size})")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"generate.k={k!r} must be an integer >= 1")
    if temperature < 0:
        raise ValueError(f"generate.temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate.top_k={top_k!r} must be None or an integer >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate.top_p={top_p!r} must be None or in (0, 1]")
    if decoder in ("routed", "speculative") and model.exit_layer is None:
        raise ValueError(f"generate.decoders: {decoder} needs a model with exit_layer (a grown model)")
    if decoder == "routed" and model.routing_threshold is None:
        raise ValueError("generate.decoders: routed needs model.routing_threshold")


# -- sampling ----------------------------------------------------------------------------------------
def probabilities(logits: torch.Tensor, temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """(..., V) logits -> the sampling distribution: temperature, then top-k, then nucleus top-p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def _sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(R, V) -> (R,) one draw per row."""
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


class _Sampler:
    def __init__(self, temperature, top_k, top_p, gen):
        self.greedy = temperature == 0
        self.temperature, self.top_k, self.top_p, self.gen = temperature, top_k, top_p, gen

    def probs(self, logits):
        return probabilities(logits, self.temperature, self.top_k, self.top_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if self.greedy else _sample(self.probs(logits), self.gen)


# -- the forward pieces ---------------------------------------------------------------------------
class _State:
    """A batch being decoded: cache, per-row lengths (tokens in the cache) and routing policy."""

    def __init__(self, model: DeepSupervisionTransformer, batch: int, slots: int, routed: bool):
        self.model, self.routed = model, routed
        self.cache = KVCache(model, batch, slots)
        self.E = model.exit_layer or model.num_layers
        self.L = model.num_layers
        self.policy = model.upper_context if routed else "full"
        self.device = self.cache.k.device

    def dense_mask(self, group: int) -> bool:
        return not (group == 1 and self.policy == "skip")

    def lower(self, idx: torch.Tensor, at: Positions) -> torch.Tensor:
        """Tokens (R, T) at `at` through layers 1..E -> exit-layer states (R, T, C)."""
        self.cache.mark(0, at)
        mask = self.cache.mask(0, at, True)
        return run_cached(self.model, self.cache, embed_at(self.model, idx, at), 0, self.E, at, mask)

    def upper(self, h: torch.Tensor, at: Positions, flags: Optional[torch.Tensor] = None,
              kv_only: bool = False, frozen: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exit-layer states (R, T, C) at `at` through layers E+1..L; `flags` marks which
        positions leave attendable keys (skip: the hard ones), `frozen` which keep their state."""
        self.cache.mark(1, at, flags)
        mask = None if kv_only else self.cache.mask(1, at, self.dense_mask(1))
        return run_cached(self.model, self.cache, h, self.E, self.L, at, mask, kv_only=kv_only, frozen=frozen)

    def exit_logits(self, h):
        return self.model.logits_at(h, self.E).float()

    def deep_logits(self, h):
        return self.model.logits_at(h, self.L).float()

    def prefill(self, idx: torch.Tensor, lengths: List[int]):
        """Right-padded prompts (B, T) -> (logits at every position (B, T, V), exited (B, T)).

        Under routing, positions follow the routed rule of the teacher-forced forward."""
        B, T = idx.shape
        at = Positions.aligned(0, T)
        real = torch.arange(T, device=self.device) < torch.tensor(lengths, device=self.device).unsqueeze(1)
        with self.model.autocast():
            h = self.lower(idx, at)
            self.cache.valid[0, :, :T] &= real
            if not self.routed:
                self.cache.mark(1, at, real)
                mask = self.cache.mask(1, at, True)
                logits = self.deep_logits(run_cached(self.model, self.cache, h, self.E, self.L, at, mask))
                self.cache.clear_invalid(T)
                return logits, torch.zeros(B, T, dtype=torch.bool, device=self.device)
            ex = self.exit_logits(h)
            hard = confidence_from_logits(ex, self.model.confidence) < self.model.routing_threshold
            flags = real & hard if self.policy == "skip" else real
            h_up = self.upper(h, at, flags, frozen=None if self.policy == "full" else ~hard)
            deep = self.deep_logits(h_up)
        self.cache.clear_invalid(T)
        return torch.where(hard.unsqueeze(-1), deep, ex), ~hard

    def step(self, tok: torch.Tensor, at: Positions):
        """One new token per row (R,) at `at` -> (next-token logits (R, V), exited (R,) bool)."""
        with self.model.autocast():
            h = self.lower(tok.unsqueeze(1), at)  # (R, 1, C)
            if not self.routed:
                return self.deep_logits(self.upper(h, at))[:, 0], None
            ex = self.exit_logits(h)[:, 0]  # (R, V)
            hard = confidence_from_logits(ex, self.model.confidence) < self.model.routing_threshold
            hard_rows = hard.nonzero().squeeze(1).tolist()  # the one host sync of a routed step
            R = tok.shape[0]
            if self.policy == "full":  # every row runs the upper layers (exact cache)
                h_up = self.upper(h, at)
                if len(hard_rows) == R:
                    return self.deep_logits(h_up)[:, 0], ~hard
                if hard_rows:
                    ex[hard_rows] = self.deep_logits(h_up[hard_rows])[:, 0]
                return ex, ~hard
            easy_rows = [r for r in range(R) if not hard[r]] if len(hard_rows) < R else []
            if easy_rows and self.policy == "propagate":
                sub = _subset(at, easy_rows, R, self.device)
                self.upper(h[easy_rows] if len(easy_rows) < R else h, sub, kv_only=True)
            if not hard_rows:
                return ex, ~hard
            if len(hard_rows) == R:
                return self.deep_logits(self.upper(h, at))[:, 0], ~hard
            sub = _subset(at, hard_rows, R, self.device)
            ex[hard_rows] = self.deep_logits(self.upper(h[hard_rows], sub))[:, 0]
            return ex, ~hard


def _subset(at: Positions, rows: List[int], n_rows: int, device) -> Positions:
    """The positions of `rows` (indices into at's rows) of a chunk."""
    if len(rows) == n_rows:
        return at
    idx = torch.tensor(rows, device=device)
    cache_rows = idx if at.rows is None else at.rows.index_select(0, idx)
    pos = None if at.pos is None else at.pos.index_select(0, idx)
    return Positions(cache_rows, at.start, pos, at.length, at.span)


def _pad(prompts: List[List[int]], device) -> torch.Tensor:
    T = max(len(p) for p in prompts)
    return torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- decoders -----------------------------------------------------------------------------------------
def generate(model: DeepSupervisionTransformer, prompts: List[List[int]], *, max_new_tokens: int,
             decoder: str = "dense", temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0, stop_token: Optional[int] = None, k: int = 4,
             return_logits: bool = False) -> Generation:
    """Continue every prompt by `max_new_tokens` tokens (fewer after `stop_token`) with `decoder`.

    temperature 0 is greedy; otherwise draws come from one `torch.Generator` seeded with `seed`,
    so a call is reproducible. Routing (threshold, exit layer, policy, confidence measure) is the
    model's own. `k` is the speculative draft length. `return_logits` (dense, routed) keeps the
    (n_new, V) logits each new token was chosen from.
    """
    check_generate_args(model, prompts, max_new_tokens, decoder, temperature, top_k, top_p, k)
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    sampler = _Sampler(temperature, top_k, top_p, gen)
    with torch.inference_mode():
        if decoder == "speculative":
            return _speculative(model, prompts, max_new_tokens, sampler, stop_token, k, device)
        return _autoregressive(model, prompts, max_new_tokens, sampler, stop_token, decoder == "routed",
                               return_logits, device)


def _prefill(state: _State, prompts, sampler, device):
    lengths = [len(p) for p in prompts]
    logits, exited = state.prefill(_pad(prompts, device), lengths)
    rows = torch.arange(len(prompts), device=device)
    last = torch.tensor(lengths, device=device) - 1
    return logits[rows, last], exited[rows, last]


def _autoregressive(model, prompts, N, sampler, stop_token, routed, return_logits, device) -> Generation:
    B, lengths = len(prompts), [len(p) for p in prompts]
    state = _State(model, B, max(lengths) + N - 1, routed)  # the last new token is never fed
    t0 = time.perf_counter()
    logits, exited = _prefill(state, prompts, sampler, device)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    flags = torch.zeros(B, N, dtype=torch.bool, device=device)
    kept = [logits] if return_logits else None
    tok = sampler(logits)
    out[:, 0], flags[:, 0] = tok, exited
    _sync(device)
    t1 = time.perf_counter()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = N
    for i in range(1, N):
        if stop_token is not None:
            done |= tok == stop_token
            if bool(done.all()):
                n = i
                break
        logits, exited = state.step(tok, Positions.ragged([p + i - 1 for p in lengths], 1, device))
        tok = sampler(logits)
        out[:, i] = tok
        if exited is not None:
            flags[:, i] = exited
        if return_logits:
            kept.append(logits)
    _sync(device)
    t2 = time.perf_counter()
    tokens, exits = out[:, :n].tolist(), flags[:, :n].tolist()
    if stop_token is not None:
        for b, row in enumerate(tokens):
            if stop_token in row:
                cut = row.index(stop_token) + 1
                tokens[b], exits[b] = row[:cut], exits[b][:cut]
    result = Generation(tokens, exits, "routed" if routed else "dense", prefill_s=t1 - t0, decode_s=t2 - t1)
    if return_logits:
        stacked = torch.stack(kept, 1)  # (B, n, V)
        result.logits = [stacked[b, :len(tokens[b])].clone() for b in range(B)]
    return result


def _speculative(model, prompts, N, sampler, stop_token, k, device) -> Generation:
    B, lengths = len(prompts), [len(p) for p in prompts]
    state = _State(model, B, max(lengths) + N - 1, routed=False)
    t0 = time.perf_counter()
    logits, _ = _prefill(state, prompts, sampler, device)
    tok = sampler(logits)  # (B,) the pending token of every row: sampled, not yet in the cache
    tokens = [[t] for t in tok.tolist()]
    exits = [[False] for _ in range(B)]
    cached = list(lengths)  # positions in the cache; the pending token goes at position cached[b]
    t1 = time.perf_counter()
    drafted = accepted = 0
    while True:
        active = [b for b in range(B) if len(tokens[b]) < N and not (stop_token is not None
                                                                   and tokens[b][-1] == stop_token)]
        if not active:
            break
        R = len(active)
        rows = None if R == B else torch.tensor(active, device=device)
        kk = min(k, min(N - len(tokens[b]) - 1 for b in active))  # never past max_new_tokens
        t = tok if rows is None else tok.index_select(0, rows)
        first = [cached[b] for b in active]
        states, drafts, qs = [], [], []
        with model.autocast():
            for i in range(kk + 1):  # the pending token and kk drafts through Block 1
                h = state.lower(t.unsqueeze(1), Positions.ragged([f + i for f in first], 1, device, rows))
                states.append(h)
                if i < kk:
                    ex = state.exit_logits(h)[:, 0]
                    if sampler.greedy:
                        t = ex.argmax(-1)
                    else:
                        qs.append(sampler.probs(ex))
                        t = _sample(qs[-1], sampler.gen)
                    drafts.append(t)
            # verify: the upper Block over every drafted position at once, from the stored exit states
            at = Positions.ragged(first, kk + 1, device, rows)
            deep = state.deep_logits(state.upper(torch.cat(states, 1), at))  # (R, kk + 1, V)
        D = torch.stack(drafts, 1) if kk else torch.empty(R, 0, dtype=torch.long, device=device)
        a, nxt = _accept(deep, D, qs, sampler)
        host = torch.cat([a, nxt, D.flatten()]).tolist()  # the one host sync of a round
        a_l, nxt_l, D_l = host[:R], host[R:2 * R], host[2 * R:]
        drafted += R * kk
        accepted += sum(a_l)
        for j, b in enumerate(active):
            n_acc = a_l[j]
            new = D_l[j * kk:j * kk + n_acc] + [nxt_l[j]]
            tokens[b] += new
            exits[b] += [True] * n_acc + [False]
            cached[b] += n_acc + 1
        # roll rejected drafts back: slots >= the new length, written this round, become zeros again
        state.cache.rollback(torch.tensor(cached, device=device), min(cached[b] for b in active),
                             max(first) + kk + 1)
        if rows is None:
            tok = nxt
        else:
            tok = tok.index_copy(0, rows, nxt)
    _sync(device)
    t2 = time.perf_counter()
    if stop_token is not None:
        for b, row in enumerate(tokens):
            if stop_token in row:
                cut = row.index(stop_token) + 1
                tokens[b], exits[b] = row[:cut], exits[b][:cut]
    return Generation(tokens, exits, "speculative", drafted=drafted, accepted=accepted, prefill_s=t1 - t0,
                      decode_s=t2 - t1, extra={"k": k})


def _accept(deep: torch.Tensor, D: torch.Tensor, qs: List[torch.Tensor], sampler: _Sampler):
    """Accepted draft count a (R,) and the token after them (R,).

    Greedy: the longest prefix of drafts equal to the deep argmax, then the deep argmax.
    Sampling (speculative sampling): draft d with draft probability q(d) is kept with
    probability min(1, p(d) / q(d)); at the first rejection the token is drawn from
    norm(max(0, p - q)); after k acceptances from p at the next position. The tokens are then
    distributed as the deep model's p.
    """
    R, K1, V = deep.shape
    kk = K1 - 1
    ar = torch.arange(R, device=deep.device)
    if sampler.greedy:
        pred = deep.argmax(-1)  # (R, kk + 1)
        a = (pred[:, :kk] == D).cumprod(1).sum(1)
        return a, pred[ar, a]
    p = sampler.probs(deep)  # (R, kk + 1, V)
    Q = torch.cat([torch.stack(qs, 1), p.new_zeros(R, 1, V)], 1) if kk else p.new_zeros(R, 1, V)
    if kk:
        pd = p[:, :kk].gather(-1, D.unsqueeze(-1)).squeeze(-1)
        qd = Q[:, :kk].gather(-1, D.unsqueeze(-1)).squeeze(-1)
        u = torch.rand(R, kk, generator=sampler.gen, device=deep.device)
        a = (u * qd < pd).long().cumprod(1).sum(1)
    else:
        a = torch.zeros(R, dtype=torch.long, device=deep.device)
    p_a, q_a = p[ar, a], Q[ar, a]  # q is 0 after the last draft: the bonus token comes from p
    resid = (p_a - q_a).clamp_min(0)
    mass = resid.sum(-1, keepdim=True)
    resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_a)
    return a, _sample(resid, sampler.gen)


def teacher_forced_logits(model: DeepSupervisionTransformer, idx: torch.Tensor, routed: bool = True):
    """The logits the routed forward of `Trainer.evaluate` predicts each position from.

    idx (B, T) -> (logits (B, T, V) float32: exit logits at exited positions, deep logits at
    the others; exited (B, T) bool). `routed=False`: the dense model's deep logits.
    """
    E, L = model.exit_layer or model.num_layers, model.num_layers
    with torch.inference_mode(), model.autocast():
        h = model.run_layers(model.embed(idx), 0, E)
        if not routed:
            return model.logits_at(model.run_layers(h, E, L), L).float(), torch.zeros_like(idx, dtype=torch.bool)
        ex = model.logits_at(h, E).float()
        easy = confidence_from_logits(ex, model.confidence) >= model.routing_threshold
        deep = model.logits_at(model.run_layers(h, E, L, hard=~easy, policy=model.upper_context), L).float()
    return torch.where(easy.unsqueeze(-1), ex, deep), easy
