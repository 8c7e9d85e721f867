"""Huge-page-backed CPU tensors: right shape, dtype and contents, 2 MB-aligned when large, never
overlapping when small ones share a chunk, and plain torch.empty where huge pages are off. (Packed
weights and the KV cache live there: test_quant_kernels and the engine tests check what they hold.)"""

from __future__ import annotations

import subprocess
import sys

import torch

from gemlora.kernels import hugepages


def test_small_tensors_share_chunks_without_overlapping():
    shapes = [(7,), (33, 5), (1000, 3), (4096, 16), (1,), (3, 3, 3)] * 40
    dtypes = [torch.float32, torch.float16, torch.uint8, torch.int64]
    tensors = []
    for i, shape in enumerate(shapes):
        t = hugepages.empty(shape, dtypes[i % 4])
        assert t.shape == torch.Size(shape) and t.dtype == dtypes[i % 4] and t.is_contiguous()
        assert t.data_ptr() % 64 == 0                       # cache-line aligned, so views of any dtype are valid
        t.fill_(i % 100)
        tensors.append(t)
    for i, t in enumerate(tensors):                         # a later tensor never wrote over an earlier one
        assert (t == i % 100).all(), i


def test_large_tensors_are_huge_page_aligned_and_copies_are_equal():
    big = hugepages.zeros((3000, 1024), torch.float32)       # 12 MB: a buffer of its own
    assert big.abs().sum() == 0
    if hugepages.enabled():
        assert big.data_ptr() % hugepages.HUGE_PAGE == 0
    src = torch.randn(700, 300).t()                          # not contiguous
    copy = hugepages.copy_of(src)
    assert copy.is_contiguous() and torch.equal(copy, src)


def test_without_huge_pages_it_is_plain_memory():
    code = ("import torch; from gemlora.kernels import hugepages as h; t = h.empty((5, 3), torch.float32); "
            "print(h.enabled(), t.shape == (5, 3), t.dtype)")
    out = subprocess.run([sys.executable, "-c", code], env={"GEMLORA_NO_HUGEPAGES": "1", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "torch.float32"]
