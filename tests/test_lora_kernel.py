"""The LoRA delta kernel (gemlora/kernels/cpu/lora.cpp) against its plain-torch reference
(gemlora.kernels.lora.reference_lora_delta_), on every vector path this CPU runs; and the torch path of
LoRABatch (the GPUs' grouped bmm) against the same reference. Mixed ranks, rows without an adapter,
slots that patch only some parts, sizes off the vector width."""

from __future__ import annotations

import random

import pytest
import torch

from gemlora.kernels.build import extension
from gemlora.kernels.lora import reference_lora_delta_
from gemlora.lora.batch import LoRABatch
from gemlora.lora.slots import LoRASlots

pytestmark = pytest.mark.usefixtures("kernels")


def random_case(seed: int, rows: int, in_f: int, sizes: tuple[int, ...], slots: int = 6, max_rank: int = 16):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    parts = len(sizes)
    A = torch.randn(slots, parts, max_rank, in_f, generator=g)
    B = torch.randn(slots, max_rank, sum(sizes), generator=g)
    ranks = [0] + [rng.choice([1, 3, 8, max_rank]) for _ in range(slots - 1)]     # slot 0 empty
    for s, r in enumerate(ranks):       # past its rank, a slot holds zeros (LoRASlots' invariant)
        A[s, :, r:] = 0
        B[s, r:] = 0
    patched = torch.rand(slots, parts, generator=g) < 0.7
    patched[0] = False
    row_slot = torch.tensor([rng.choice([-1, 1, 2, 3, 4, 5]) for _ in range(rows)])
    row_scale = torch.rand(rows, generator=g) + 0.5
    x = torch.randn(rows, in_f, generator=g)
    y = torch.randn(rows, sum(sizes), generator=g)
    offsets = [sum(sizes[:i]) for i in range(parts + 1)]
    return y, x, A, B, row_slot, row_scale, torch.tensor(ranks), patched, offsets


def isas() -> list[str]:
    out, best = ["scalar"], extension().cpu_isa()
    if best in ("avx2", "avx512_vnni"):
        out.append("avx2")
    if best == "avx512_vnni":
        out.append("avx512")
    return out


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("rows, in_f, sizes", [(1, 64, (48, 16, 16)), (3, 70, (33,)), (9, 128, (100, 100)),
                                                (40, 96, (256, 64, 64))])
def test_the_kernel_equals_the_reference(isa, rows, in_f, sizes):
    for seed in range(3):
        y, x, A, B, row_slot, row_scale, ranks, patched, offsets = random_case(seed, rows, in_f, sizes)
        # the reference in float64, so that the bound below measures the kernel's float32 rounding only
        want = reference_lora_delta_(y.clone().double(), x.double(), A.double(), B.double(), row_slot, row_scale, ranks,
                                     patched, offsets)
        got = y.clone()
        extension().lora_delta_(got, x, A, B, row_slot, row_scale, ranks, patched, offsets, isa)
        # each delta element sums at most in_f + max_rank products of unit-variance terms, in float32:
        # rounding error below 1e-5 relative to the sums' magnitude (about sqrt(in_f) * rank)
        error = (got.double() - want).abs().max()
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * in_f ** 0.5 * 16), error
        untouched = row_slot < 0
        assert torch.equal(got[untouched], y[untouched])            # rows without an adapter are left alone


def test_the_kernel_does_not_depend_on_the_thread_count():
    y, x, A, B, row_slot, row_scale, ranks, patched, offsets = random_case(7, 33, 256, (512, 128, 128))
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = y.clone()
            extension().lora_delta_(got, x, A, B, row_slot, row_scale, ranks, patched, offsets)
            outs.append(got)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_the_kernel_refuses_bad_layouts():
    y, x, A, B, row_slot, row_scale, ranks, patched, offsets = random_case(1, 4, 64, (32, 32))
    with pytest.raises(RuntimeError, match="row slot out of range"):
        extension().lora_delta_(y, x, A, B, torch.tensor([0, 1, 99, -1]), row_scale, ranks, patched, offsets)
    with pytest.raises(RuntimeError, match="part_offsets"):
        extension().lora_delta_(y, x, A, B, row_slot, row_scale, ranks, patched, [0, 70, 64])
    with pytest.raises(RuntimeError, match="float32"):
        extension().lora_delta_(y.double(), x, A, B, row_slot, row_scale, ranks, patched, offsets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_batch_adds_the_reference_delta(dtype):
    """float32 on the CPU takes the kernel; float64 the grouped bmm the GPUs run. Both equal the reference."""
    key = "layers.0.self_attn.qkv_proj"
    sizes, in_f = (40, 24, 24), 48
    slots = LoRASlots({key: (in_f, sizes)}, max_loras=4, max_rank=8, dtype=dtype, device="cpu")
    g = torch.Generator().manual_seed(3)
    for s, (r, parts) in enumerate([(2, (0, 2)), (8, (0, 1, 2)), (5, (1,))]):
        for m in (0, 1, 2):
            slots.A[key][s, m].zero_()
            slots.B[key][s].zero_()
        for p in parts:
            lo, hi = slots.part_offsets[key][p], slots.part_offsets[key][p + 1]
            slots.A[key][s, p, :r] = torch.randn(r, in_f, generator=g, dtype=dtype)
            slots.B[key][s, :r, lo:hi] = torch.randn(r, hi - lo, generator=g, dtype=dtype)
            slots.filled[key][p].add(s)
            slots.patched[key][s, p] = True
        slots.rank[s] = r
    token_slots = [1, -1, 0, 2, 1, 1, 0, -1]
    token_scales = [0.5, 1.0, 2.0, 1.5, 0.25, 1.0, 1.0, 1.0]
    batch = LoRABatch.build(token_slots, token_scales, slots, torch.device("cpu"))
    x = torch.randn(8, in_f, generator=g, dtype=dtype)
    y = torch.randn(8, sum(sizes), generator=g, dtype=dtype)
    want = reference_lora_delta_(y.clone().double(), x.double(), slots.A[key].double(), slots.B[key].double(),
                                 batch.row_slot, batch.row_scale, batch.slot_rank, slots.patched[key],
                                 slots.part_offsets[key])
    got = batch.add_delta(y.clone(), x, key)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (got.double() - want).abs().max()
