"""Decode attention, one query per row over the paged KV cache: the C++ CPU kernel
(cpu/attention.cpp) and its plain-torch reference.

    out[r, h] = softmax_j(cap(q[r, h] . k_j * scale))  v_j    over the keys j of row r's blocks its mask keeps

`kernel_applies` says when the kernel serves (float32 on the CPU, extension built); elsewhere the
model's own SDPA path runs. Knows the cache layout `[blocks, block_size, kv_heads, head_dim]`;
nothing of models, requests or how masks are planned.
"""

from __future__ import annotations

import torch

from gemlora.kernels.build import extension


def kernel_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and k_cache.is_contiguous() and not q.requires_grad and extension() is not None)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                     mask: torch.Tensor, scale: float, softcap: float | None, isa: str = "auto") -> torch.Tensor:
    """q [R, H, D]; blocks [R * n] (row-major, each row's n blocks); mask [R, n * block_size] bool.
    Returns [R, H * D]. Needs `kernel_applies`. `isa`: auto (the widest this CPU runs), avx512, avx2
    or scalar (the tests run each)."""
    return extension().decode_attention(q, k_cache, v_cache, blocks, mask, scale, softcap or 0.0, isa)


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                               mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The same in float64, gathering each row's keys and repeating KV heads for their query heads."""
    R, H, D = q.shape
    KVH, L = k_cache.shape[2], mask.shape[-1]
    keys = k_cache.index_select(0, blocks).view(R, L, KVH, D).double().repeat_interleave(H // KVH, dim=2)
    values = v_cache.index_select(0, blocks).view(R, L, KVH, D).double().repeat_interleave(H // KVH, dim=2)
    scores = torch.einsum("rhd,rlhd->rhl", q.double(), keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~mask.view(R, 1, L), float("-inf")).softmax(-1)
    return torch.einsum("rhl,rlhd->rhd", probs, values).reshape(R, H * D).to(q.dtype)
