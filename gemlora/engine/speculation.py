"""Speculator: prompt-lookup speculative decoding, lossless: which requests verify draft tokens in a
step, how many, and which of them they keep.

Verifying: a request with k draft tokens runs its last token and the k drafts as k + 1 decode rows
of its own sequence (row j at position p + j attends to positions <= p + j, the K/V of rows < j
written earlier in the same layer), so a verify step is an ordinary decode step: the same kernels,
the C++ decode stack, and each row's logits bit for bit those a plain decode step computes at that
position. Every row is sampled as that position would be (penalties see the drafts before it), and
the request keeps its drafts up to the first that differs from the token sampled there, plus that
token. For greedy rows these are the tokens plain decoding gives; for sampled rows the draws of the
same distributions (a draft is a point mass, for which rejection sampling reduces to comparing it
with a draw from the target); a seeded request's generator is rewound to the draws it used, so it
gives the same tokens as without speculation too. Grammar-constrained requests do not speculate.

How many: a draft row costs step time whether it is kept or not. Each request keeps a running
acceptance rate `alpha` over its verified drafts (drifting back toward a prior while it does not
draft, so a request that stopped drafting tries again), and the step's time is fitted online as
a + b * rows over decode-only steps (r = b / a; RATIO until the fit has seen enough spread). Draft
tokens are handed out one at a time, each to the request whose next one is likeliest to be kept
(alpha^j for its j-th), while its expected gain beats the step's expected tokens per unit of time:
alpha^j > tokens * r / (1 + r * rows). At batch 1 a request that keeps its drafts gets long ones,
one that does not gets none; as the batch grows the bar rises until no draft pays, so speculation
switches itself off for large batches. Every request in a step waits for that step's drafts: so
that one request's drafts cannot slow the others' tokens much, a step that decodes more than one
request takes drafts only while its predicted time stays within STRETCH of its time without them.

Knows requests, scheduled batches, token ids and step timings; nothing of tensors but the
generators it rewinds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gemlora.engine.prompt_lookup import PromptLookup
from gemlora.engine.sampler import SamplingRow, TokenLogprobs
from gemlora.request import Request

if TYPE_CHECKING:
    from gemlora.engine.scheduler import ScheduledBatch

RATIO = 0.3        # b / a until measured: a 2-core EPYC, Gemma 3 270M, 1 to 16 decode rows
PRIOR = 0.6        # a request's acceptance rate before it has drafted
STEP = 0.25        # weight of each verified draft token in the running acceptance rate
DRIFT = 0.02       # per step without a draft, back toward PRIOR
DECAY = 0.98       # weight of older step timings in the fit
STRETCH = 1.5      # with other requests in the step: its time with drafts over its time without, at most


@dataclass(slots=True)
class DraftState:
    """One request's speculation: its n-gram index and acceptance rate."""
    lookup: PromptLookup
    alpha: float = PRIOR


class StepCost:
    """Least squares of step seconds on rows, over decayed decode-only steps: the ratio b / a."""

    def __init__(self):
        self._sums = [0.0] * 5       # weights, x, y, xx, xy

    def observe(self, rows: int, seconds: float) -> None:
        s = self._sums
        for i, v in enumerate((1.0, rows, seconds, rows * rows, rows * seconds)):
            s[i] = s[i] * DECAY + v

    def ratio(self) -> float:
        w, x, y, xx, xy = self._sums
        if w < 8:
            return RATIO
        mx, my = x / w, y / w
        var = xx / w - mx * mx
        if var < 0.25:               # every step had about as many rows: no slope to read
            return RATIO
        b = (xy / w - mx * my) / var
        a = my - b * mx
        return min(max(b / a, 0.02), 2.0) if a > 0 and b > 0 else RATIO


class Speculator:
    def __init__(self, max_draft: int = 8, min_n: int = 2, max_n: int = 4):
        self.max_draft, self.min_n, self.max_n = max_draft, min_n, max_n
        self.cost = StepCost()
        self.draft_tokens = 0        # drafted and verified, all requests
        self.accepted_tokens = 0     # ... and kept

    def drafts(self, decoding: list[Request], rows: int, budget: int) -> dict[str, list[int]]:
        """Draft tokens by request id for some of `decoding` (running requests computing one token this
        step, none with a grammar), in a step of `rows` decode rows, at most `budget` tokens in all."""
        r = self.cost.ratio()
        offers, states = [], {}
        for req in decoding:
            state = req.draft_state
            if state is None:
                state = req.draft_state = DraftState(PromptLookup(self.min_n, self.max_n))
            state.lookup.extend(req.prompt_ids, req.output_ids)
            # one token at least is produced (the sampled one), so drafts stop one short of the request's end
            proposal = state.lookup.propose(min(self.max_draft, req.max_len - req.num_tokens - 1))
            if proposal:
                states[req.request_id] = (state, proposal)
                heapq.heappush(offers, (-state.alpha, 1, req.request_id))
        chosen: dict[str, list[int]] = {}
        tokens, limit = float(rows), (STRETCH * (1 + r * rows) - 1) / r if rows > 1 else float("inf")
        while offers and budget > 0 and rows + 1 <= limit:
            gain, j, rid = heapq.heappop(offers)
            if -gain <= tokens * r / (1 + r * rows):
                break
            state, proposal = states[rid]
            chosen[rid] = proposal[:j]
            tokens, rows, budget = tokens - gain, rows + 1, budget - 1
            if j < len(proposal):
                heapq.heappush(offers, (gain * state.alpha, j + 1, rid))
        for rid, (state, _) in states.items():
            if rid not in chosen:
                state.alpha += DRIFT * (PRIOR - state.alpha)
        return chosen

    @staticmethod
    def sampling_rows(batch: ScheduledBatch, rows: list[int]) -> list[SamplingRow]:
        """What the sampler needs of each row (rows: batch.sample_rows()): a verify row's output so far
        includes the drafts before it, so that penalties see what plain decoding would have seen."""
        out, j = [], 0
        for n, i in enumerate(rows):
            j = j + 1 if n and rows[n - 1] == i else 0          # the row's place among its request's rows
            req = batch.requests[i]
            history = req.output_ids + batch.drafts[i][:j] if j and req.params.has_penalties else req.output_ids
            out.append(SamplingRow(req.params, req.generator, req.prompt_ids, history))
        return out

    @staticmethod
    def generator_states(batch: ScheduledBatch) -> dict[int, torch.Tensor]:
        """Before sampling: the generator state of each request that draws for drafts (see rewind)."""
        return {i: batch.requests[i].generator.get_state() for i, d in enumerate(batch.drafts)
                if d and not batch.requests[i].params.greedy}

    def observe(self, batch: ScheduledBatch, rows: int, seconds: float) -> None:
        """The step's model and sampling time, if every request in it decoded (with or without drafts)."""
        if all(batch.samples(i) and n == 1 + len(d) for i, (n, d) in enumerate(zip(batch.num_new_tokens,
                                                                                       batch.drafts))):
            self.cost.observe(rows, seconds)

    def keep(self, batch: ScheduledBatch, rows: list[int], tokens: list[int], logprobs: list[TokenLogprobs | None],
             rewind_to: dict[int, torch.Tensor]) -> tuple[list[list[int] | None], list[list[TokenLogprobs | None] | None]]:
        """Per request of the batch, the tokens it keeps from its sampled rows (None: it did not sample)
        and their logprobs; records each verified draft and rewinds the generators that drew for them."""
        kept: list[list[int] | None] = [None] * len(batch.requests)
        kept_logprobs: list[list[TokenLogprobs | None] | None] = [None] * len(batch.requests)
        j = 0
        while j < len(rows):
            i = rows[j]
            draft = batch.drafts[i]
            kept[i] = kept_tokens(tokens[j:j + 1 + len(draft)], draft)
            kept_logprobs[i] = logprobs[j:j + len(kept[i])]
            if draft:
                self.record(batch.requests[i], len(draft), len(kept[i]) - 1)
            if i in rewind_to:
                rewind(batch.requests[i].generator, rewind_to[i], len(kept[i]))
            j += 1 + len(draft)
        return kept, kept_logprobs

    def record(self, req: Request, drafted: int, kept: int) -> None:
        """req verified `drafted` draft tokens and kept the first `kept` of them."""
        state = req.draft_state
        for _ in range(kept):
            state.alpha += STEP * (1 - state.alpha)
        if kept < drafted:
            state.alpha -= STEP * state.alpha
        self.draft_tokens += drafted
        self.accepted_tokens += kept


def kept_tokens(sampled: list[int], draft: list[int]) -> list[int]:
    """The tokens a request keeps from its verify rows: its drafts up to the first that differs from the
    token sampled at its position, then that sampled token (sampled has one more entry than draft)."""
    for j, d in enumerate(draft):
        if sampled[j] != d:
            return sampled[:j + 1]
    return sampled


def rewind(generator: torch.Generator, state: torch.Tensor, draws: int) -> None:
    """Put a request's generator where plain decoding would have left it: `draws` draws past `state`
    (the sampler takes one uniform number per sampled row)."""
    generator.set_state(state)
    for _ in range(draws):
        torch.rand((), generator=generator)
