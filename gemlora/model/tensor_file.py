"""TensorFile: a safetensors file written and read one tensor (or one slice of rows) at a time.

The safetensors format is an 8-byte header length, a JSON header giving every tensor's dtype, shape
and byte range, then the raw bytes. `TensorWriter` writes the header from shapes known up front and
then the data piece by piece, in any order, so a converter never holds more than one tensor's slice.
`TensorReader` reads each tensor with plain file reads into fresh memory instead of memory-mapping
the file: a mapped file's pages count towards the process's resident memory until it is unmapped,
so mapping a many-GB file while building a model from it would double the peak. Files written here
are ordinary safetensors files (safetensors.safe_open reads them too). Knows bytes and dtypes only.
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.bool: "BOOL"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class TensorWriter:
    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self._spans: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            n = prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._spans[name] = (offset, n, dtype, tuple(shape))
            offset += n
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)       # tensor data 8-byte aligned, as safetensors writes it
        self._base = 8 + len(blob)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._file.truncate(self._base + offset)

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Writes `tensor` as rows `row, row + 1, ...` of the tensor `name` (all of it by default)."""
        offset, n, dtype, shape = self._spans[name]
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:] or row + tensor.shape[0] > shape[0]:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)} at row {row}, "
                             f"expected {dtype} {shape}")
        row_bytes = prod(shape[1:]) * _itemsize(dtype) if len(shape) > 1 else _itemsize(dtype)
        self._file.seek(self._base + offset + row * row_bytes)
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorReader:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        (n,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(n))
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self._entries = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        out = torch.empty(end - start, dtype=torch.uint8)
        self._file.seek(self._base + start)
        if self._file.readinto(out.numpy()) != end - start:
            raise ValueError(f"{self.path}: tensor {name} is truncated")
        return out.view(_BY_NAME[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
