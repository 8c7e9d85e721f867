"""Round-to-nearest quantization of a float weight into a QuantizedTensor, per group of 32 inputs:
what `--quantization int8|int4` does to a float checkpoint at load.

- int8: symmetric, scale = amax / 127 (fp16), codes q + 128 with q in [-127, 127], offset 128.
- int4: asymmetric (min/max, as tinygemm and GGUF's Q4_1), scale = (max - min) / 15 and bias = min
  (fp16), codes in [0, 15]. The scale and bias are rounded to fp16 first and the codes chosen
  against the rounded values, so rounding them costs no extra error.

Knows the format and float tensors; nothing of files or models.
"""

from __future__ import annotations

import torch

from gemlora.quant.tensor import QuantizedTensor

GROUP = 32


def quantize(weight: torch.Tensor, bits: int, group: int = GROUP) -> QuantizedTensor:
    rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"{cols} columns are not a multiple of the group size {group}")
    w = weight.detach().to(torch.float32).reshape(rows, cols // group, group)
    if bits == 8:
        scale = (w.abs().amax(-1) / 127).to(torch.float16)
        s = scale.to(torch.float32).unsqueeze(-1)
        q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1)), 0).clamp(-127, 127) + 128
        return QuantizedTensor(q.to(torch.uint8).reshape(rows, cols), scale, None, 8, group, 128)
    if bits == 4:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).to(torch.float16)
        bias = lo.to(torch.float16)
        s, b = scale.to(torch.float32).unsqueeze(-1), bias.to(torch.float32).unsqueeze(-1)
        q = torch.where(s > 0, torch.round((w - b) / torch.where(s > 0, s, 1)), 0).clamp(0, 15).to(torch.uint8)
        q = q.reshape(rows, cols)
        return QuantizedTensor(q[:, 0::2] | (q[:, 1::2] << 4), scale, bias, 4, group, 0)
    raise ValueError(f"bits must be 4 or 8, got {bits}")
