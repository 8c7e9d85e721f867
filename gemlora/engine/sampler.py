"""Sampler: logits -> one token per row, honouring each row's own SamplingParams.

Order as in vLLM: penalties (repetition over prompt + output; frequency and presence over the
output), then temperature, top-k, top-p, and a draw by inverse CDF with a uniform number from the
request's own generator, so a seeded request gets the same tokens whatever shares its batch.
Temperature 0 is greedy (argmax). Rows with an output grammar have every token it forbids set to
-inf first (`masks`, from TokenMasks), so penalties, temperature, top-k/top-p and the draw see only
allowed tokens, and rows without one are untouched.

Rows whose params ask for `logprobs` also get the chosen token's log-probability and the most likely
alternatives, read off the distribution the token was drawn from: after masks, penalties,
temperature, top-k and top-p (renormalised over what they keep), or for greedy rows the
log-softmax of the processed logits, as vLLM reports them. Works on flat logits; knows requests
only through `SamplingRow`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemlora.kernels.token_mask import apply_token_bitmask
from gemlora.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The chosen token's log-probability and the `top` most likely tokens (id, logprob), most likely first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int]


def sample(logits: torch.Tensor, rows: list[SamplingRow], masks: tuple[list[int], torch.Tensor] | None = None
           ) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: float32 [N, vocab], one row per entry of `rows`; masks: (row indices, int32 bitmask).
    Returns each row's token, and its TokenLogprobs where its params ask for them (else None)."""
    if not rows:
        return [], []
    if masks is not None:
        idx, bitmask = masks
        with torch.inference_mode():      # in place: the logits are this step's own (an inference tensor)
            apply_token_bitmask(logits, bitmask, idx)
    if any(r.params.has_penalties for r in rows):
        logits = _apply_penalties(logits.clone(), rows)
    greedy = [r.params.greedy for r in rows]
    tokens = logits.max(dim=-1).indices   # first maximum, like argmax, but several times faster on CPU
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if greedy[i] and r.params.logprobs is not None]
    if wanted:
        _report(logprobs, wanted, rows, torch.log_softmax(logits[wanted], dim=-1), None, tokens[wanted][:, None])
    # Rows that keep every token draw from the vocabulary in its own order, the others from their sorted
    # candidates: each row's draw depends on its own options alone, whatever shares the batch.
    for sorted_draw in (False, True):
        idx = [i for i, r in enumerate(rows) if not greedy[i] and _needs_sort(r.params) == sorted_draw]
        if idx:
            group = [rows[i] for i in idx]
            drawn, pick, logp, candidates = _sample_rows(logits[idx], group)
            tokens[idx] = drawn
            wanted = [j for j, r in enumerate(group) if r.params.logprobs is not None]
            if wanted:
                _report(logprobs, [idx[j] for j in wanted], rows, logp[wanted],
                        None if candidates is None else candidates[wanted], pick[wanted])
    return tokens.tolist(), logprobs


def _report(out: list[TokenLogprobs | None], where: list[int], rows: list[SamplingRow], logp: torch.Tensor,
            candidates: torch.Tensor | None, pick: torch.Tensor) -> None:
    """out[where[j]] from row j of `logp` (log-probabilities over the vocabulary, or over `candidates`),
    whose chosen entry is pick[j, 0]."""
    n = min(max(rows[i].params.logprobs for i in where), logp.shape[1])
    chosen = logp.gather(1, pick)[:, 0].tolist()
    top_lp, top_at = logp.topk(n, dim=-1) if n else (logp[:, :0], pick[:, :0])
    top_ids = top_at if candidates is None else candidates.gather(1, top_at)
    token = pick[:, 0] if candidates is None else candidates.gather(1, pick)[:, 0]
    for i, t, lp, ids, lps in zip(where, token.tolist(), chosen, top_ids.tolist(), top_lp.tolist()):
        k = rows[i].params.logprobs
        out[i] = TokenLogprobs(t, lp, tuple(zip(ids[:k], lps[:k])))


def _needs_sort(p: SamplingParams) -> bool:
    return p.top_k is not None or p.top_p < 1


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    V = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if not p.has_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long,
                                device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if r.output_ids and (p.frequency_penalty or p.presence_penalty):
            out = torch.tensor(r.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros(V, device=logits.device).index_add_(0, out, torch.ones_like(out, dtype=torch.float))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def _sample_rows(logits: torch.Tensor, rows: list[SamplingRow]):
    """-> (tokens [R], pick [R, 1], log-probabilities [R, W] of the distribution drawn from, candidates
    [R, W] that they index, or None when they index the vocabulary)."""
    temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    logits = logits / temps[:, None]
    top_ks = [r.params.top_k for r in rows]
    top_ps = [r.params.top_p for r in rows]
    need_sort = any(k is not None for k in top_ks) or any(p < 1 for p in top_ps)
    if need_sort:
        # Only as many candidates as any row keeps: top_k is at most 50, so usually a tiny sort.
        width = logits.shape[1] if any(k is None and p < 1 for k, p in zip(top_ks, top_ps)) \
            else max(k or logits.shape[1] for k in top_ks)
        values, candidates = logits.topk(width, dim=-1)
        rank = torch.arange(width, device=logits.device)[None, :]
        ks = torch.tensor([k or width for k in top_ks], device=logits.device)[:, None]
        values = values.masked_fill(rank >= ks, float("-inf"))
        probs = torch.softmax(values, dim=-1)
        ps = torch.tensor(top_ps, device=logits.device)[:, None]
        before = torch.cumsum(probs, dim=-1) - probs            # mass strictly above each candidate
        probs = probs.masked_fill((before >= ps) & (rank > 0), 0.0)  # the top candidate always stays
    else:
        candidates = None
        probs = torch.softmax(logits, dim=-1)
    u = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(logits.device)
    cdf = torch.cumsum(probs, dim=-1)
    # right: the first index whose cdf passes u, so a zero-probability token (a flat step of the cdf) is never
    # drawn, also when torch.rand gives exactly 0
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[1] - 1)
    tokens = candidates.gather(1, pick)[:, 0] if candidates is not None else pick[:, 0]
    if not any(r.params.logprobs is not None for r in rows):
        return tokens, pick, None, candidates
    # the distribution the draw used: probs renormalised by the mass top-p kept (the cdf's end)
    logp = torch.log(probs / cdf[:, -1:]) if need_sort else torch.log_softmax(logits, dim=-1)
    return tokens, pick, logp, candidates
