"""LoRASlots: the adapter weights next to the model, in a fixed number of preallocated slots.

For every projection of every layer, one stack per packed module: A as
`[max_loras, n_parts, max_rank, in]` and B as `[max_loras, out, max_rank]`, where the parts are the
packed pieces (q|k|v, gate|up): part i's output rows of B pair with part i's rows of A. Smaller
ranks are zero-padded. Scaling is already folded into B by the adapter loader. Loading into a
slot is a copy of a few MB; no allocation in the step.
Knows shapes and slot indices; nothing of requests, names or files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gemlora.model.loader import PACKED_MODULES

if TYPE_CHECKING:
    from gemlora.lora.adapter import LoRAAdapter


class LoRASlots:
    def __init__(self, linears: dict[str, tuple[int, tuple[int, ...]]], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str):
        """linears: module key ("layers.3.self_attn.qkv_proj") -> (in_features, output_sizes)."""
        self.max_loras, self.max_rank = max_loras, max_rank
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.part_offsets: dict[str, tuple[int, ...]] = {}
        for key, (in_features, sizes) in linears.items():
            n = len(sizes)
            self.A[key] = torch.zeros(max_loras, n, max_rank, in_features, dtype=dtype, device=device)
            self.B[key] = torch.zeros(max_loras, sum(sizes), max_rank, dtype=dtype, device=device)
            self.part_offsets[key] = tuple(sum(sizes[:i]) for i in range(n + 1))
        self.rank = [0] * max_loras    # rank of the adapter in each slot (0 = empty)
        # per module and part, the slots holding weights there: parts nobody patches are skipped
        self.filled: dict[str, list[set[int]]] = {k: [set() for _ in range(len(v[1]))] for k, v in linears.items()}

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds the slots' max rank {self.max_rank}")
        self.clear(slot)
        for (layer, module), w in adapter.weights.items():
            key, part = _packed_key(layer, module)
            lo, hi = self.part_offsets[key][part], self.part_offsets[key][part + 1]
            r = w.A.shape[0]
            self.A[key][slot, part, :r].copy_(w.A)
            self.B[key][slot, lo:hi, :r].copy_(w.B)
            self.filled[key][part].add(slot)
        self.rank[slot] = adapter.rank

    def clear(self, slot: int) -> None:
        for key in self.A:
            self.A[key][slot].zero_()
            self.B[key][slot].zero_()
            for part in self.filled[key]:
                part.discard(slot)
        self.rank[slot] = 0


def _packed_key(layer: int, module: str) -> tuple[str, int]:
    block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    packed, part = PACKED_MODULES.get(module, (module, 0))
    return f"layers.{layer}.{block}.{packed}", part
