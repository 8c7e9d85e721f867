"""The fused QK-norm + rotary kernel (gemlora/kernels/cpu/rope.cpp) against its reference
(`rms_norm` then `apply_rotary`): equal exactly, since it rounds every product and sum as torch does."""

from __future__ import annotations

import pytest
import torch

from gemlora.kernels import rope as R
from gemlora.model.config import RopeSpec
from gemlora.model.layers import Rotary

pytestmark = pytest.mark.usefixtures("kernels")


def cos_sin(T, D, theta=10000.0):
    return Rotary(D, RopeSpec(theta=theta), torch.device("cpu")).cos_sin(torch.arange(3, 3 + T) * 7, torch.float32)


@pytest.mark.parametrize("T,H,D", [(1, 4, 256), (5, 1, 256), (33, 8, 128), (2, 16, 64)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_the_kernel_equals_the_reference_exactly(T, H, D, with_norm):
    g = torch.Generator().manual_seed(T * H)
    qkv = torch.randn(T, (H + 2) * D, generator=g) * 3
    x = qkv[:, :H * D].view(T, H, D)                       # a strided view, as the model passes it
    scale = (1 + torch.randn(D, generator=g) * 0.1) if with_norm else None
    cos, sin = cos_sin(T, D)
    got = R.norm_rope(x, scale, 1e-6, cos, sin)
    want = R.reference_norm_rope(x, scale, 1e-6, cos, sin)
    assert got.shape == want.shape and torch.equal(got, want)


def test_other_dtypes_take_the_reference():
    x = torch.randn(3, 2, 64).bfloat16()
    cos, sin = cos_sin(3, 64)
    got = R.norm_rope(x, None, 1e-6, cos.bfloat16(), sin.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, R.apply_rotary(x, cos.bfloat16(), sin.bfloat16()))


def test_bad_shapes_are_refused():
    cos, sin = cos_sin(3, 64)
    with pytest.raises(RuntimeError, match="cos and sin"):
        R.extension().norm_rope(torch.randn(4, 2, 64), None, 1e-6, cos, sin)
    with pytest.raises(RuntimeError, match="norm scale"):
        R.extension().norm_rope(torch.randn(3, 2, 64), torch.ones(32), 1e-6, cos, sin)
