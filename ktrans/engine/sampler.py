"""Next-token choice for every request that reached the end of its tokens in a step.

Per row: logit_bias and the request's token constraint (a grammar) first, then, in transformers'
order: penalties (repetition over prompt + output, presence and frequency over output) -> greedy
argmax if temperature is 0, else temperature -> top-k -> top-p -> min-p -> one draw from that
request's own generator. Everything runs batched on the logits' device; only one uniform number
per row comes from the request's CPU generator, so a seeded request gives the same tokens on a
GPU as on a CPU.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from ktrans.engine.request import Request, SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator:
    """The request's RNG: seeded when asked (reproducible), otherwise from OS entropy."""
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device="cpu").manual_seed(seed % (2**63))


class TokenConstraint(Protocol):
    """Which tokens a request may produce next (structured output), advanced token by token."""

    def allowed(self) -> torch.Tensor | None:
        """Bool mask [M] of the allowed token ids (ids >= M are not allowed; never all False),
        or None when this step is unconstrained."""

    def accept(self, token_id: int) -> None:
        """Record the chosen token."""

    @property
    def done(self) -> bool:
        """Nothing may follow: the request ends here (finish reason "stop")."""


def apply_bias_and_constraints(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Copy of logits [R, V] with each request's logit_bias added and the tokens its constraint
    forbids set to -inf (rows without either untouched)."""
    out = logits
    V = logits.shape[-1]
    for i, req in enumerate(requests):
        p = req.params
        mask = p.constraint.allowed() if p.constraint is not None else None
        if not p.logit_bias and mask is None:
            continue
        if out is logits:
            out = logits.clone()
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < V]
            out[i, ids] += torch.tensor([p.logit_bias[t] for t in ids], dtype=out.dtype, device=out.device)
        if mask is not None:
            keep = torch.zeros(V, dtype=torch.bool, device=out.device)
            n = min(V, mask.shape[0])
            keep[:n] = mask[:n].to(out.device)
            out[i].masked_fill_(~keep, float("-inf"))
    return out


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob in the row of logits [V] and the k most likely (id, logprob)."""
    lp = logits.float().log_softmax(-1)                                     # [V]
    top = lp.topk(min(k, lp.shape[-1])) if k > 0 else None
    alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(lp[token]), alts


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Penalised copy of logits [R, V] (rows without penalties untouched)."""
    out = logits
    for i, req in enumerate(requests):
        p = req.params
        if p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            continue
        if out is logits:
            out = logits.clone()
        row = out[i]                                                        # [V] (a view)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(req.prompt_token_ids + req.output_token_ids, device=row.device).unique()
            vals = row[seen]
            # NOTE: HF's rule: positive logits are divided, negative ones multiplied, so the
            # penalty always makes a seen token less likely.
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if req.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(req.output_token_ids, device=row.device)
            counts = torch.zeros_like(row).scatter_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return out


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to logits [R, V]; removed tokens get -inf.
    Rows with temperature 0 are returned unscaled (the caller takes their argmax)."""
    dev = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    x = logits / temps[:, None]                                             # [R, V]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(q < 1.0 for q in top_p):
        x = _top_k_top_p(x, top_k, top_p)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if bool((min_p > 0).any()):
        probs = x.softmax(-1)                                               # [R, V]
        cut = min_p[:, None] * probs.max(-1, keepdim=True).values
        x = x.masked_fill(probs < cut, float("-inf"))
    return x


# Candidates kept by top-k / top-p before falling back to sorting the whole vocabulary.
_CANDIDATES = 1024


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Top-k then top-p on logits [R, V]. NOTE: top-p keeps the most likely tokens up to top_p of
    the mass, which lie among the best _CANDIDATES whenever those hold that much; only when some
    row's candidates hold less (a flat distribution) is the whole vocabulary sorted."""
    R, V = x.shape
    dev = x.device
    K = min(V, max(k if k > 0 else _CANDIDATES for k in top_k))
    vals, order = x.topk(K, dim=-1)                                         # [R, K], descending
    k = torch.tensor([kk if 0 < kk < K else K for kk in top_k], device=dev)
    vals = vals.masked_fill(torch.arange(K, device=dev)[None, :] >= k[:, None], float("-inf"))
    # Rows with top-k normalise over their k tokens (as transformers does), others over all V.
    has_k = torch.tensor([kk > 0 for kk in top_k], device=dev)
    log_z = torch.where(has_k, vals.logsumexp(-1), x.logsumexp(-1))[:, None]  # [R, 1]
    probs = (vals - log_z).exp()                                            # [R, K]
    p = torch.tensor(top_p, device=dev, dtype=x.dtype)[:, None]
    if bool(((p < 1) & (probs.sum(-1, keepdim=True) < p + 1e-4)).any()):
        return _top_k_top_p_sorted(x, top_k, top_p)
    # NOTE: as transformers does: drop a token when it and everything less likely together hold at
    # most 1 - top_p of the mass (summed from the least likely up, so tiny tails stay exact); the
    # top token always stays; rows with top_p = 1 drop nothing.
    outside = (1 - probs.sum(-1, keepdim=True)).clamp(min=0)                # [R, 1] mass below the K
    tail_mass = outside + probs.flip(-1).cumsum(-1).flip(-1)                # [R, K]
    drop = (tail_mass <= 1 - p) & (p < 1)
    drop[:, 0] = False
    vals = vals.masked_fill(drop, float("-inf"))
    out = torch.full_like(x, float("-inf")).scatter_(-1, order, vals)
    untouched = torch.tensor([kk <= 0 and q >= 1 for kk, q in zip(top_k, top_p)], device=dev)
    return torch.where(untouched[:, None], x, out)


def _top_k_top_p_sorted(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Top-k then top-p over the fully sorted vocabulary (any distribution)."""
    R, V = x.shape
    dev = x.device
    sorted_x, order = x.sort(dim=-1, descending=True)                      # [R, V]
    k = torch.tensor([kk if kk > 0 else V for kk in top_k], device=dev)
    sorted_x = sorted_x.masked_fill(torch.arange(V, device=dev)[None, :] >= k[:, None], float("-inf"))
    asc = sorted_x.softmax(-1).flip(-1)                                     # [R, V] ascending
    tail_mass = asc.cumsum(-1).flip(-1)                                     # [R, V]
    p = torch.tensor(top_p, device=dev, dtype=x.dtype)[:, None]
    drop = (tail_mass <= 1 - p) & (p < 1)
    drop[:, 0] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def draw(probs: torch.Tensor, generators: list) -> list[int]:
    """One token per row of probs [S, V] by inverse-CDF sampling.
    NOTE: each row uses one uniform number from its request's own CPU generator, so a seed gives
    the same draws on any device, and the probabilities never leave the device."""
    u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], dtype=torch.float64)
    cdf = probs.double().cumsum(-1)                                         # [S, V]
    total = cdf[:, -1:]
    # Strictly below the total, so the pick is never past the last token with nonzero mass.
    target = torch.minimum(u.to(cdf.device)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0].tolist()


class Sampler:
    """Chooses one token per row of logits [R, V] for the matching requests."""

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        logits = apply_penalties(apply_bias_and_constraints(logits.float(), requests), requests)
        params = [r.params for r in requests]
        tokens = logits.argmax(-1).tolist()                                 # greedy rows keep these
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = filter_logits(logits[rows], [params[i] for i in sampled]).softmax(-1)
            for i, tok in zip(sampled, draw(probs, [requests[i].generator for i in sampled])):
                tokens[i] = tok
        for req, tok in zip(requests, tokens):
            if req.params.constraint is not None:
                req.params.constraint.accept(tok)
        return tokens

    @staticmethod
    def logprobs(logits: torch.Tensor, requests: list[Request], tokens: list[int]) -> list:
        """Per row, (token, logprob, alternatives) when its request asked for logprobs, else None.
        NOTE: from the raw logits [R, V], the model's own distribution (as vLLM reports by default)."""
        out = []
        for i, (req, tok) in enumerate(zip(requests, tokens)):
            k = req.params.logprobs
            out.append(None if k is None else (tok, *token_logprobs(logits[i], tok, k)))
        return out
