"""GGUF block types -> QuantizedTensor, without loss: dequantizing the result equals gguf-py's
`dequantize` of the same blocks exactly (tests/test_quant_gguf.py checks every type).

| GGUF | codes | group | scale (exact in) | offset / bias |
|---|---|---|---|---|
| Q4_0 | 4-bit | 32 | fp16 d | offset 8 |
| Q4_1 | 4-bit | 32 | fp16 d | bias m |
| Q5_0 | 8-bit (q + 112) | 32 | fp16 d | offset 128 |
| Q5_1 | 8-bit (q + 128) | 32 | fp16 d | offset 128, bias m |
| Q8_0 | 8-bit (q + 128) | 32 | fp16 d | offset 128 |
| Q2_K | 4-bit | 16 | fp32 d*sc | bias -dmin*m |
| Q3_K | 4-bit (q + 4) | 16 | fp32 d*(sc - 32) | offset 4 |
| Q4_K | 4-bit | 32 | fp32 d*sc | bias -dmin*m |
| Q5_K | 8-bit (q + 128) | 32 | fp32 d*sc | offset 128, bias -dmin*m |
| Q6_K | 8-bit (q + 96) | 16 | fp32 d*sc | offset 128 |

8-bit codes are centred on 128 so that tensors of different 8-bit types share one format (a packed
q|k|v whose parts are Q5_0 and Q8_0 stacks into one matrix). The bit unpacking mirrors gguf-py's
own `dequantize_blocks`, stopping short of the float multiply. Pure numpy on one tensor at a time:
the transient is a few copies of that tensor's codes. F32 / F16 / BF16 are not quantized types and
stay dense (gemlora.model.gguf_load keeps their dtype). Knows GGUF block layouts and the format;
nothing of files, models or devices.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from gemlora.quant.tensor import QuantizedTensor

QK_K = 256
SUPPORTED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


class UnsupportedGGUFType(ValueError):
    pass


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).reshape(a.shape[0], -1)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes of a 32-block (elements 0-15 low nibbles, 16-31 high) -> [n, 32] codes."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and mins (gguf-py's Q4_K.get_scale_min)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


# per type: (bits, group, scale dtype, has bias, offset) of the QuantizedTensor `unpack` makes
LAYOUT = {
    T.Q4_0: (4, 32, torch.float16, False, 8), T.Q4_1: (4, 32, torch.float16, True, 0),
    T.Q5_0: (8, 32, torch.float16, False, 128), T.Q5_1: (8, 32, torch.float16, True, 128),
    T.Q8_0: (8, 32, torch.float16, False, 128), T.Q2_K: (4, 16, torch.float32, True, 0),
    T.Q3_K: (4, 16, torch.float32, False, 4), T.Q4_K: (4, 32, torch.float32, True, 0),
    T.Q5_K: (8, 32, torch.float32, True, 128), T.Q6_K: (8, 16, torch.float32, False, 128),
}


def row_bytes(qtype: T, cols: int) -> int:
    """Bytes one row of `cols` weights takes in the GGUF file."""
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"a {qtype.name} row of {cols} weights is not a whole number of {block}-blocks")
    return cols // block * size


def _blocks(data: np.ndarray, qtype: T) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, size)


def unpack(data: np.ndarray, qtype: T, rows: int, cols: int) -> QuantizedTensor:
    """`data`: the tensor's raw GGUF bytes (any shape, row-major). Returns the [rows, cols] weight."""
    if qtype not in SUPPORTED:
        raise UnsupportedGGUFType(f"GGUF type {qtype.name} is not supported for quantized weights "
                                  f"(supported: {', '.join(t.name for t in SUPPORTED)}, F32, F16, BF16)")
    b = _blocks(data, qtype)
    nb = b.shape[0]
    f32 = np.float32
    if qtype in (T.Q4_0, T.Q4_1):
        d = _f16(b[:, 0:2])
        if qtype == T.Q4_0:
            q, scale, bias, offset, bits, group = _nibbles_32(b[:, 2:18]), d, None, 8, 4, 32
        else:
            q, scale, bias, offset, bits, group = _nibbles_32(b[:, 4:20]), d, _f16(b[:, 2:4]), 0, 4, 32
    elif qtype in (T.Q5_0, T.Q5_1):
        d = _f16(b[:, 0:2])
        head = 2 if qtype == T.Q5_0 else 4
        qh = np.ascontiguousarray(b[:, head:head + 4]).view(np.uint32).reshape(nb, 1)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q5 = _nibbles_32(b[:, head + 4:head + 20]) | (high << 4)                 # 0..31
        if qtype == T.Q5_0:
            q, scale, bias, offset, bits, group = q5 + np.uint8(112), d, None, 128, 8, 32
        else:
            q, scale, bias, offset, bits, group = q5 + np.uint8(128), d, _f16(b[:, 2:4]), 128, 8, 32
    elif qtype == T.Q8_0:
        d = _f16(b[:, 0:2])
        q = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        scale, bias, offset, bits, group = d, None, 128, 8, 32
    elif qtype == T.Q2_K:
        scales, qs = b[:, 0:16], b[:, 16:80]
        d, dmin = _f16(b[:, 80:82]).astype(f32), _f16(b[:, 82:84]).astype(f32)
        scale = d * (scales & 0xF).astype(f32)                                   # [nb, 16]
        bias = -(dmin * (scales >> 4).astype(f32))
        q = ((qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(nb, QK_K)
        offset, bits, group = 0, 4, 16
    elif qtype == T.Q3_K:
        hmask, qs, sc_bytes = b[:, 0:32], b[:, 32:96], b[:, 96:108]
        d = _f16(b[:, 108:110]).astype(f32)
        lo = (sc_bytes[:, 0:8].reshape(nb, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(nb, 16)
        hi = (sc_bytes[:, 8:12].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(nb, 16)
        sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).astype(np.int8) - np.int8(32)
        scale, bias = d * sc.astype(f32), None
        ql = (qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(nb, QK_K) & 3
        qh = (hmask.reshape(nb, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).reshape(nb, QK_K) & 1
        q = ql + (qh << 2)                               # value ql - 4 * (1 - h): code ql + 4h, offset 4
        offset, bits, group = 4, 4, 16
    elif qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(b[:, 0:2]).astype(f32), _f16(b[:, 2:4]).astype(f32)
        sc, mn = _k_scale_min(b[:, 4:16])
        scale, bias = d * sc.astype(f32), -(dmin * mn.astype(f32))               # [nb, 8]
        qs = b[:, 16:144] if qtype == T.Q4_K else b[:, 48:176]
        ql = (qs.reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)).reshape(nb, QK_K) & 0x0F
        if qtype == T.Q4_K:
            q, offset, bits = ql, 0, 4
        else:
            qh = b[:, 16:48]
            high = (qh.reshape(nb, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).reshape(nb, QK_K) & 1
            q, offset, bits = (ql | (high << 4)) + np.uint8(128), 128, 8
        group = 32
    else:  # Q6_K
        ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208].view(np.int8)
        d = _f16(b[:, 208:210]).astype(f32)
        scale, bias = d * sc.astype(f32), None                                     # [nb, 16]
        lo = ((ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(nb, 8, 32)
        hi = ((qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(nb, 8, 32)
        q = ((lo | (hi << 4)) + np.uint8(96)).reshape(nb, QK_K)                   # value q6 - 32
        offset, bits, group = 128, 8, 16
    codes = np.ascontiguousarray(q, dtype=np.uint8).reshape(rows, cols)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    groups = cols // group
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a).reshape(rows, groups))  # noqa: E731
    return QuantizedTensor(torch.from_numpy(np.ascontiguousarray(codes)), to_t(scale),
                           None if bias is None else to_t(bias.astype(scale.dtype)), bits, group, offset)
