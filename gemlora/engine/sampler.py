"""Sampler: logits -> one token per row, honouring each row's own SamplingParams.

Order as in vLLM: penalties (repetition over prompt + output; frequency and presence over the
output), then temperature, top-k, top-p, and a draw by inverse CDF with a uniform number from the
request's own generator, so a seeded request gets the same tokens whatever shares its batch.
Temperature 0 is greedy (argmax). Rows with an output grammar have every token it forbids set to
-inf first (`masks`, from TokenMasks), so penalties, temperature, top-k/top-p and the draw see only
allowed tokens, and rows without one are untouched. Works on flat logits; knows requests only
through `SamplingRow`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemlora.kernels.token_mask import apply_token_bitmask
from gemlora.sampling import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int]


def sample(logits: torch.Tensor, rows: list[SamplingRow],
           masks: tuple[list[int], torch.Tensor] | None = None) -> list[int]:
    """logits: float32 [N, vocab], one row per entry of `rows`; masks: (row indices, int32 bitmask)."""
    if not rows:
        return []
    if masks is not None:
        idx, bitmask = masks
        with torch.inference_mode():      # in place: the logits are this step's own (an inference tensor)
            masked = logits[idx].contiguous()
            apply_token_bitmask(masked, bitmask)
            logits[idx] = masked
    if any(r.params.has_penalties for r in rows):
        logits = _apply_penalties(logits.clone(), rows)
    greedy = [r.params.greedy for r in rows]
    tokens = logits.max(dim=-1).indices   # first maximum, like argmax, but several times faster on CPU
    # Rows that keep every token draw from the vocabulary in its own order, the others from their sorted
    # candidates: each row's draw depends on its own options alone, whatever shares the batch.
    for sorted_draw in (False, True):
        idx = [i for i, r in enumerate(rows) if not greedy[i] and _needs_sort(r.params) == sorted_draw]
        if idx:
            tokens[idx] = _sample_rows(logits[idx], [rows[i] for i in idx])
    return tokens.tolist()


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


def _sample_rows(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
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
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=probs.shape[1] - 1)
    return candidates.gather(1, pick)[:, 0] if candidates is not None else pick[:, 0]
