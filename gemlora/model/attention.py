"""Paged attention over a block KV cache, in plain torch (runs on CPU and CUDA alike), with decode rows
on the CPU taken by the C++ kernel of gemlora.kernels.decode_attention where it applies.

Owns `AttentionMetadata` (built once per step from flat per-sequence lengths and block tables, then
shared by every layer) and `paged_attention`, which writes the step's new K/V into the cache by
slot and attends each query token to its own sequence's cached keys, with the causal mask, the
sliding window on local layers and Gemma 2's logit soft-capping. One code path serves prefill,
chunked prefill, decode and mixes of them. Knows nothing of requests: only lengths, slots, block
tables, and the head shape it needs to size its temporaries.

Memory: `build` plans the step's attention once, as a list of groups for global layers and one for
sliding layers, so that the largest group's temporaries (gathered K/V, masks, scores) plus what the
plan keeps for the whole step stay under a workspace budget. Rows with one query (decodes) are
batched, each gathering only its own blocks, and on sliding layers only the blocks that can hold its
last `window` keys. Rows with several queries (prefill chunks) are never padded to one another and
are split into query sub-chunks that fit. Every layer loops over the same groups.

Cache layout per layer: `[num_blocks, block_size, kv_heads, head_dim]` for K and for V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gemlora.kernels.decode_attention import decode_attention, kernel_applies

if TYPE_CHECKING:
    from gemlora.model.config import GemmaConfig

# Bytes counted per attention score (one head, one query, one key), as if the scores were
# materialised whatever kernel runs: the soft-cap path and SDPA's math fallback hold the logits, and
# the float32 probabilities next to them (12 = three float32 copies, enough for bf16 logits too).
_SCORE_BYTES = 12
# Per element of a sub-chunk's [G*q, keys] mask: the bool mask, the sliding comparison's temporary
# bool, and the additive float mask SDPA turns a bool mask into (or ~mask on the soft-cap path).
_CHUNK_MASK_BYTES = 1 + 1 + 4
# Per key of a decode row's stored [1, keys] bool mask, SDPA's float copy of it is a temporary.
_ROW_MASK_TEMP_BYTES = 4
_INDEX_BYTES = 8                    # int64 block ids, token indices, positions
# A sliding sub-chunk of q queries gathers about q + window keys, so past ~window queries it mostly
# computes masked-out scores: sliding sub-chunks hold at most max(window, this) queries, whatever the budget.
_SLIDING_CHUNK_MIN = 256


@dataclass(frozen=True, slots=True)
class AttentionShape:
    """What the planner must know of the model to size temporaries."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype            # of the queries and of the gathered K/V

    @classmethod
    def of(cls, cfg: GemmaConfig, dtype: torch.dtype) -> AttentionShape:
        return cls(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype)


@dataclass(slots=True)
class _Rows:
    """Single-query rows batched together, each attending the blocks gathered for it alone."""
    tokens: torch.Tensor | None   # [R] flat token index of each row's query; None: all tokens, in order
    blocks: torch.Tensor          # [R * n] each row's n blocks, row-major (short rows padded with block 0)
    mask: torch.Tensor            # [R, 1, 1, n * block_size] bool, True = attend


@dataclass(slots=True)
class _Chunk:
    """Consecutive queries of one multi-query row, attending one contiguous run of its blocks."""
    start: int                    # flat tokens [start, stop)
    stop: int
    blocks: torch.Tensor          # [n] view into the row's block table
    q_rel: torch.Tensor           # [stop - start] query positions minus the first gathered key's


@dataclass(slots=True)
class _Plan:
    window: int | None            # keys at most window - 1 behind the query (None: global layers)
    rows: list[_Rows]
    chunks: list[_Chunk]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor    # [T] flat cache slot of each new token
    global_plan: _Plan
    sliding_plan: _Plan           # the global plan itself when no sequence is longer than the window
    key_pos: torch.Tensor         # [max keys of any sub-chunk] 0, 1, 2, ... (sliced by sub-chunks' masks)
    planned_bytes: int | None     # upper bound of the step's attention temporaries (None: no budget)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              block_size: int, sliding_window: int | None, device: torch.device,
              workspace_bytes: int | None = None, shape: AttentionShape | None = None) -> AttentionMetadata:
        """seq_lens[b] counts the sequence's tokens including this step's query_lens[b] new ones.

        With `workspace_bytes` (and the model's `shape`), groups are sized so that the step's
        attention temporaries stay under it; a row that cannot fit even alone raises ValueError.
        Without it the plan is one group of decode rows and each multi-query row whole.
        """
        bs = block_size
        if workspace_bytes is not None and shape is None:
            raise ValueError("an attention workspace budget needs the model's AttentionShape")
        cost = _Cost(shape, workspace_bytes) if workspace_bytes is not None else None
        starts, slots, t = [], [], 0
        for q, s, table in zip(query_lens, seq_lens, block_tables):
            starts.append(t)
            t += q
            slots += _slots(table, s - q, s, bs)
        windowed = sliding_window is not None and max(seq_lens) > sliding_window
        decode = [b for b, q in enumerate(query_lens) if q == 1]
        multi = [b for b, q in enumerate(query_lens) if q > 1]
        limit = None
        if cost is not None:
            # What the plan holds for the whole step is bounded before grouping, so that every
            # group can then take the rest: resident + largest group <= budget.
            n_plans = 2 if windowed else 1
            resident = t * cost.out_per_token + _INDEX_BYTES * (
                t + sum(-(-seq_lens[b] // bs) + query_lens[b] * n_plans for b in multi)
                + max((-(-seq_lens[b] // bs) * bs for b in multi), default=0))
            for window in (None, sliding_window) if windowed else (None,):
                n_max = max((_span(seq_lens[b], window, bs)[1] for b in decode), default=0)
                resident += len(decode) * (n_max * (_INDEX_BYTES + bs) + _INDEX_BYTES)
            limit = cost.budget - resident
            if limit <= 0:
                raise ValueError(f"attention workspace budget of {_mib(cost.budget)} cannot hold this "
                                 f"step's {t} tokens ({_mib(resident)} of indices and outputs)")
        to = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        # Multi-query rows' blocks, on the device once: both plans' sub-chunks slice views of them.
        row_tables = {b: to(torch.tensor(block_tables[b][:-(-seq_lens[b] // bs)], dtype=torch.long))
                      for b in multi}
        plans, max_keys, peak = [], 0, 0
        for window in (None, sliding_window) if windowed else (None,):
            rows, row_peak = _plan_rows(decode, starts, seq_lens, block_tables, window, bs, cost, limit,
                                        in_order=len(decode) == len(query_lens))
            chunks = []
            for b in multi:
                got, keys, chunk_peak = _plan_chunks(starts[b], query_lens[b], seq_lens[b], row_tables[b],
                                                     window, bs, cost, limit)
                chunks += got
                max_keys, row_peak = max(max_keys, keys), max(row_peak, chunk_peak)
            plans.append(_Plan(window, [_Rows(None if r.tokens is None else to(r.tokens), to(r.blocks),
                                              to(r.mask)) for r in rows], chunks))
            peak = max(peak, row_peak)
        return cls(slot_mapping=to(torch.tensor(slots, dtype=torch.long)), global_plan=plans[0],
                   sliding_plan=plans[-1], key_pos=torch.arange(max_keys, device=device),
                   planned_bytes=None if cost is None else cost.budget - limit + peak)


class _Cost:
    """Bytes of a group's temporaries, from the head shape (see the constants above)."""

    def __init__(self, shape: AttentionShape, budget: int):
        if budget <= 0:
            raise ValueError(f"attention workspace budget must be positive, got {budget} bytes")
        e = torch.empty(0, dtype=shape.dtype).element_size()
        h, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.budget = budget
        self.kv_per_key = 2 * kvh * d * e                               # gathered K and V
        self.per_query = 3 * h * d * e                                  # query in GQA layout, output, reordered
        self.scores_per_key = h * _SCORE_BYTES                          # one query's scores over one key
        self.mask_per_key = (h // kvh) * _CHUNK_MASK_BYTES              # its G rows of a sub-chunk's mask
        self.out_per_token = h * d * e                                  # the layer's output buffer

    def rows(self, n_keys: int) -> int:
        """One single-query row over n_keys keys (a group of R rows costs R times this)."""
        return n_keys * (self.kv_per_key + self.scores_per_key + _ROW_MASK_TEMP_BYTES) + self.per_query

    def chunk(self, n_queries: int, n_keys: int) -> int:
        """A sub-chunk of n_queries consecutive queries over n_keys keys."""
        per_query = n_keys * (self.scores_per_key + self.mask_per_key) + self.per_query
        return n_keys * self.kv_per_key + n_queries * per_query


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _too_big(budget: int, need: int, n_keys: int) -> ValueError:
    return ValueError(f"attention workspace budget of {_mib(budget)} cannot hold one query over "
                      f"{n_keys} keys ({_mib(need)} needed); raise attention_workspace_gb")


def _slots(table: list[int], start: int, stop: int, bs: int) -> list[int]:
    """Cache slots of positions [start, stop), one block run at a time."""
    out: list[int] = []
    for blk in range(start // bs, (stop - 1) // bs + 1):
        base = blk * bs
        out += range(table[blk] * bs + max(start - base, 0), table[blk] * bs + min(stop - base, bs))
    return out


def _span(seq_len: int, window: int | None, bs: int) -> tuple[int, int]:
    """(first block, number of blocks) a single query at position seq_len - 1 can see."""
    first = 0 if window is None else max(seq_len - window, 0) // bs
    return first, (seq_len - 1) // bs - first + 1


def _plan_rows(decode: list[int], starts: list[int], seq_lens: list[int], tables: list[list[int]],
               window: int | None, bs: int, cost: _Cost | None, limit: int | None,
               in_order: bool) -> tuple[list[_Rows], int]:
    """Groups of single-query rows, and the largest group's temporaries in bytes."""
    if not decode:
        return [], 0
    spans = [_span(seq_lens[b], window, bs) for b in decode]
    n_max = max(n for _, n in spans)
    if cost is None or len(decode) * cost.rows(n_max * bs) <= limit:
        groups = [list(range(len(decode)))]     # the common case: one group, in step order
    else:
        # Sorted by span, so each group pads its rows to a similar length.
        groups, cur = [], []
        for i in sorted(range(len(decode)), key=lambda i: spans[i][1]):
            need = cost.rows(spans[i][1] * bs)
            if need > limit:
                raise _too_big(cost.budget, need, spans[i][1] * bs)
            if cur and (len(cur) + 1) * need > limit:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        in_order = False
    out, peak = [], 0
    for g in groups:
        n = max(spans[i][1] for i in g)
        blocks = [tables[decode[i]][spans[i][0]:spans[i][0] + spans[i][1]] + [0] * (n - spans[i][1]) for i in g]
        first = torch.tensor([spans[i][0] * bs for i in g])[:, None]              # [R, 1]
        seq = torch.tensor([seq_lens[decode[i]] for i in g])[:, None]             # [R, 1]
        pos = first + torch.arange(n * bs)[None, :]                                # [R, n * bs] key positions
        mask = pos < seq                                   # pads past the row's own keys are "future"
        if window is not None:
            mask &= pos >= seq - window
        tokens = None if in_order else torch.tensor([starts[decode[i]] for i in g], dtype=torch.long)
        out.append(_Rows(tokens, torch.tensor(blocks, dtype=torch.long).flatten(), mask[:, None, None, :]))
        if cost is not None:
            peak = max(peak, len(g) * cost.rows(n * bs))
    return out, peak


def _plan_chunks(start: int, q_len: int, seq_len: int, table: torch.Tensor, window: int | None, bs: int,
                 cost: _Cost | None, limit: int | None) -> tuple[list[_Chunk], int, int]:
    """Query sub-chunks of one multi-query row: (chunks, most keys one gathers, largest temporaries)."""
    p0 = seq_len - q_len
    n_all = -(-seq_len // bs)

    def keys(qc: int) -> int:   # most keys a sub-chunk of qc queries gathers (whole blocks)
        return bs * (n_all if window is None else min(n_all, -(-(qc + window - 1) // bs) + 1))

    qc = q_len if window is None else min(q_len, max(window, _SLIDING_CHUNK_MIN))
    if cost is not None:
        if cost.chunk(1, keys(1)) > limit:
            raise _too_big(cost.budget, cost.chunk(1, keys(1)), keys(1))
        lo, hi = 1, qc
        while lo < hi:      # the largest sub-chunk that fits; the cost grows with qc
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost.chunk(mid, keys(mid)) <= limit else (lo, mid - 1)
        qc = lo
    chunks, most, peak = [], 0, 0
    for a in range(0, q_len, qc):
        b = min(a + qc, q_len)
        first = 0 if window is None else max(p0 + a - window + 1, 0) // bs
        last = (p0 + b - 1) // bs
        chunks.append(_Chunk(start + a, start + b, table[first:last + 1],
                             torch.arange(p0 + a - first * bs, p0 + b - first * bs, device=table.device)))
        most = max(most, (last - first + 1) * bs)
        if cost is not None:
            peak = max(peak, cost.chunk(b - a, (last - first + 1) * bs))
    return chunks, most, peak


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, sliding: bool, softcap: float | None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's new tokens). Returns [T, H * D]."""
    T, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    bs = k_cache.shape[1]
    k_flat = k_cache.view(-1, KVH, D)
    v_flat = v_cache.view(-1, KVH, D)
    k_flat.index_copy_(0, meta.slot_mapping, k.to(k_flat.dtype))
    v_flat.index_copy_(0, meta.slot_mapping, v.to(v_flat.dtype))
    plan = meta.sliding_plan if sliding else meta.global_plan
    if len(plan.rows) == 1 and plan.rows[0].tokens is None:    # decode-only step in one group
        return _attend_rows(q, k_cache, v_cache, plan.rows[0], bs, scale, softcap)
    out = q.new_empty(T, H * D)
    for rows in plan.rows:
        out.index_copy_(0, rows.tokens, _attend_rows(q.index_select(0, rows.tokens), k_cache, v_cache,
                                                     rows, bs, scale, softcap))
    for c in plan.chunks:
        n, L = c.stop - c.start, c.blocks.shape[0] * bs
        # Grouped-query layout: each KV head serves its G query heads as G*n rows, so K/V are not copied G times.
        qg = q[c.start:c.stop].view(n, KVH, G, D).permute(1, 2, 0, 3).reshape(1, KVH, G * n, D)
        # Gather whole blocks (contiguous runs), not single slots: far fewer, larger copies.
        keys = k_cache.index_select(0, c.blocks).view(1, L, KVH, D).permute(0, 2, 1, 3).to(q.dtype)  # [1, KVH, L, D]
        values = v_cache.index_select(0, c.blocks).view(1, L, KVH, D).permute(0, 2, 1, 3).to(q.dtype)
        # The mask is made here, one sub-chunk at a time, from positions the plan keeps: kept for the
        # whole step, masks would grow as chunk x context, and the G-fold needs a copy per layer anyway.
        q_pos = c.q_rel.repeat(G)[:, None]                              # [G*n, 1]
        k_pos = meta.key_pos[:L]                                        # [L]
        mask = k_pos <= q_pos                                           # [G*n, L] causal
        if plan.window is not None:
            mask &= k_pos > q_pos - plan.window
        o = _attend(qg, keys, values, mask, scale, softcap)             # [1, KVH, G*n, D]
        out[c.start:c.stop] = o.view(KVH, G, n, D).permute(2, 0, 1, 3).reshape(n, H * D)
    return out                                                          # [T, H*D], flat order kept


def _attend_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: _Rows, bs: int,
                 scale: float, softcap: float | None) -> torch.Tensor:
    """q: [R, H, D], one query per row. Returns [R, H * D]."""
    R, H, D = q.shape
    KVH = k_cache.shape[2]
    L = rows.mask.shape[-1]
    if kernel_applies(q, k_cache):    # reads keys in place: no gather, no SDPA mask
        return decode_attention(q, k_cache, v_cache, rows.blocks, rows.mask.view(R, L), scale, softcap)
    keys = k_cache.index_select(0, rows.blocks).view(R, L, KVH, D).permute(0, 2, 1, 3).to(q.dtype)  # [R, KVH, L, D]
    values = v_cache.index_select(0, rows.blocks).view(R, L, KVH, D).permute(0, 2, 1, 3).to(q.dtype)
    out = _attend(q.view(R, KVH, H // KVH, D), keys, values, rows.mask, scale, softcap)  # [R, KVH, G, D]
    return out.reshape(R, H * D)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            scale: float, softcap: float | None) -> torch.Tensor:
    """q: [N, KVH, M, D]; keys, values: [N, KVH, L, D]; mask broadcasts to [N, KVH, M, L]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    # In place, the same operations in the same order as tanh(s * scale / cap) * cap: one buffer.
    scores = torch.matmul(q, keys.transpose(-1, -2))
    scores.mul_(scale).div_(softcap).tanh_().mul_(softcap).masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    del scores
    return torch.matmul(probs, values)
