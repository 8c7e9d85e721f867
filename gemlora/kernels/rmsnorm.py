"""RMSNorm: the C++ CPU kernel (cpu/rmsnorm.cpp) for float32 on the CPU, and its reference.

    y = x / sqrt(mean(x^2, last dim) + eps) * scale          (computed in float32)

`rms_norm` takes the kernel where it applies and torch's `F.rms_norm` (the reference) everywhere
else: other dtypes, other devices, or no compiled kernels. Knows tensors only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemlora.kernels.build import extension


def reference_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Float32 result, whatever x's dtype (the caller casts back)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad:
        ext = extension()
        if ext is not None:
            return ext.rms_norm(x, scale, eps)
    return reference_rms_norm(x, scale, eps)
