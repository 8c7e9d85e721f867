"""Scheduler: continuous batching over the paged KV cache.

Each step it gives every running request its next tokens (one while decoding, a chunk while
prefilling), then admits waiting requests first-come-first-served into what is left of the token
budget, the sequence cap and the free KV blocks. When blocks run out, the most recently admitted
request is preempted: its blocks are freed and it goes back to the front of the queue, keeping its
output, to be recomputed later with the same result.

Adapters: the running requests never name more than `max_loras` distinct adapters (so every step's
adapters fit the runner's slots); a request for another adapter waits while requests behind it go
ahead. So that a cold adapter cannot starve behind hot ones that keep every slot busy, a request
that has waited `adapter_aging_steps` steps for a slot stops the admission of every later adapter
request until a slot drains and it gets in (base-model requests still pass: they need no slot).

Prefix caching: a request admitted from the queue first takes the longest run of its full blocks
that the block manager has cached under the same hash chain (same tokens, adapter, scale and salt),
and starts computing after them; at least one token is always left to compute, so a token can be
sampled. As a request's blocks fill with computed K/V they are named in the cache, so later requests
(and this one, resumed after preemption) find them.

Speculative decoding (gemlora.engine.speculation): with a speculator, running requests that decode
may also get draft tokens to verify in the same step, as many as it judges worth their rows, and only
where the KV blocks for them are free without preempting anyone; `postprocess` keeps the K/V of the
drafts that were accepted and leaves the rest to be overwritten.

`postprocess` absorbs the sampled tokens, and `fail` ends the requests of a step that raised, so all
request-state changes live here. Knows requests, block ids and adapter ids; nothing of tensors,
slots or text.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gemlora.cache.block_manager import BlockHash, BlockManager, block_hash, prefix_root
from gemlora.request import FinishReason, Request, RequestOutput, Status
from gemlora.sampling import InvalidRequestError

log = logging.getLogger("gemlora.engine")

if TYPE_CHECKING:
    from gemlora.engine.sampler import TokenLogprobs
    from gemlora.engine.speculation import Speculator


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # per request, this step (drafts included)
    drafts: list[list[int]] = field(default_factory=list)     # per request, draft tokens verified this step
    running_adapters: frozenset[str] = frozenset()            # of every running request, scheduled or not

    def __bool__(self) -> bool:
        return bool(self.requests)

    def samples(self, i: int) -> bool:
        """Does request i reach its last known token this step, so a new one is sampled?"""
        req = self.requests[i]
        return req.num_computed + self.num_new_tokens[i] - len(self.drafts[i]) == req.num_tokens

    def sample_rows(self) -> list[int]:
        """The request index of each row sampled this step, in step order: one per sampling request,
        and one more per draft token it verifies (its last token's row, then each draft's)."""
        return [i for i in range(len(self.requests)) if self.samples(i) for _ in range(1 + len(self.drafts[i]))]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int = 0, adapter_aging_steps: int = 32, speculator: Speculator | None = None):
        self.blocks = blocks
        self.speculator = speculator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.adapter_aging_steps = adapter_aging_steps
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.adapter_users: Counter[str] = Counter()   # running requests per adapter id
        self.num_preemptions = 0
        self.num_steps = 0
        self.prefix_queries = 0      # prompt tokens looked up in the prefix cache at admission
        self.prefix_hits = 0         # ... and found there
        self._ids: set[str] = set()

    def add(self, req: Request) -> None:
        if req.request_id in self._ids:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        self._ids.add(req.request_id)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self.num_steps += 1
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        drafts = self._drafts(budget)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            draft = drafts.get(req.request_id, [])
            if draft and not self._reserve_spare(req, req.num_tokens + len(draft)):
                draft = []             # drafts never take blocks another request may need
            n = min(req.num_tokens - req.num_computed + len(draft), budget)
            draft = draft[:max(n - 1, 0)]
            while not self._reserve(req, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                batch.drafts.append(draft)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: everything after it is gone too
        passed_over: list[Request] = []      # waiting for an adapter slot; keep their place
        starving = False                     # an aged request waits for a slot: hold other adapters back
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            if req.adapter_id is not None and (starving or not self._adapter_fits(req)):
                if req.blocked_since is None:
                    req.blocked_since = self.num_steps
                starving = starving or self.num_steps - req.blocked_since >= self.adapter_aging_steps
                passed_over.append(req)
                continue
            self._reuse_cached_prefix(req)
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve(req, req.num_computed + n):
                self._drop_blocks(req)
                self.waiting.appendleft(req)
                break
            self._count_prefix_hits(req)
            req.status = Status.RUNNING
            req.blocked_since = None
            self.running.append(req)
            if req.adapter_id is not None:
                self.adapter_users[req.adapter_id] += 1
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            batch.drafts.append([])
            budget -= n
        self.waiting.extendleft(reversed(passed_over))
        batch.running_adapters = frozenset(self.adapter_users)
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: list[list[int] | None],
                    logprobs: list[list[TokenLogprobs | None] | None] | None = None) -> list[RequestOutput]:
        """sampled[i]: the tokens batch.requests[i] keeps this step (its accepted drafts, then the token
        sampled after them), or None if it is still prefilling; logprobs[i]: theirs, where asked for."""
        outputs = []
        for req, n, draft, tokens, lps in zip(batch.requests, batch.num_new_tokens, batch.drafts, sampled,
                                              logprobs or [None] * len(sampled)):
            try:      # a grammar or the block cache raising ends this request alone, not the batch or the queue
                if tokens is None:
                    req.num_computed += n
                    self._name_computed_blocks(req)
                    continue
                # the K/V of the drafts after the first rejected one is left to be overwritten
                computed = req.num_computed + n - (len(draft) - (len(tokens) - 1))
                new, new_lps, reason = [], [], None
                for token, lp in zip(tokens, lps or [None] * len(tokens)):
                    reason = req.append(token)
                    if req.output_ids[-1] != token:       # steered to stay within its budget: forced, not drawn
                        token = req.output_ids[-1]
                        lp = None if lp is None else replace(lp, token=token, logprob=0.0)
                    new.append(token)
                    new_lps.append(lp)
                    if reason is not None:
                        break
                req.num_computed = min(computed, req.num_tokens)    # a stop among the drafts ends it early
                self._name_computed_blocks(req)
                grammar_error = req.constraint.error if req.constraint is not None else None
                if grammar_error:     # the caller's schema cannot be followed further: its fault, said so
                    self._finish(req, FinishReason.ERROR)
                    out = self._output(req, [])
                    out.refusal = InvalidRequestError("the output cannot follow the JSON schema: "
                                                      + grammar_error.strip().splitlines()[0])
                    outputs.append(out)
                    continue
                if reason is not None:
                    self._finish(req, reason)
                out = self._output(req, new)
                out.logprobs = None if all(lp is None for lp in new_lps) else new_lps
                outputs.append(out)
            except Exception as exc:
                log.exception("request %s failed after its step; ending it alone", req.request_id)
                outputs.extend(self.fail([req], f"engine step failed: {exc!r}"))
        return outputs

    def abort(self, request_id: str) -> Request | None:
        if request_id not in self._ids:
            return None
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish(req, FinishReason.ABORT, remove=False)
                    return req
        return None

    def fail(self, requests: list[Request], error: str) -> list[RequestOutput]:
        """A step raised: end exactly these requests (that step's batch) with an error; the rest go on."""
        outputs = []
        for req in requests:
            if req.status is Status.FINISHED:
                continue
            (self.running if req in self.running else self.waiting).remove(req)
            self._finish(req, FinishReason.ERROR, remove=False)
            out = self._output(req, [])
            out.error = error
            outputs.append(out)
        return outputs

    def fail_all(self, error: str) -> list[RequestOutput]:
        """The engine is stopping, or its state can no longer be trusted: end every request."""
        return self.fail(list(self.running) + list(self.waiting), error)

    def _adapter_fits(self, req: Request) -> bool:
        return req.adapter_id in self.adapter_users or len(self.adapter_users) < self.max_loras

    def _drafts(self, budget: int) -> dict[str, list[int]]:
        """The speculator's drafts for this step's decoding requests (none while requests wait: their
        prefill comes first), within the token budget left after one token per running request."""
        if self.speculator is None or self.waiting:
            return {}
        decoding = [r for r in self.running if r.num_tokens - r.num_computed == 1]
        eligible = [r for r in decoding if r.constraint is None]
        if not eligible or len(decoding) < len(self.running):
            return {}
        return self.speculator.drafts(eligible, len(decoding), budget - len(self.running))

    def _reserve_spare(self, req: Request, num_tokens: int) -> bool:
        """Reserve blocks for num_tokens only if it leaves a free block for every running request."""
        need = self.blocks.blocks_for(num_tokens) - len(req.block_table)
        if need > 0 and not self.blocks.can_allocate(need + len(self.running)):
            return False
        return self._reserve(req, num_tokens)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        need = self.blocks.blocks_for(num_tokens) - len(req.block_table)
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        req.block_table += self.blocks.allocate(need)
        return True

    def _reuse_cached_prefix(self, req: Request) -> None:
        if not self.blocks.enable_caching:
            return
        usable = (req.num_tokens - 1) // self.blocks.block_size    # leave at least one token to compute
        hits = self.blocks.cached_prefix(self._block_hashes(req, usable))
        self.blocks.share(hits)
        req.block_table = hits
        req.num_named_blocks = len(hits)
        req.num_computed = len(hits) * self.blocks.block_size

    def _count_prefix_hits(self, req: Request) -> None:
        if not self.blocks.enable_caching:
            return
        self.prefix_queries += req.num_tokens
        self.prefix_hits += req.num_computed
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed

    def _name_computed_blocks(self, req: Request) -> None:
        """Register in the prefix cache each block of req that has just filled with computed K/V."""
        full = req.num_computed // self.blocks.block_size
        if full <= req.num_named_blocks or not self.blocks.enable_caching:
            return
        for i, h in enumerate(self._block_hashes(req, full)[req.num_named_blocks:], req.num_named_blocks):
            self.blocks.cache(req.block_table[i], h)
        req.num_named_blocks = full

    def _block_hashes(self, req: Request, num_blocks: int) -> list[BlockHash]:
        """The hash chain of req's first num_blocks full blocks, extended as far as needed."""
        hashes, size = req.block_hashes, self.blocks.block_size
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else prefix_root(req.adapter_id, req.lora_scale, req.cache_salt)
            hashes.append(block_hash(parent, req.token_slice(i * size, size)))
        return hashes[:num_blocks]

    def _drop_blocks(self, req: Request) -> None:
        """Give back req's blocks (computed ones stay cached) and forget what it had computed."""
        self.blocks.free(req.block_table)
        req.block_table = []
        req.num_computed = req.num_named_blocks = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._drop_adapter(req)
        self._drop_blocks(req)    # recomputed from prompt + output so far when resumed (cached blocks first)
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _finish(self, req: Request, reason: FinishReason, remove: bool = True) -> None:
        if remove:
            self.running.remove(req)
        if req.status is Status.RUNNING:
            self._drop_adapter(req)
        self._ids.discard(req.request_id)
        if req.block_table:
            self._drop_blocks(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    def _drop_adapter(self, req: Request) -> None:
        if req.adapter_id is not None:
            self.adapter_users[req.adapter_id] -= 1
            if not self.adapter_users[req.adapter_id]:
                del self.adapter_users[req.adapter_id]

    @staticmethod
    def _output(req: Request, tokens: list[int]) -> RequestOutput:
        return RequestOutput(req.request_id, tokens, req.status is Status.FINISHED, req.finish_reason,
                             len(req.prompt_ids), len(req.output_ids), req.num_cached_tokens or 0)
