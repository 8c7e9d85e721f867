"""LLMEngine: the synchronous core. Token ids and SamplingParams in, RequestOutputs out.

`step()` is the whole loop: schedule, run the model, sample, keep the verified drafts (speculative
decoding, gemlora.engine.speculation), postprocess. A step that raises (an
out-of-memory error, a bad adapter copy, a bug) ends only the requests of that step's batch with an
error; waiting requests and the engine itself carry on. The engine knows nothing of text, chat
templates or HTTP; AsyncEngine wraps it for concurrent callers.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gemlora.cache.block_manager import BlockManager
from gemlora.cache.kv_cache import allocate_kv_cache, blocks_for_budget
from gemlora.config import EngineConfig
from gemlora.engine.runner import ModelRunner
from gemlora.engine.sampler import sample
from gemlora.engine.scheduler import Scheduler
from gemlora.engine.speculation import Speculator
from gemlora.engine.token_masks import TokenConstraint, TokenMasks
from gemlora.lora.slots import LoRASlots
from gemlora.model.gemma import GemmaForCausalLM
from gemlora.request import Request, RequestOutput
from gemlora.sampling import InvalidRequestError, SamplingParams, check_lora_scale

if TYPE_CHECKING:
    from gemlora.lora.adapter import LoRAAdapter

log = logging.getLogger("gemlora.engine")


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A read-only snapshot for metrics and health: what the API may know of the engine."""
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_free: int
    adapters_in_slots: int
    adapter_slot_loads: int
    preemptions: int
    steps: int
    failed_steps: int
    kv_blocks_cached: int          # blocks naming a prefix the cache can reuse (in use or free)
    prefix_cache_queries: int      # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int         # ... and found there
    spec_draft_tokens: int = 0     # draft tokens verified (speculative decoding)
    spec_accepted_tokens: int = 0  # ... and kept


def kv_blocks_and_window(model_cfg, config: EngineConfig, kv_dtype) -> tuple[int, int]:
    """(KV blocks the budget holds, the context window): what an engine of this config will have."""
    num_blocks = blocks_for_budget(model_cfg, config.block_size, kv_dtype, int(config.kv_cache_memory_gb * 2**30))
    # A request must fit the whole KV cache on its own, or preemption could never make room for it.
    limit = min(model_cfg.max_position_embeddings, num_blocks * config.block_size)
    return num_blocks, min(config.max_model_len or limit, limit)


class LLMEngine:
    def __init__(self, model: GemmaForCausalLM, config: EngineConfig, stop_token_ids: frozenset[int]):
        self.config = config
        self.model_config = model.cfg
        kv_dtype = config.kv_torch_dtype(model.dtype)
        num_blocks, self.max_model_len = kv_blocks_and_window(model.cfg, config, kv_dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        kv = allocate_kv_cache(model.cfg, num_blocks, config.block_size, kv_dtype, model.device)
        slots = None
        if config.max_loras:
            slots = LoRASlots(model.lora_targets(), config.max_loras, config.max_lora_rank, model.dtype, model.device)
        self.lora_slots = slots
        screen = config.screen_lm_head and model.screen_lm_head() is not None
        self.runner = ModelRunner(model, kv, config.block_size, slots, workspace_bytes=config.attention_workspace_bytes,
                                  screen_lm_head=screen)
        self.speculator = Speculator(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_loras, config.adapter_aging_steps,
                                   self.speculator if config.num_speculative_tokens else None)
        self.stop_token_ids = stop_token_ids
        self.token_masks = TokenMasks(model.cfg.vocab_size)
        self.failed_steps = 0

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, *,
                    adapter_id: str | None = None, adapter: LoRAAdapter | None = None,
                    lora_scale: float = 1.0, cache_salt: str | None = None,
                    constraint: TokenConstraint | None = None) -> str:
        """`adapter` (validated weights) under its stable `adapter_id`, or neither for the base model.
        Only requests with the same `cache_salt` share cached prefixes. `constraint`: the grammar its
        output must follow (fresh, for this request alone)."""
        self.validate(prompt_ids, adapter, lora_scale)
        request_id = request_id or uuid.uuid4().hex
        self.scheduler.add(Request(request_id, prompt_ids, params, self.stop_token_ids, self.max_model_len,
                                   adapter_id, adapter, lora_scale, cache_salt, constraint))
        return request_id

    def validate(self, prompt_ids: list[int], adapter: LoRAAdapter | None = None, lora_scale: float = 1.0) -> None:
        """Everything add_request would refuse, checked without touching engine state (thread-safe)."""
        check_lora_scale(lora_scale)
        if adapter is not None and self.lora_slots is None:
            raise InvalidRequestError("this engine serves no adapters (max_loras = 0)", "lora")
        if adapter is not None and adapter.rank > self.config.max_lora_rank:
            raise InvalidRequestError(f"adapter rank {adapter.rank} exceeds max_lora_rank "
                                      f"{self.config.max_lora_rank}", "lora")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens; the context window is "
                                      f"{self.max_model_len} tokens, including at least one generated", "prompt")

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def forget_adapter(self, adapter_id: str) -> None:
        """The adapter was unregistered: empty its slot, if it has one (only requests pin adapters)."""
        if self.lora_slots is not None:
            self.lora_slots.forget(adapter_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        s, slots = self.scheduler, self.lora_slots
        return EngineStats(len(s.waiting), len(s.running), self.blocks.num_used, self.blocks.num_free,
                           slots.resident if slots else 0, slots.loads if slots else 0, s.num_preemptions,
                           s.num_steps, self.failed_steps, self.blocks.num_cached, s.prefix_queries, s.prefix_hits,
                           self.speculator.draft_tokens, self.speculator.accepted_tokens)

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        masks = None
        try:
            # the grammars' masks are filled on a worker thread while the model runs
            masks = self.token_masks.start([batch.requests[i].constraint for i in batch.sample_rows()])
            rewind_to = self.speculator.generator_states(batch)
            started = time.perf_counter()
            logits, rows = self.runner.run(batch)
            tokens, logprobs = sample(logits, self.speculator.sampling_rows(batch, rows),
                                      masks.result() if masks else None)
            self.speculator.observe(batch, len(rows), time.perf_counter() - started)
            kept, kept_logprobs = self.speculator.keep(batch, rows, tokens, logprobs, rewind_to)
        except Exception as exc:   # only this batch fails; waiting requests and the engine go on
            log.exception("engine step failed; ending the %d requests of its batch", len(batch.requests))
            self.failed_steps += 1
            if masks is not None:
                masks.exception()        # a grammar must not be touched by a late fill once its request ends
            return self.scheduler.fail(batch.requests, f"engine step failed: {exc!r}")
        return self.scheduler.postprocess(batch, kept, kept_logprobs)
