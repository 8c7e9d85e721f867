"""The LoRA delta of one projection for a step with mixed adapters: the C++ CPU kernel (cpu/lora.cpp),
segmented by adapter with each segment at its own rank, and its plain-torch reference.

    for every row t with slot s = row_slot[t] >= 0 and rank r = slot_rank[s], and every part p
    (q|k|v, gate|up; output columns lo_p:hi_p) that slot s patches:
        y[t, lo_p:hi_p] += (row_scale[t] * (A[s, p, :r] @ x[t])) @ B[s, :r, lo_p:hi_p]

A is [slots, parts, max_rank, in] and B [slots, max_rank, out] (gemlora.lora.slots.LoRASlots).
`lora_delta_` takes the kernel for float32 on the CPU when it is built, else the reference. Knows
tensors only: nothing of adapters, requests or the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gemlora.kernels.build import extension


def kernel_applies(x: torch.Tensor, A: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and A.dtype == torch.float32
            and not x.requires_grad and extension() is not None)


def reference_lora_delta_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          row_slot: torch.Tensor, row_scale: torch.Tensor, slot_rank: torch.Tensor,
                          patched: torch.Tensor, part_offsets: Sequence[int]) -> torch.Tensor:
    """Row by row, part by part: the definition, in y's dtype."""
    for t, s in enumerate(row_slot.tolist()):
        if s < 0:
            continue
        r = int(slot_rank[s])
        for p in range(A.shape[1]):
            if r == 0 or not bool(patched[s, p]):
                continue
            lo, hi = part_offsets[p], part_offsets[p + 1]
            z = (A[s, p, :r].to(y.dtype) @ x[t].to(y.dtype)) * float(row_scale[t])
            y[t, lo:hi] += z @ B[s, :r, lo:hi].to(y.dtype)
    return y


def lora_delta_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, row_slot: torch.Tensor,
                row_scale: torch.Tensor, slot_rank: torch.Tensor, patched: torch.Tensor,
                part_offsets: Sequence[int]) -> torch.Tensor:
    """Adds the deltas to y in place and returns it."""
    if kernel_applies(x, A) and y.dtype == torch.float32:
        extension().lora_delta_(y, x, A, B, row_slot, row_scale, slot_rank, patched, list(part_offsets))
        return y
    return reference_lora_delta_(y, x, A, B, row_slot, row_scale, slot_rank, patched, part_offsets)
