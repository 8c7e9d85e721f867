"""Top-k of logits rows: the C++ CPU kernels (cpu/top_k.cpp) and their plain-torch references.

    top_k_ids(x [M, N] float32, k) -> int64 [M, k]: each row's k largest values' indices, unordered
    place_top(x, ids [M, k], values [M, k]): in place, x[m, ids[m]] = values[m] and every other entry
        of row m lowered to just below min(values[m]), so those k are the row's top k

The kernels take float32 CPU rows where the extension is built; everything else (other dtypes or
devices, no kernels) takes the references. Ties at the k-th value may be broken either way by
either. Knows tensors only.
"""

from __future__ import annotations

import torch

from gemlora.kernels.build import extension


def reference_top_k_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x, k, dim=-1, sorted=False).indices


def top_k_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2:
        ext = extension()
        if ext is not None:
            return ext.top_k_ids(x, k)
    return reference_top_k_ids(x, k)


def reference_place_top(x: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    lowest = values.amin(-1, keepdim=True)
    torch.minimum(x, torch.nextafter(lowest, torch.full_like(lowest, -torch.inf)), out=x)
    return x.scatter_(1, ids, values)


def place_top(x: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and values.dtype == torch.float32:
        ext = extension()
        if ext is not None:
            ext.place_top(x, ids.contiguous(), values.contiguous())
            return x
    return reference_place_top(x, ids, values)
