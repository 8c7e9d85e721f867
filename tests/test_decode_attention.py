"""The C++ decode attention (gemlora/kernels/cpu/attention.cpp) against its float64 reference, over
random paged caches: grouped-query heads, Gemma's head sizes, padding, sliding windows and soft-caps.
Tolerance: float32 dot products of <= 256 terms and a softmax over <= 1024 keys (in chunks of 128,
merged), |diff| <= 2e-5 of the values' scale (float32 epsilon 1.2e-7 times the terms summed, with margin)."""

from __future__ import annotations

import pytest
import torch

from gemlora.kernels import decode_attention as A

pytestmark = pytest.mark.usefixtures("kernels")


def case(R, H, KVH, D, bs, n, seed, window=None):
    g = torch.Generator().manual_seed(seed)
    blocks_total = R * n + 3
    k_cache = torch.randn(blocks_total, bs, KVH, D, generator=g)
    v_cache = torch.randn(blocks_total, bs, KVH, D, generator=g)
    q = torch.randn(R, H, D, generator=g) * 0.3
    blocks = torch.randperm(blocks_total, generator=g)[:R * n]
    seq = torch.randint(1, n * bs + 1, (R, 1), generator=g)              # each row's own length
    pos = torch.arange(n * bs)[None, :]
    mask = pos < seq
    if window is not None:
        mask &= pos >= seq - window
    return q, k_cache, v_cache, blocks, mask


@pytest.mark.parametrize("R,H,KVH,D,bs,n", [(1, 4, 1, 256, 16, 5), (3, 8, 8, 256, 16, 2), (17, 16, 8, 128, 4, 9),
                                            (5, 8, 2, 64, 16, 38), (2, 8, 1, 256, 16, 64)])
@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("isa", ["auto", "avx512", "avx2", "scalar"])
def test_the_kernel_matches_its_reference(R, H, KVH, D, bs, n, softcap, window, isa):
    q, k, v, blocks, mask = case(R, H, KVH, D, bs, n, seed=R + D, window=window)
    try:
        got = A.decode_attention(q, k, v, blocks, mask, 0.0625, softcap, isa)
    except RuntimeError as exc:
        if "cannot run" in str(exc):
            pytest.skip(f"this CPU has no {isa}")       # a real condition: the path needs instructions it lacks
        raise
    want = A.reference_decode_attention(q, k, v, blocks, mask, 0.0625, softcap)
    assert got.shape == (R, H * D)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_it_serves_the_model_only_where_it_applies():
    q, k, *_ = case(1, 4, 1, 64, 16, 1, seed=0)
    assert A.kernel_applies(q, k)
    assert not A.kernel_applies(q.bfloat16(), k) and not A.kernel_applies(q, k.half())


def test_bad_block_ids_are_refused_not_read():
    q, k, v, blocks, mask = case(2, 4, 1, 64, 16, 2, seed=1)
    with pytest.raises(RuntimeError, match="block id out of range"):
        A.decode_attention(q, k, v, blocks + 1000, mask, 0.1, None)
    with pytest.raises(RuntimeError, match="mask"):
        A.decode_attention(q, k, v, blocks, mask[:, :-1], 0.1, None)


def test_the_result_does_not_depend_on_the_thread_count():
    """Keys are split in fixed chunks, not per thread: batch invariance needs the same bits anywhere."""
    q, k, v, blocks, mask = case(3, 8, 2, 128, 16, 40, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = A.decode_attention(q, k, v, blocks, mask, 0.1, None)
        torch.set_num_threads(max(2, threads))
        many = A.decode_attention(q, k, v, blocks, mask, 0.1, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
