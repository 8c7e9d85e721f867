"""QuantizedTensor: a weight matrix as integer codes with per-group scales, the one device-independent
format every quantized weight takes, whatever it came from (a GGUF block type, or round-to-nearest
quantization of a float checkpoint at load).

    w[n, k] = (q[n, k] - offset) * scale[n, k // group] + bias[n, k // group]

`q` is 4 or 8 bits, unsigned (4-bit codes two to a byte: element 2j in the low nibble of byte j,
2j + 1 in the high one). `group` is 16 or 32 along the input dimension. Scales and biases are fp16
where the source's are (Q4_0, Q8_0, ...: exact), fp32 where only fp32 holds them exactly (K-quants,
whose group scale is an fp16 times a 6-bit integer). `dequantize` is the reference every kernel is
tested against; its rounding, fl(fl(q - offset) * s) + b in fp32, is the one gguf-py uses.

Owns the format, its (de)serialization to flat tensors for the conversion cache, and joining the
packed parts of a projection. Knows nothing of devices' packed layouts (gemlora.kernels), GGUF files
(gemlora.quant.gguf) or the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedTensor:
    codes: torch.Tensor            # uint8 [rows, cols] (8 bits) or [rows, cols // 2] (4 bits)
    scales: torch.Tensor           # fp16 / fp32 [rows, cols // group]
    bias: torch.Tensor | None      # like scales, or None (= 0)
    bits: int
    group: int
    offset: int

    def __post_init__(self) -> None:
        rows = self.codes.shape[0]
        if self.bits not in (4, 8) or self.group not in (16, 32):
            raise ValueError(f"unsupported format: {self.bits} bits, group {self.group}")
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise ValueError("codes must be a 2-D uint8 tensor")
        if self.scales.dtype not in (torch.float16, torch.float32) or self.scales.shape != (rows, self.cols // self.group):
            raise ValueError(f"scales must be fp16/fp32 [{rows}, {self.cols // self.group}], got "
                             f"{self.scales.dtype} {tuple(self.scales.shape)}")
        if self.bias is not None and (self.bias.dtype != self.scales.dtype or self.bias.shape != self.scales.shape):
            raise ValueError("bias must match the scales' dtype and shape")
        if not 0 <= self.offset < 2 ** self.bits:
            raise ValueError(f"offset {self.offset} out of range for {self.bits}-bit codes")

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        extra = self.bias.nbytes if self.bias is not None else 0
        return self.codes.nbytes + self.scales.nbytes + extra

    def format_key(self) -> tuple:
        """Tensors with the same key can be stacked row-wise into one."""
        return self.bits, self.group, self.offset, self.scales.dtype, self.bias is not None, self.cols

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 [rows, cols], one code per element."""
        if self.bits == 8:
            return self.codes
        out = torch.empty(self.rows, self.cols, dtype=torch.uint8, device=self.codes.device)
        out[:, 0::2] = self.codes & 0x0F
        out[:, 1::2] = self.codes >> 4
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: [rows, cols] in `dtype`, computed in fp32 as fl(fl(q - offset) * s) + b."""
        q = self.unpacked_codes().to(torch.float32) - float(self.offset)
        s = self.scales.to(torch.float32).repeat_interleave(self.group, dim=1)
        w = q * s
        if self.bias is not None:
            w = w + self.bias.to(torch.float32).repeat_interleave(self.group, dim=1)
        return w.to(dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(move(self.codes), move(self.scales), move(self.bias), self.bits, self.group, self.offset)

    # ---- cache (de)serialization: flat tensors plus a small JSON header ----------------------------

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{prefix}.codes": self.codes.contiguous(), f"{prefix}.scales": self.scales.contiguous()}
        if self.bias is not None:
            tensors[f"{prefix}.bias"] = self.bias.contiguous()
        return tensors, {"bits": self.bits, "group": self.group, "offset": self.offset}

    @classmethod
    def from_state(cls, tensors, prefix: str, meta: dict) -> QuantizedTensor:
        bias = tensors.get(f"{prefix}.bias") if hasattr(tensors, "get") else None
        return cls(tensors[f"{prefix}.codes"], tensors[f"{prefix}.scales"], bias, int(meta["bits"]),
                   int(meta["group"]), int(meta["offset"]))


def stack_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Parts of one format, their rows concatenated (q | k | v into qkv)."""
    key = parts[0].format_key()
    if any(p.format_key() != key for p in parts):
        raise ValueError("parts of different formats cannot be stacked")
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), bias,
                           parts[0].bits, parts[0].group, parts[0].offset)


def encode_header(formats: dict[str, dict]) -> str:
    return json.dumps(formats, sort_keys=True, separators=(",", ":"))
