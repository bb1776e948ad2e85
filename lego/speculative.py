"""Self-speculative decoding: Block 1 and the exit head draft, the upper Block verifies.

One round (`speculative_round`) for the cache rows still generating:
  1. the pending token and each draft run through layers 1..exit_layer (`CachedModel.lower`); the exit
     head proposes the next draft, up to k of them. Adaptive drafting (a `Routing`) stops early, as
     soon as some row's exit confidence falls below the calibrated routing threshold: a token the
     router would send up is left to the deep model instead of being drafted and likely rejected;
  2. the upper Block verifies every drafted position in one pass from the stored exit-layer states;
  3. each row keeps its longest agreeing prefix plus one token of the deep model (`_accept`), and the
     rest is rolled back from every cache. With `align` every row keeps the smallest count, so rows
     that share a position keep sharing it: no round takes the per-row-position path of the cache.
Greedy output equals dense greedy; sampling keeps the dense model's distribution.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from lego.config import Routing
from lego.confidence import confidence_from_logits
from lego.kvcache import CachedModel, Positions
from lego.sampling import Sampler, sample


def draft_confident(logits: torch.Tensor, measure: str, threshold: float, probe=None,
                    hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R, V) exit logits -> (R,) bool: confidence >= threshold. max_prob is tested in log space,
    max_logit - logsumexp >= log(threshold), without a softmax over the vocabulary. With a learned router
    (`probe`), its score of the exit states `hidden` (R, C)."""
    if probe is not None:
        return probe(hidden) >= threshold
    if measure != "max_prob":
        return confidence_from_logits(logits, measure) >= threshold
    if threshold <= 0:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return logits.amax(-1) - logits.logsumexp(-1) >= math.log(threshold)


def speculative_round(state: CachedModel, tok: torch.Tensor, cached: List[int], active: List[int], kk: int,
                      sampler: Sampler, routing: Optional[Routing] = None, align: bool = False):
    """One draft-verify-accept round for the cache rows `active`; returns (pending tokens (B,), the new
    tokens of each active row: its accepted drafts then one token from the deep model, drafts proposed,
    exit-head evaluations: the drafts, plus one when adaptive drafting stopped before kk).

    tok (B,): each row's pending token (not in the cache yet), fed at position cached[b]. Up to kk
    drafts (fewer with adaptive drafting under `routing`: its first exit's threshold, measure or learned router;
    the same number for every row); `cached` grows by each row's kept
    count + 1; rejected positions are rolled back from every layer's cache. `align`: every row keeps
    the smallest accepted count (for greedy decoding the same tokens, fewer per round).
    """
    device = state.device
    B, R = tok.shape[0], len(active)
    rows = None if R == B else torch.tensor(active, device=device)
    t = tok if rows is None else tok.index_select(0, rows)
    first = [cached[b] for b in active]
    states, drafts, qs = [], [], []
    stopped = 0  # 1 when adaptive drafting stopped before kk drafts (its exit head ran, no draft came of it)
    with state.autocast():
        for i in range(kk + 1):  # the pending token and the drafts through Block 1
            h = state.lower(t.unsqueeze(1), Positions.ragged([f + i for f in first], 1, device, rows))
            states.append(h)
            if i == kk:
                break
            ex = state.exit_logits(h)[:, 0]  # (R, V)
            if routing is not None and not bool(draft_confident(ex, routing.measure, routing.threshold,
                                                               routing.probe, h[:, 0]).all()):
                stopped = 1  # a row's exit is unsure: the deep model predicts this position (one host sync a draft)
                break
            if sampler.greedy:
                t = ex.argmax(-1)
            else:
                qs.append(sampler.probs(ex))
                t = sample(qs[-1], sampler.gen)
            drafts.append(t)
        n = len(drafts)
        # verify: the upper Block over every drafted position at once, from the stored exit states
        at = Positions.ragged(first, n + 1, device, rows)
        deep = state.deep_logits(state.upper(torch.cat(states, 1), at))  # (R, n + 1, V)
    D = torch.stack(drafts, 1) if n else torch.empty(R, 0, dtype=torch.long, device=device)
    a, nxt = _accept(deep, D, qs, sampler)
    if align and n:
        a, nxt = _keep_fewest(a, nxt, D)
    host = torch.cat([a, nxt, D.flatten()]).tolist()  # the one host sync of a round's acceptance
    a_l, nxt_l, D_l = host[:R], host[R:2 * R], host[2 * R:]
    new = [D_l[j * n:j * n + a_l[j]] + [nxt_l[j]] for j in range(R)]
    for j, b in enumerate(active):
        cached[b] += a_l[j] + 1
    # rejected drafts: slots >= the new length that this round wrote become zeros, not attendable
    state.cache.rollback(torch.tensor(cached, device=device), min(cached[b] for b in active), max(first) + n + 1)
    return (nxt if rows is None else tok.index_copy(0, rows, nxt)), new, n, n + stopped


def _keep_fewest(a: torch.Tensor, nxt: torch.Tensor, D: torch.Tensor):
    """Every row keeps m = min(a) drafts; a row that accepted more takes its draft m + 1 as the token
    after them (an accepted draft is the deep model's token there: its argmax, or a valid draw from p)."""
    m = a.min()
    d_m = D.gather(1, m.clamp(max=D.shape[1] - 1).expand(D.shape[0], 1)).squeeze(1)
    return m.expand_as(a), torch.where(a > m, d_m, nxt)


def _accept(deep: torch.Tensor, D: torch.Tensor, qs: List[torch.Tensor], sampler: Sampler):
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
    return a, sample(resid, sampler.gen)



# -- drafting's own threshold: calibrated on agreement with the deep model ---------------------------------------
def agreement_threshold(conf: torch.Tensor, agree: torch.Tensor, target: float) -> dict:
    """The lowest exit confidence t such that, over the tokens with confidence >= t, the exit's top token equals
    the deep model's on at least a share `target` of them (conf, agree: (N,) flat). Returns {"threshold",
    "agreement": the share agreeing at or above it, "draft_share": the share of tokens at or above it,
    "tokens": N}; where not even the most confident token agrees often enough, a threshold above every
    confidence (nothing drafts, draft_share 0)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target} must be in (0, 1]")
    conf, agree = conf.reshape(-1).double(), agree.reshape(-1).double()
    if conf.numel() == 0:
        raise ValueError("no tokens to calibrate the draft threshold on")
    order = conf.argsort(descending=True, stable=True)
    c, a = conf[order], agree[order]
    last = torch.ones_like(c, dtype=torch.bool)  # the last of each run of equal confidences: t includes ties
    last[:-1] = c[1:] != c[:-1]
    precision = a.cumsum(0) / torch.arange(1, c.numel() + 1, dtype=torch.float64)
    ok = (precision >= target) & last
    if not bool(ok.any()):
        return {"threshold": float(c[0]) + 1.0, "agreement": float("nan"), "draft_share": 0.0, "tokens": c.numel()}
    n = int(ok.nonzero().max()) + 1  # the most tokens whose agreement still meets the target
    return {"threshold": float(c[n - 1]), "agreement": float(precision[n - 1]), "draft_share": n / c.numel(),
            "tokens": c.numel()}


@torch.no_grad()
def draft_agreement(model, loader, device, measure: str, max_batches: Optional[int] = None):
    """Per token of `loader`'s windows (teacher-forced, every position): the first exit's confidence (`measure`,
    in the model's precision, as drafting computes it) and whether its top token equals the deep model's. Flat (N,)
    CPU tensors (conf float32, agree bool)."""
    model.eval()
    E, L = model.exit_layer, model.num_layers
    confs, agrees = [], []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0].to(device)
        with model.autocast():
            h = model.run_layers(model.embed(x), 0, E)
            ex = model.logits_at(h, E).float()
            deep = model.logits_at(model.run_layers(h, E, L), L).float()
        confs.append(confidence_from_logits(ex, measure).flatten().cpu())
        agrees.append((ex.argmax(-1) == deep.argmax(-1)).flatten().cpu())
    return torch.cat(confs), torch.cat(agrees)
