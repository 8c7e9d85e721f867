"""ModelRunner: turns a scheduled batch into the model's flat tensors, and runs it.

Owns the model, the KV cache tensors, the adapter slots and the device. From each request it takes
only token ids, how many are cached, how many are new, its block table, and its adapter (id,
weights, scale), which it makes resident in a slot before the forward pass; it returns the logits
of the rows that sample this step (the last position of each request whose known tokens are all
computed, and each draft token's position where a request verifies drafts), so a prefill never pays
for the LM head at positions nobody samples. A request verifying k drafts enters attention as k + 1
decode rows of one sequence (gemlora.engine.speculation), so the step stays a decode step. Whether
the sampled rows may read the screened LM head it decides from each one's sampling parameters and grammar.
"""

from __future__ import annotations

import torch

from gemlora.engine.scheduler import ScheduledBatch
from gemlora.lora.batch import LoRABatch
from gemlora.lora.slots import LoRASlots
from gemlora.model.attention import AttentionMetadata, AttentionShape
from gemlora.model.gemma import GemmaForCausalLM, StepContext


class ModelRunner:
    def __init__(self, model: GemmaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, lora_slots: LoRASlots | None = None, *, workspace_bytes: int | None = None,
                 screen_lm_head: bool = False):
        self.model = model
        self.screen_lm_head = screen_lm_head     # steps whose rows allow it read the screened LM head
        self.workspace_bytes = 256 * 2**20 if workspace_bytes is None else workspace_bytes  # attention temporaries
        self.attention_shape = AttentionShape.of(model.cfg, model.dtype)
        self.lora_slots = lora_slots
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = model.device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Returns (logits [rows, vocab] float32, the index into batch.requests of each row): the rows
        of batch.sample_rows()."""
        slot_of: dict[str | None, int] = {None: -1}
        adapters = {r.adapter_id: r.adapter for r in batch.requests if r.adapter_id is not None}
        if adapters:       # copies any adapter not yet in a slot; a failed copy leaves its slot empty
            slot_of.update(self.lora_slots.activate(adapters, keep=batch.running_adapters))
        ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sampled: list[int] = []
        token_slots: list[int] = []
        token_scales: list[float] = []
        for i, (req, n, draft) in enumerate(zip(batch.requests, batch.num_new_tokens, batch.drafts)):
            token_slots += [slot_of[req.adapter_id]] * n
            token_scales += [req.lora_scale] * n
            start, k = req.num_computed, len(draft)
            ids += req.token_slice(start, n - k) + draft
            positions += range(start, start + n)
            if k:                   # the verify rows: decode rows of one sequence, one position apart
                query_lens += [1] * n
                seq_lens += range(start + 1, start + n + 1)
                tables += [req.block_table] * n
            else:
                query_lens.append(n)
                seq_lens.append(start + n)
                tables.append(req.block_table)
            if batch.samples(i):
                sampled += range(len(ids) - 1 - k, len(ids))
        sample_rows = batch.sample_rows()
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, self.model.cfg.sliding_window,
                                       self.device, self.workspace_bytes, self.attention_shape)
        to = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        lora = LoRABatch.build(token_slots, token_scales, self.lora_slots, self.device) if self.lora_slots else None
        hidden = self.model(to(ids), to(positions), StepContext(meta, self.kv_caches, lora))
        if not sample_rows:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32), []
        return self.model.compute_logits(hidden[to(sampled)], self._screened(batch, sample_rows)), sample_rows

    def _screened(self, batch: ScheduledBatch, rows: list[int]) -> bool:
        """May these rows' logits come from the screened LM head? Only if each row's token is decided by its
        top tokens alone (gemlora.quant.screened_head): no grammar mask, no full-vocabulary draw."""
        head = self.model.screened_head
        return self.screen_lm_head and head is not None and all(
            batch.requests[i].constraint is None and batch.requests[i].params.decided_by_top(head.candidates)
            for i in rows)
