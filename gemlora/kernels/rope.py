"""Rotary embedding (rotate-half), with an optional per-head RMSNorm before it (Gemma 3's QK-norm):
the C++ CPU kernel (cpu/rope.cpp) for float32 on the CPU, and its reference, `apply_rotary` after
`rms_norm`, which every other dtype and device runs. The two are equal exactly (the kernel rounds as
torch does). Knows tensors only.
"""

from __future__ import annotations

import torch

from gemlora.kernels.build import extension
from gemlora.kernels.rmsnorm import rms_norm


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def reference_norm_rope(x: torch.Tensor, scale: torch.Tensor | None, eps: float, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    if scale is not None:
        x = rms_norm(x, scale, eps).type_as(x)
    return apply_rotary(x, cos, sin)


def norm_rope(x: torch.Tensor, scale: torch.Tensor | None, eps: float, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary(rms_norm(x, scale, eps), cos, sin), the norm skipped when `scale` is None (float32 1 + w)."""
    if (x.dtype == torch.float32 and cos.dtype == torch.float32 and x.device.type == "cpu"
            and x.stride(-1) == 1 and not x.requires_grad):
        ext = extension()
        if ext is not None:
            return ext.norm_rope(x, scale, eps, cos, sin)
    return reference_norm_rope(x, scale, eps, cos, sin)
