"""The top-k kernels (gemlora/kernels/cpu/top_k.cpp) against their references: top_k_ids picks the
same values as torch.topk on odd shapes, ties, rows shorter than k blocks, -inf, and the embedded
model's vocabulary size; place_top writes the same rows as the plain-torch version."""

from __future__ import annotations

import pytest
import torch

from gemlora.kernels.top_k import place_top, reference_place_top, reference_top_k_ids, top_k_ids

pytestmark = pytest.mark.usefixtures("kernels")


def check(x: torch.Tensor, k: int) -> None:
    got = top_k_ids(x, k)
    want = reference_top_k_ids(x, k)
    assert got.shape == want.shape == (x.shape[0], k) and got.dtype == torch.long
    for row, g, w in zip(x, got, want):
        assert len(set(g.tolist())) == k                         # k distinct indices
        # the same values (ties may pick other indices holding them)
        assert torch.equal(row[g].sort(descending=True).values, row[w].sort(descending=True).values)


@pytest.mark.parametrize("m,n,k", [(1, 262144, 64), (5, 1000, 64), (3, 4097, 1), (2, 63, 63), (4, 130, 64),
                                   (1, 64 * 64, 64), (7, 65, 2)])
def test_the_largest_values_are_picked(m, n, k):
    check(torch.randn(m, n, generator=torch.Generator().manual_seed(n)), k)


def test_ties_and_infinities():
    x = torch.zeros(3, 5000)
    x[0, ::7] = 1.0                                  # many ties above the rest
    x[1] = float("-inf")
    x[1, 100:110] = torch.arange(10.0)              # fewer finite values than k
    x[2] = torch.randint(0, 3, (5000,), generator=torch.Generator().manual_seed(0)).float()
    for k in (1, 16, 64):
        check(x, k)


def test_non_contiguous_rows_and_the_reference_elsewhere():
    x = torch.randn(8, 3000, generator=torch.Generator().manual_seed(1))[::2]
    check(x, 10)
    assert torch.equal(top_k_ids(x.double(), 10), reference_top_k_ids(x.double(), 10))   # not float32: torch


@pytest.mark.parametrize("m,n,k", [(1, 262144, 64), (3, 1000, 7), (2, 64, 64)])
def test_placing_the_top_equals_the_reference(m, n, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, n, generator=g)
    ids = top_k_ids(x, k)
    values = x.gather(1, ids) - torch.rand(m, k, generator=g)        # the exact values: lower than the coarse
    got = place_top(x.clone(), ids, values)
    assert torch.equal(got, reference_place_top(x.clone(), ids, values))
    assert torch.equal(top_k_ids(got, k).sort(-1).values, ids.sort(-1).values)    # those k are now the top
