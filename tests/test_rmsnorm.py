"""The RMSNorm kernel (gemlora/kernels/cpu/rmsnorm.cpp) against its reference (torch's F.rms_norm) and
against the exact float64 value.

Bound: the kernel sums squares in double and rounds three times in float32 (1/rms, x * inv, * scale),
so each element is within 4 float32 ulps (4 * 2^-24 relative) of the exact value; torch's float
reduction adds its own rounding, so kernel and reference agree to 1e-6 relative to the row's largest
output (measured: at most 2 ulps of it).
"""

from __future__ import annotations

import pytest
import torch

from gemlora.kernels.build import extension
from gemlora.kernels.rmsnorm import reference_rms_norm, rms_norm

pytestmark = pytest.mark.usefixtures("kernels")

SHAPES = [(1, 640), (7, 640), (32, 640), (3, 5, 256), (200, 1152), (2, 2048), (1, 3072), (0, 640)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_kernel_matches_the_reference_and_the_exact_value(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * (1 + 50 * (torch.rand(*shape, generator=g) > 0.99))
    scale = torch.randn(shape[-1], generator=g) + 1
    y = rms_norm(x, scale, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.float32
    xd = x.double()
    exact = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * scale.double()
    assert ((y.double() - exact).abs() <= 4 * 2.0 ** -24 * exact.abs() + 1e-30).all()
    ref = reference_rms_norm(x, scale, 1e-6)
    if x.numel():
        assert ((y - ref).abs().amax(-1) <= 1e-6 * ref.abs().amax(-1)).all()


def test_non_contiguous_input_and_other_dtypes_take_the_right_path():
    x = torch.randn(8, 1280)[:, ::2]                      # a strided view
    scale = torch.rand(640) + 0.5
    assert torch.allclose(rms_norm(x, scale, 1e-6), reference_rms_norm(x, scale, 1e-6), rtol=1e-6, atol=1e-7)
    xb = torch.randn(4, 640).bfloat16()                   # not float32: the reference, in float32
    assert torch.equal(rms_norm(xb, scale, 1e-6), reference_rms_norm(xb, scale, 1e-6))


def test_bad_shapes_are_refused_with_a_clear_error():
    with pytest.raises(RuntimeError, match="last dimension"):
        extension().rms_norm(torch.randn(2, 640), torch.randn(320), 1e-6)
