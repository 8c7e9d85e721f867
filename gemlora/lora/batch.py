"""LoRABatch: one step's adapter layout, built once and shared by every projection, and the
grouped low-rank delta each projection adds on top of its base GEMM. Semantics, for every token t
with slot s(t) and scale c(t):

    y[t] += (c(t) * (x[t] @ A[s(t)].T)) @ B[s(t)]

In float32 on the CPU, the C++ kernel (gemlora.kernels.lora) computes it segmented by adapter, each
segment at its own adapter's rank; the decode stack calls the same kernel. Elsewhere (GPUs, other
dtypes) tokens are grouped by adapter slot (a stable sort), each group padded to the longest, so that
one batched matmul per projection computes every adapter's shrink and one its expand, at the largest
rank present in the step rather than the slots' maximum. Tokens without an adapter take no part.
The base weights are never merged, and no forward pass is repeated per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemlora.kernels.lora import kernel_applies, lora_delta_
from gemlora.lora.slots import LoRASlots


@dataclass(slots=True)
class LoRABatch:
    slots: LoRASlots
    active: torch.Tensor        # [S] slot indices present in the step
    token_index: torch.Tensor   # [S, L] token of each group position (pads -> 0)
    token_scale: torch.Tensor   # [S, L, 1] per-request scale, 0 on pads
    rank: int                   # largest rank among the active slots
    active_set: frozenset[int]
    slot_range: tuple[int, int] | None   # (first, count) when the active slots are consecutive: no gather
    dense: bool                 # one adapter for every token, in order: no token gather or scatter
    row_slot: torch.Tensor      # [T] int64 on the CPU: each token's slot, -1 for none (the kernel's layout)
    row_scale: torch.Tensor     # [T] float32 on the CPU
    slot_rank: torch.Tensor     # [max_loras] int64 on the CPU: each slot's rank, 0 when empty

    @classmethod
    def build(cls, token_slots: list[int], token_scales: list[float], slots: LoRASlots,
              device: torch.device) -> LoRABatch | None:
        """token_slots[t]: slot of token t or -1; None when no token uses an adapter."""
        groups: dict[int, list[int]] = {}
        for t, s in enumerate(token_slots):
            if s >= 0:
                groups.setdefault(s, []).append(t)
        if not groups:
            return None
        active = sorted(groups)
        width = max(len(g) for g in groups.values())
        index = torch.zeros(len(active), width, dtype=torch.long)
        scale = torch.zeros(len(active), width, 1)
        for i, s in enumerate(active):
            g = groups[s]
            index[i, :len(g)] = torch.tensor(g)
            scale[i, :len(g), 0] = torch.tensor([token_scales[t] for t in g])
        rank = max(slots.rank[s] for s in active)
        consecutive = active == list(range(active[0], active[0] + len(active)))
        dense = len(active) == 1 and groups[active[0]] == list(range(len(token_slots)))
        to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return cls(slots, to(torch.tensor(active)), to(index), to(scale), rank, frozenset(active),
                   (active[0], len(active)) if consecutive else None, dense,
                   torch.tensor(token_slots, dtype=torch.long), torch.tensor(token_scales, dtype=torch.float32),
                   torch.tensor(slots.rank, dtype=torch.long))

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, key: str) -> torch.Tensor:
        """y: [T, out] base output of module `key` for input x: [T, in]. Adds the LoRA delta in place."""
        parts_used = [i for i, filled in enumerate(self.slots.filled.get(key, ())) if filled & self.active_set]
        if not parts_used:      # no adapter in this step patches this module
            return y
        if kernel_applies(x, self.slots.A[key]) and y.dtype == torch.float32:
            return lora_delta_(y, x, self.slots.A[key], self.slots.B[key], self.row_slot, self.row_scale,
                               self.slot_rank, self.slots.patched[key], self.slots.part_offsets[key])
        S, L = self.token_index.shape
        R = self.rank
        if self.slot_range is not None:
            A = self.slots.A[key].narrow(0, *self.slot_range)
            B = self.slots.B[key].narrow(0, *self.slot_range)
        else:
            A = self.slots.A[key].index_select(0, self.active)
            B = self.slots.B[key].index_select(0, self.active)
        A, B = A[:, :, :R], B[:, :R]                                           # [S, parts, R, in], [S, R, out]
        parts = A.shape[1]
        xg = x.unsqueeze(0) if self.dense else x[self.token_index]            # [S, L, in]
        # One shrink for every part at once: [S, L, parts*R], scaled per request.
        z = torch.bmm(xg, A.reshape(S, parts * R, -1).transpose(1, 2).to(x.dtype)) * self.token_scale.to(x.dtype)
        offsets = self.slots.part_offsets[key]
        flat = self.token_index.flatten()
        for i in parts_used:                                                  # expand part by part
            lo, hi = offsets[i], offsets[i + 1]
            delta = torch.bmm(z[:, :, i * R:(i + 1) * R], B[:, :, lo:hi].to(x.dtype))
            if self.dense:
                y[:, lo:hi] += delta[0]
            else:
                y[:, lo:hi].index_add_(0, flat, delta.view(S * L, hi - lo))
        return y
