"""Paged attention over a block KV cache, in plain torch (runs on CPU and CUDA alike).

Owns `AttentionMetadata` (built once per step from flat per-sequence lengths and block tables, then
shared by every layer) and `paged_attention`, which writes the step's new K/V into the cache by
slot and attends each query token to its own sequence's cached keys, with the causal mask, the
sliding window on local layers and Gemma 2's logit soft-capping. One code path serves prefill,
chunked prefill, decode and mixes of them. Knows nothing of requests: only lengths and slots.

Cache layout per layer: `[num_blocks, block_size, kv_heads, head_dim]` for K and for V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor    # [T] flat cache slot of each new token
    token_index: torch.Tensor     # [B, Lq] index into the flat tokens of each padded query (pads -> 0)
    valid_query: torch.Tensor     # [B, Lq] bool
    block_table: torch.Tensor     # [B, n_blocks] each sequence's blocks, padded with block 0
    causal_mask: torch.Tensor     # [B, 1, Lq, Lk] bool, True = attend; Lk = n_blocks * block_size
    sliding_mask: torch.Tensor | None  # same, also inside the window
    is_decode: bool               # every sequence has exactly one query token

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, sliding_window: int | None, device: torch.device) -> AttentionMetadata:
        """seq_lens[b] counts the sequence's tokens including this step's query_lens[b] new ones."""
        B, Lq, Lk = len(query_lens), max(query_lens), max(seq_lens)
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        s_lens = torch.tensor(seq_lens, dtype=torch.long)
        starts = torch.cumsum(q_lens, 0) - q_lens
        offs = torch.arange(Lq)
        valid_query = offs[None, :] < q_lens[:, None]
        token_index = torch.where(valid_query, starts[:, None] + offs[None, :], 0)
        # Position of each padded query; pads sit at position 0 so they always see key 0 (no NaN rows).
        q_pos = torch.where(valid_query, (s_lens - q_lens)[:, None] + offs[None, :], 0)
        n_blocks = (Lk + block_size - 1) // block_size
        table = torch.zeros(B, n_blocks, dtype=torch.long)
        for b, blocks in enumerate(block_tables):
            used = blocks[:n_blocks]
            table[b, :len(used)] = torch.tensor(used, dtype=torch.long)
        k_pos = torch.arange(n_blocks * block_size)   # keys past a sequence's length are masked as "future"
        new_pos = [torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)]
        new_pos_flat = torch.cat(new_pos)
        owner = torch.repeat_interleave(torch.arange(B), q_lens)
        slot_mapping = table[owner, new_pos_flat // block_size] * block_size + new_pos_flat % block_size
        causal = k_pos[None, None, :] <= q_pos[:, :, None]
        sliding = None
        if sliding_window is not None:
            sliding = causal & (k_pos[None, None, :] > q_pos[:, :, None] - sliding_window)
        to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return cls(
            slot_mapping=to(slot_mapping), token_index=to(token_index), valid_query=to(valid_query),
            block_table=to(table), causal_mask=to(causal[:, None]),
            sliding_mask=to(sliding[:, None]) if sliding is not None else None,
            is_decode=Lq == 1,
        )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, sliding: bool, softcap: float | None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's new tokens). Returns [T, H * D]."""
    T, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    k_flat = k_cache.view(-1, KVH, D)
    v_flat = v_cache.view(-1, KVH, D)
    k_flat.index_copy_(0, meta.slot_mapping, k.to(k_flat.dtype))
    v_flat.index_copy_(0, meta.slot_mapping, v.to(v_flat.dtype))
    B, Lq = meta.token_index.shape
    # Grouped-query layout: each KV head serves its G query heads as G*Lq rows, so K/V are not copied G times.
    qp = q.view(B, 1, H, D) if meta.is_decode else q[meta.token_index]    # [B, Lq, H, D]
    qp = qp.view(B, Lq, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * Lq, D)
    # Gather whole blocks (contiguous runs), not single slots: far fewer, larger copies.
    mask = meta.sliding_mask if sliding else meta.causal_mask             # [B, 1, Lq, Lk]
    Lk = mask.shape[-1]
    blocks = meta.block_table.flatten()
    keys = k_cache.index_select(0, blocks).view(B, Lk, KVH, D).permute(0, 2, 1, 3).to(q.dtype)  # [B, KVH, Lk, D]
    values = v_cache.index_select(0, blocks).view(B, Lk, KVH, D).permute(0, 2, 1, 3).to(q.dtype)
    mask = mask.unsqueeze(2).expand(B, 1, G, Lq, Lk).reshape(B, 1, G * Lq, Lk)
    if softcap is None:
        out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(qp, keys.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, values)
    out = out.view(B, KVH, G, Lq, D).permute(0, 3, 1, 2, 4).reshape(B, Lq, H * D)
    return out.view(B, H * D) if meta.is_decode else out[meta.valid_query]  # [T, H*D], flat order kept
