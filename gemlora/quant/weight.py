"""QuantWeight: a projection's quantized weight placed on its device, callable as `y = x @ W^T`.

A projection may be packed from parts (q | k | v, gate | up) that came in different formats (a
GGUF may store q as Q5_0 and v as Q8_0): parts of one format are stacked into one matrix, the
others run separately and their outputs are concatenated. On the CPU each matrix is repacked for
the C++ kernels (gemlora.kernels.qmatmul); elsewhere, or without the kernels, it stays canonical and
is dequantized per call. The same object serves a tied embedding table's row lookups.

Knows formats and devices; nothing of layer names, LoRA or files.
"""

from __future__ import annotations

import torch

from gemlora.kernels import qmatmul as kernels
from gemlora.quant.tensor import QuantizedTensor, stack_rows


class QuantWeight:
    def __init__(self, parts: list[QuantizedTensor], device: torch.device | str = "cpu", activations: str = "auto",
                 lm_head: bool = False):
        device = torch.device(device)
        if activations != "auto" and activations not in kernels.ACTIVATIONS:
            raise ValueError(f"activations must be auto or one of {', '.join(kernels.ACTIVATIONS)}, got {activations!r}")
        self.out_features = sum(p.rows for p in parts)
        self.in_features = parts[0].cols
        if any(p.cols != self.in_features for p in parts):
            raise ValueError("every part of a projection must have the same input size")
        runs: list[list[QuantizedTensor]] = []          # consecutive parts of one format
        for p in parts:
            if runs and runs[-1][0].format_key() == p.format_key():
                runs[-1].append(p)
            else:
                runs.append([p])
        use_kernels = device.type == "cpu" and kernels.extension() is not None
        self._matrices = []
        self.activations: list[str] = []     # how each matrix's kernel quantizes x (CPU kernels only)
        for run in runs:
            qt = stack_rows(run) if len(run) > 1 else run[0]
            if use_kernels and kernels.can_pack_for_cpu(qt):
                self._matrices.append(kernels.pack(qt))
            else:
                self._matrices.append(qt.to(device))
            self.activations.append(kernels.default_activations(qt.bits, lm_head) if activations == "auto"
                                    else activations)
        self.formats = [f"{p.bits}-bit/g{p.group}" for p in parts]
        self._packed = isinstance(self._matrices[0], kernels.CPUPacked)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._matrices)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] in the activation dtype -> [T, out] in the same dtype."""
        if len(self._matrices) == 1:       # the common case, kept short: it runs ~70 times per decode step
            m = self._matrices[0]
            y = m.matmul(x, self.activations[0]) if self._packed else kernels.dequantized_matmul(x, m)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        outs = [m.matmul(x, acts) if isinstance(m, kernels.CPUPacked)
                else kernels.dequantized_matmul(x, m) for m, acts in zip(self._matrices, self.activations)]
        return torch.cat(outs, dim=-1).to(x.dtype)

    def cpu_parts(self) -> list[tuple[kernels.CPUPacked, str]] | None:
        """(packed matrix, activation form) of each part, in output order; None unless all are packed."""
        if not all(isinstance(m, kernels.CPUPacked) for m in self._matrices):
            return None
        return list(zip(self._matrices, self.activations))

    def matmul_rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Entries ids [M, C] of each row of x @ W^T (float32 [M, C]), as the reference computes them
        (the activations quantized as __call__'s kernel quantizes them, float64 sums)."""
        if len(self._matrices) != 1:
            raise ValueError("row products need a single-part weight")
        m, acts = self._matrices[0], self.activations[0]
        if isinstance(m, kernels.CPUPacked):
            return m.matmul_rows(x, ids, acts)
        return kernels.rows_dot(self.take_rows(ids.reshape(-1), torch.float64).view(*ids.shape, -1), x)

    def take_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W (an embedding lookup), dequantized to `dtype`."""
        if len(self._matrices) != 1:
            raise ValueError("row lookups need a single-part weight")
        m = self._matrices[0]
        if isinstance(m, kernels.CPUPacked):
            return m.take_rows(ids).to(dtype)
        rows = QuantizedTensor(m.codes[ids], m.scales[ids], None if m.bias is None else m.bias[ids],
                               m.bits, m.group, m.offset)
        return rows.dequantize(dtype)
