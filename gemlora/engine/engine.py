"""LLMEngine: the synchronous core. Token ids and SamplingParams in, RequestOutputs out.

`step()` is the whole loop: schedule, run the model, sample, postprocess. The engine knows
nothing of text, chat templates or HTTP; AsyncEngine wraps it for concurrent callers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import uuid

from gemlora.cache.block_manager import BlockManager
from gemlora.cache.kv_cache import allocate_kv_cache, blocks_for_budget
from gemlora.config import EngineConfig
from gemlora.engine.runner import ModelRunner
from gemlora.engine.sampler import SamplingRow, sample
from gemlora.engine.scheduler import Scheduler
from gemlora.lora.slot_table import SlotTable
from gemlora.lora.slots import LoRASlots
from gemlora.model.gemma import GemmaForCausalLM
from gemlora.request import Request, RequestOutput
from gemlora.sampling import InvalidRequestError, SamplingParams, check_lora_scale

if TYPE_CHECKING:
    from gemlora.lora.adapter import LoRAAdapter


class LLMEngine:
    def __init__(self, model: GemmaForCausalLM, config: EngineConfig, stop_token_ids: frozenset[int]):
        self.config = config
        self.model_config = model.cfg
        num_blocks = blocks_for_budget(model.cfg, config.block_size, model.dtype,
                                       int(config.kv_cache_memory_gb * 2**30))
        self.blocks = BlockManager(num_blocks, config.block_size)
        kv = allocate_kv_cache(model.cfg, num_blocks, config.block_size, model.dtype, model.device)
        slots = table = None
        if config.max_loras:
            slots = LoRASlots(model.lora_targets(), config.max_loras, config.max_lora_rank, model.dtype, model.device)
            table = SlotTable(config.max_loras)
        self.runner = ModelRunner(model, kv, config.block_size, slots)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, table)
        self.stop_token_ids = stop_token_ids
        # A request must fit the whole KV cache on its own, or preemption could never make room for it.
        limit = min(model.cfg.max_position_embeddings, num_blocks * config.block_size)
        self.max_model_len = min(config.max_model_len or limit, limit)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, *,
                    adapter_id: str | None = None, adapter: LoRAAdapter | None = None,
                    lora_scale: float = 1.0) -> str:
        """`adapter` (validated weights) under its stable `adapter_id`, or neither for the base model."""
        self.validate(prompt_ids, adapter, lora_scale)
        request_id = request_id or uuid.uuid4().hex
        self.scheduler.add(Request(request_id, prompt_ids, params, self.stop_token_ids, self.max_model_len,
                                   adapter_id, adapter, lora_scale))
        return request_id

    def validate(self, prompt_ids: list[int], adapter: LoRAAdapter | None = None, lora_scale: float = 1.0) -> None:
        """Everything add_request would refuse, checked without touching engine state (thread-safe)."""
        check_lora_scale(lora_scale)
        if adapter is not None and self.scheduler.slot_table is None:
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

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.runner.load_slots(batch)       # always: the slot table already counts these as resident
        if not batch:
            return []
        logits, rows = self.runner.run(batch)
        reqs = [batch.requests[i] for i in rows]
        tokens = sample(logits, [SamplingRow(r.params, r.generator, r.prompt_ids, r.output_ids) for r in reqs])
        sampled: list[int | None] = [None] * len(batch.requests)
        for i, t in zip(rows, tokens):
            sampled[i] = t
        return self.scheduler.postprocess(batch, sampled)
