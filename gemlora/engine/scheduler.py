"""Scheduler: continuous batching over the paged KV cache.

Each step it gives every running request its next tokens (one while decoding, a chunk while
prefilling), then admits waiting requests first-come-first-served into what is left of the token
budget, the sequence cap and the free KV blocks. When blocks run out, the most recently admitted
request is preempted: its blocks are freed and it goes back to the front of the queue, keeping its
output, to be recomputed later with the same result. A request naming an adapter is admitted only
when its adapter has a slot (or one can be freed from adapters no running request uses), so a
step never holds more distinct adapters than there are slots; otherwise it waits while requests
behind it go ahead. `postprocess` absorbs the sampled tokens, so all request-state changes live
here. Knows requests, block ids and slot ids; nothing of tensors or text.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gemlora.cache.block_manager import BlockManager
from gemlora.lora.slot_table import SlotTable
from gemlora.request import FinishReason, Request, RequestOutput, Status


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)   # per request, this step
    slot_loads: list[tuple[int, Request]] = field(default_factory=list)  # slots to fill before running

    def __bool__(self) -> bool:
        return bool(self.requests)

    def samples(self, i: int) -> bool:
        """Does request i reach its last known token this step, so a new one is sampled?"""
        req = self.requests[i]
        return req.num_computed + self.num_new_tokens[i] == req.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 slot_table: SlotTable | None = None):
        self.blocks = blocks
        self.slot_table = slot_table
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._reserve(req, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: everything after it is gone too
        passed_over: list[Request] = []      # waiting for an adapter slot; keep their place
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            if req.adapter_id is not None and not self._take_slot(req, batch):
                passed_over.append(req)
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve(req, req.num_computed + n):
                self._drop_slot(req)
                self.waiting.appendleft(req)
                break
            req.status = Status.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(passed_over))
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[RequestOutput]:
        """sampled[i]: the token sampled for batch.requests[i], or None if it is still prefilling."""
        outputs = []
        for req, n, token in zip(batch.requests, batch.num_new_tokens, sampled):
            req.num_computed += n
            if token is None:
                continue
            reason = req.append(token)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(self._output(req, [token]))
        return outputs

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish(req, FinishReason.ABORT, remove=False)
                    return req
        return None

    def fail_all(self, error: str) -> list[RequestOutput]:
        """The engine broke mid-step: end every request with an error rather than leave it hanging."""
        outputs = []
        for req in list(self.running) + list(self.waiting):
            self._finish(req, FinishReason.ERROR, remove=False)
            out = self._output(req, [])
            out.error = error
            outputs.append(out)
        self.running.clear()
        self.waiting.clear()
        return outputs

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        need = self.blocks.blocks_for(num_tokens) - len(req.block_table)
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        req.block_table += self.blocks.allocate(need)
        return True

    def _take_slot(self, req: Request, batch: ScheduledBatch) -> bool:
        if self.slot_table is None:
            raise RuntimeError("this engine has no adapter slots (max_loras = 0)")
        got = self.slot_table.assign(req.adapter_id)
        if got is None:
            return False
        req.slot, must_load = got
        if must_load:
            batch.slot_loads.append((req.slot, req))
        return True

    def _drop_slot(self, req: Request) -> None:
        if req.slot >= 0:
            self.slot_table.release(req.slot)
            req.slot = -1

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._drop_slot(req)
        self.blocks.free(req.block_table)
        req.block_table = []
        req.num_computed = 0      # recomputed from prompt + output so far when resumed
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _finish(self, req: Request, reason: FinishReason, remove: bool = True) -> None:
        if remove:
            self.running.remove(req)
        self._drop_slot(req)
        if req.block_table:
            self.blocks.free(req.block_table)
            req.block_table = []
        req.status = Status.FINISHED
        req.finish_reason = reason

    @staticmethod
    def _output(req: Request, tokens: list[int]) -> RequestOutput:
        return RequestOutput(req.request_id, tokens, req.status is Status.FINISHED, req.finish_reason,
                             len(req.prompt_ids), len(req.output_ids))
