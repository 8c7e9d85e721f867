"""CPU tensors backed by transparent huge pages, for the big buffers a decode step streams through
once per token: packed weights (all of them, every token) and the KV cache.

Why: a decode step reads every weight byte, hundreds of MB, once per token. With 4 KB pages that is
tens of thousands of TLB misses per token; the CPU's page walks then stall the stream. With 2 MB
pages the whole model fits in the TLB. Measured on a 2-core EPYC, a batch-1 4-bit GEMV over 250 MB
read 32.6 GB/s from 4 KB pages and 38.4 GB/s from huge pages (llama.cpp gets them for free: its
mmap of the GGUF is served from the page cache's large folios).

Linux gives anonymous memory huge pages when the system setting is `always`, or, on the common
`madvise` setting, for ranges that ask with madvise(MADV_HUGEPAGE) before they are first touched.
`empty` returns tensors carved from fresh, 2 MB-aligned, madvised private mappings: a tensor of 8 MB or more gets
its own buffer; smaller ones (a layer's matrices) share 64 MB chunks, filled one after another, so
their pages are huge too. Memory carved here is never given back while a tensor views it; this is
meant for what lives as long as the model. Elsewhere (not Linux, not the CPU, THP off, or
GEMLORA_NO_HUGEPAGES set) it is plain torch.empty. Knows pages; nothing of what the bytes mean.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
_CHUNK = 64 << 20                 # shared buffer for tensors below _OWN
_OWN = 8 << 20                    # tensors this large get a buffer of their own
_ALIGN = 64                       # every tensor starts on a cache line


def _available() -> bool:
    if sys.platform != "linux" or os.environ.get("GEMLORA_NO_HUGEPAGES") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


class _Pool:
    def __init__(self):
        self.enabled = _available()
        self._lock = threading.Lock()
        self._chunk: torch.Tensor | None = None
        self._used = 0

    @staticmethod
    def buffer(nbytes: int) -> torch.Tensor:
        """A uint8 tensor of nbytes, 2 MB-aligned, in a fresh private mapping that asked for huge pages
        before anything touched it (the tensor keeps the mapping alive)."""
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
        raw = torch.frombuffer(mapping, dtype=torch.uint8)
        start = -raw.data_ptr() % HUGE_PAGE
        return raw[start:start + nbytes]

    def carve(self, nbytes: int) -> torch.Tensor:
        if nbytes >= _OWN:
            return self.buffer(nbytes)
        with self._lock:
            if self._chunk is None or self._used + nbytes > _CHUNK:
                self._chunk, self._used = self.buffer(_CHUNK), 0
            out = self._chunk[self._used:self._used + nbytes]
            self._used += -(-nbytes // _ALIGN) * _ALIGN
            return out


_pool = _Pool()


def enabled() -> bool:
    return _pool.enabled


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty(shape, dtype) on `device`; on the CPU carved from huge-page memory where the system allows."""
    if torch.device(device).type != "cpu" or not _pool.enabled:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return _pool.carve(nbytes).view(dtype).view(shape)


def zeros(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    return empty(shape, dtype, device).zero_()


def copy_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in huge-page memory (on the CPU)."""
    return empty(tuple(t.shape), t.dtype, t.device).copy_(t)
