"""The paged KV cache tensors: per layer, K and V as `[num_blocks, block_size, kv_heads, head_dim]`.

Owns the sizing arithmetic (bytes per block, blocks that fit a memory budget) and the allocation.
Which block belongs to whom is the BlockManager's business; this module only holds the memory.
"""

from __future__ import annotations

import torch

from gemlora.kernels import hugepages
from gemlora.model.config import GemmaConfig


def block_bytes(cfg: GemmaConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def blocks_for_budget(cfg: GemmaConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return budget_bytes // block_bytes(cfg, block_size, dtype)


def allocate_kv_cache(cfg: GemmaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    # huge pages on the CPU: decode attention reads every row's blocks each step
    return [(hugepages.zeros(shape, dtype, device), hugepages.zeros(shape, dtype, device)) for _ in range(cfg.num_layers)]
