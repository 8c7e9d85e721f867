"""Building blocks of the Gemma decoder: RMSNorm, rotary embeddings, the base linear layer.

`Linear` is the one interface every projection goes through (the LoRA delta hooks in here, and
weight-only quantized formats can later), so the model file never calls `F.linear` itself. Everything
here works on flat `[num_tokens, ...]` tensors and knows nothing of requests or the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from gemlora.kernels.rmsnorm import rms_norm
from gemlora.kernels.rope import norm_rope
from gemlora.model.config import RopeSpec

if TYPE_CHECKING:
    from gemlora.lora.batch import LoRABatch


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + weight), as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self._scale: tuple[int, torch.Tensor] | None = None     # (weight version, 1 + weight in float32)

    def scale(self) -> torch.Tensor:
        """1 + weight in float32, computed once per weight version (2 of the ~10 ops of a decode norm)."""
        version = self.weight._version
        if self._scale is None or self._scale[0] != version or self._scale[1].device != self.weight.device:
            self._scale = (version, 1.0 + self.weight.detach().float())
        return self._scale[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale(), self.eps).type_as(x)


class Linear(nn.Module):
    """A bias-free projection `y = x @ W.T`, plus the step's LoRA deltas when a LoRA batch is given.

    `output_sizes` names the packed parts (q|k|v, gate|up); `lora_key` is this module's name in the
    adapter slots, set by the model that owns it. The weight is a dense parameter, or, once the
    loader calls `set_quantized`, any callable `x -> x @ W.T` (a quantized weight on its device):
    LoRA deltas add to its output the same way, so adapters stay dense over a quantized base.
    """

    def __init__(self, in_features: int, output_sizes: tuple[int, ...]):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), in_features))
        self.quantized: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.lora_key = ""

    def set_quantized(self, weight: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.quantized = weight
        self.weight = None          # no dense copy is kept

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight) if self.quantized is None else self.quantized(x)
        return y if lora is None else lora.add_delta(y, x, self.lora_key)


class Rotary:
    """cos/sin for the given positions, rotate-half convention, computed per step in float32."""

    def __init__(self, head_dim: int, spec: RopeSpec, device: torch.device):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        self.inv_freq = 1.0 / (spec.theta ** exponents) / spec.linear_factor

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]     # [T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]            # [T, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def norm_and_rotate(x: torch.Tensor, norm: RMSNorm | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, head_dim] after `norm` (Gemma 3's QK-norm) if given: one fused
    call on the CPU (gemlora.kernels.rope)."""
    if norm is None:
        return norm_rope(x, None, 0.0, cos, sin)
    return norm_rope(x, norm.scale(), norm.eps, cos, sin).type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
