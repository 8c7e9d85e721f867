"""The quantized matmul: the C++ CPU kernels (cpu/qmatmul.cpp), their plain-torch reference, and the
packing of a device-independent QuantizedTensor into what each device's path reads.

- CPU: `pack` lays the codes out in 16-row tiles for the kernels (AVX-512 VNNI, AVX2 or scalar,
  chosen at run time by what the CPU has). The activations are quantized per block of 32 on every
  call, to int8 as llama.cpp does ("int8"), to int8 twice (the residual too: "int8x2") or to int16
  ("int16"); `default_activations` picks the exact-enough form that is cheapest on this CPU.
  `reference_matmul` quantizes the same way in plain torch, then dequantizes the weight and
  multiplies in float64, and is what the tests compare the kernels to.
- Anything else (CUDA, or a CPU where the extension cannot be built): the weight is kept in its
  canonical form and dequantized per call in the activation dtype, then multiplied by the vendor
  GEMM (cuBLAS). Correct everywhere, fast where the GEMM is.

The extension is built on first use (gemlora.kernels.build); with no compiler every weight takes
the dequantize path. Knows the format and the devices; nothing of models, layers or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemlora.kernels import hugepages
from gemlora.kernels.build import extension
from gemlora.quant.tensor import QuantizedTensor

TILE = 16          # weight rows per kernel tile
BLOCK = 32         # activation quantization block along K
ACTIVATIONS = ("int8", "int8x2", "int16")
_LEVELS = {"int8": (127.0, 1), "int8x2": (127.0, 2), "int16": (32767.0, 1)}   # (max code, passes)


def default_activations(bits: int, lm_head: bool = False) -> str:
    """The cheapest exact-enough form for a weight of `bits`-bit codes on this CPU. int8x2 and int16
    both keep Gemma's greedy tokens in the body; one int8 pass everywhere does not (its activations
    have outliers).

    - AVX-512 VNNI: int8x2 everywhere (dpbusd multiplies u8 x s8 at full rate). One int8 pass for the
      LM head measured 98.9% agreement and 32 x 64 tokens 10.8 -> 10.65 s, but moves the quantized
      prefix-cache tests' logits past their derived bounds (tests/test_prefix_cache.py), so not yet.
    - AVX2, the LM head: one int8 pass. Its 262k-row GEMM is half of a 32-row decode step, and int8
      runs 1.4x faster there than int16. Teacher-forced agreement with the float path on the
      embedded model (tests/test_quant_model.py's text, 364 tokens): int16 everywhere 100%, int16
      body + int8 head 99.2%, int8 everywhere (llama.cpp's choice) 97.0%.
    - AVX2 body, 8-bit codes: int16 (madd_epi16 on zero-extended codes: about the integer work of
      one int8 pass with the sign trick, 1.3-1.9x faster than int8x2 from 8 rows up).
    - AVX2 body, 4-bit codes: int8x2 (maddubs takes the nibbles as they are; int16 must widen them
      first, which makes a batch-1 GEMV compute-bound: 14.6 against 18.9 GB/s on a 7B Q4_0 MLP)."""
    ext = extension()
    if ext is not None and ext.cpu_isa() == "avx512_vnni":
        return "int8x2"
    if lm_head:
        return "int8"
    return "int16" if bits == 8 else "int8x2"


@dataclass(frozen=True)
class CPUPacked:
    """A QuantizedTensor in the CPU kernels' tile layout."""
    codes: torch.Tensor            # uint8, tiles x (cols / 32) x (512 or 256) bytes
    scales: torch.Tensor           # [tiles, cols / group, 16]
    bias: torch.Tensor | None
    rows: int
    cols: int
    bits: int
    group: int
    offset: int

    def matmul(self, x: torch.Tensor, activations: str = "int8x2", isa: str = "auto") -> torch.Tensor:
        """x [M, cols] -> [M, rows] float32, x quantized as `activations` (see qmatmul.cpp)."""
        return extension().qmatmul(x, self.codes, self.scales, self.bias, self.rows, self.cols, self.bits,
                                   self.group, self.offset, activations, isa)

    def matmul_rows(self, x: torch.Tensor, ids: torch.Tensor, activations: str = "int8x2") -> torch.Tensor:
        """y[m, j] = (x @ W^T)[m, ids[m, j]] for x [M, cols], ids [M, C]: computed as reference_matmul
        does (float64 sums), so equal to `matmul`'s entries to float32 rounding."""
        return extension().qmatmul_rows(x, ids, self.codes, self.scales, self.bias, self.rows, self.cols, self.bits,
                                        self.group, self.offset, activations)

    def take_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return extension().dequantize_rows(ids, self.codes, self.scales, self.bias, self.rows, self.cols, self.bits,
                                           self.group, self.offset)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + (self.bias.nbytes if self.bias is not None else 0)


def can_pack_for_cpu(qt: QuantizedTensor) -> bool:
    return qt.cols % BLOCK == 0 and qt.codes.device.type == "cpu"


def pack(qt: QuantizedTensor, tiles_per_chunk: int = 256) -> CPUPacked:
    """Canonical rows -> 16-row tiles of 4-wide k quads (see qmatmul.cpp), a chunk of tiles at a time,
    so the only transient is one chunk's unpacked codes, whatever the tensor's size; in huge-page
    memory (gemlora.kernels.hugepages). Needs the extension (a packed weight is only ever multiplied by it)."""
    if extension() is None:
        raise RuntimeError("the CPU kernels are not available here")
    if not can_pack_for_cpu(qt):
        raise ValueError(f"the CPU kernels need a CPU tensor with a multiple of {BLOCK} columns, got {qt.shape}")
    rows, cols = qt.shape
    tiles = -(-rows // TILE)
    block_bytes = 512 if qt.bits == 8 else 256
    codes = hugepages.empty((tiles, cols // BLOCK, block_bytes), torch.uint8)   # streamed every token
    for t0 in range(0, tiles, tiles_per_chunk):
        t1 = min(t0 + tiles_per_chunk, tiles)
        part = QuantizedTensor(qt.codes[t0 * TILE:t1 * TILE], qt.scales[t0 * TILE:t1 * TILE], None, qt.bits,
                               qt.group, qt.offset)
        q = part.unpacked_codes()
        if q.shape[0] < (t1 - t0) * TILE:                     # the last tile, padded with zero rows
            q = torch.cat([q, q.new_zeros((t1 - t0) * TILE - q.shape[0], cols)])
        # [tiles, 16 rows, cols/4 quads, 4] -> [tiles, cols/32 blocks, 8 quads, 16 rows, 4]
        q = q.view(t1 - t0, TILE, cols // BLOCK, 8, 4).permute(0, 2, 3, 1, 4)
        if qt.bits == 4:   # quads 2c and 2c+1 share a 64-byte chunk: low and high nibbles
            q = q.reshape(t1 - t0, cols // BLOCK, 4, 2, TILE * 4)
            q = q[:, :, :, 0] | (q[:, :, :, 1] << 4)
        codes[t0:t1] = q.reshape(t1 - t0, cols // BLOCK, block_bytes)

    def tiled(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        pad = tiles * TILE - rows
        if pad:
            t = torch.cat([t, t.new_zeros(pad, t.shape[1])])
        return hugepages.copy_of(t.view(tiles, TILE, -1).transpose(1, 2))  # [tiles, groups, 16]

    return CPUPacked(codes.view(-1), tiled(qt.scales), tiled(qt.bias), rows, cols, qt.bits, qt.group, qt.offset)


# ---- the reference ------------------------------------------------------------------------------

def reference_quantize_activations(x: torch.Tensor, activations: str = "int8x2") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (what the kernels multiply, float64 [M, K]; the last pass's step d [M, K/32]).
    Per block of 32 and pass: d = amax(rest) / L, q = round(rest * (1 / d)), rest -= q * d (fp32),
    L = 127 (int8) or 32767 (int16)."""
    levels, passes = _LEVELS[activations]
    M, K = x.shape
    rest = x.to(torch.float32).reshape(M, K // BLOCK, BLOCK).clone()
    total = torch.zeros_like(rest, dtype=torch.float64)
    for _ in range(passes):
        d = rest.abs().amax(dim=-1, keepdim=True) / levels
        q = torch.round(rest * torch.where(d > 0, 1.0 / d, torch.zeros_like(d)))
        total += q.double() * d.double()
        rest = rest - q * d
    return total.reshape(M, K), d.squeeze(-1)


def reference_matmul(x: torch.Tensor, qt: QuantizedTensor, activations: str = "int8x2",
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels' result, computed the plain way: quantized activations @ dequantized weight, float64.
    `weight`: qt.dequantize(torch.float64), if the caller has it already."""
    w = qt.dequantize(torch.float64) if weight is None else weight
    return reference_quantize_activations(x, activations)[0] @ w.T


def activation_error_bound(x: torch.Tensor, qt: QuantizedTensor, activations: str = "int8x2",
                           weight: torch.Tensor | None = None, abs_product: torch.Tensor | None = None) -> torch.Tensor:
    """|kernel - x @ W^T| may be at most this, elementwise [M, N]. The last pass rounds each activation
    to within half its block's step d (d = amax of what is left / 127 or 32767), so the activations are off by
    <= d / 2 (plus fp32 rounding of the residual, ~1e-7 amax), and the output by
    sum_blocks d_b / 2 * sum_{k in b} |w[n, k]|; the fp32 accumulation adds at most ~1e-5 of
    sum_k |x_k| |w[n, k]| for these lengths."""
    M, K = x.shape
    _, d = reference_quantize_activations(x, activations)                                  # [M, blocks]
    amax = x.double().abs().reshape(M, K // BLOCK, BLOCK).amax(-1)
    w = (qt.dequantize(torch.float64) if weight is None else weight).abs()               # [N, K]
    per_block = w.reshape(w.shape[0], K // BLOCK, BLOCK).sum(-1)                       # [N, blocks]
    if abs_product is None:
        abs_product = x.double().abs() @ w.T                                            # sum_k |x_k| |w[n, k]|
    return (d.double() / 2 + 1e-7 * amax) @ per_block.T + 1e-5 * abs_product + 1e-30


def rows_dot(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """rows [M, C, K] . x [M, K] -> float32 [M, C], summed in float64: a few chosen entries of a
    matmul, scored the plain way (what `matmul_rows` does for a packed weight)."""
    return torch.einsum("mck,mk->mc", rows.double(), x.double()).float()


# ---- the generic path ---------------------------------------------------------------------------

def dequantized_matmul(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Any device: dequantize to the activation dtype, then the vendor GEMM (a per-call transient)."""
    return F.linear(x, qt.dequantize(x.dtype))
