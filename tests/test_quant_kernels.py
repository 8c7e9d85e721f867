"""The quantized matmul kernels (gemlora/kernels/cpu/qmatmul.cpp) against their plain-torch reference,
on every path this CPU can run, for every format a weight can take and the (K, N) of every projection
of Gemma 3 270M, Gemma 2B and Gemma 7B.

Two checks per case:
- against `reference_matmul` (the same activation quantization, done in torch, times the dequantized
  weight in float64): equal up to fp32 accumulation, |diff| <= 1e-5 * max|ref| (+1e-6);
- against the exact x @ W^T in float64: within `activation_error_bound`, the bound derived from the
  activation quantization (each activation off by at most half its block's final step), elementwise.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_quantized
from gemlora.kernels import qmatmul as K

ISAS = [isa for isa in ("scalar", "avx2", "avx512_vnni")
        if K.extension() is not None and {"scalar": 0, "avx2": 1, "avx512_vnni": 2}[isa]
        <= {"scalar": 0, "avx2": 1, "avx512_vnni": 2}[K.extension().cpu_isa()]]
ROWS = [1, 2, 3, 8, 16, 31, 32, 64, 200]
# (K, N) of qkv, o, gate_up, down, lm_head
SHAPES = {
    "gemma3-270m": [(640, 1536), (1024, 640), (640, 4096), (2048, 640), (640, 262144)],
    "gemma-2b": [(2048, 2560), (2048, 2048), (2048, 32768), (16384, 2048), (2048, 256000)],
    "gemma-7b": [(3072, 12288), (4096, 3072), (3072, 49152), (24576, 3072), (3072, 256000)],
}
# (bits, group, scale dtype, bias, offset): Q8_0/Q5_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q2_K, Q3_K
FORMATS = [(8, 32, torch.float16, False, 128), (4, 32, torch.float16, False, 8), (4, 32, torch.float16, True, 0),
           (4, 32, torch.float32, True, 0), (8, 32, torch.float32, True, 128), (8, 16, torch.float32, False, 128),
           (4, 16, torch.float32, True, 0), (4, 16, torch.float32, False, 4)]
MAX_N = 520     # wider weights are cut to 520 rows (32 tiles + a partial one) for the M sweep: every
                # row of a tile and every tile take the same code path, so more rows only cost time

pytestmark = pytest.mark.usefixtures("kernels")


def activations(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    return x * (1 + 30 * (torch.rand(m, k, generator=g) > 0.99))      # Gemma-like outliers


def check(packed, qt, x, w=None):
    w = qt.dequantize(torch.float64) if w is None else w
    exact = x.double() @ w.T
    abs_product = x.double().abs() @ w.abs().T
    for mode in K.ACTIVATIONS:
        ref = K.reference_matmul(x, qt, mode, weight=w)
        bound = K.activation_error_bound(x, qt, mode, weight=w, abs_product=abs_product)
        for isa in ISAS:
            if isa == "scalar" and x.shape[0] * qt.rows * qt.cols > 2e7:
                continue                              # the scalar path is the slow fallback: small cases only
            y = packed.matmul(x, mode, isa).double()
            assert y.shape == ref.shape
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, (isa, mode)
            assert ((y - exact).abs() <= bound).all(), (isa, mode)


@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("shape", range(5), ids=["qkv", "o", "gate_up", "down", "lm_head"])
def test_every_row_count_and_shape_matches_the_reference(model, shape):
    k, n = SHAPES[model][shape]
    fmt = FORMATS[(list(SHAPES).index(model) * 5 + shape) % len(FORMATS)]   # every format over the grid
    qt = random_quantized(min(n, MAX_N), k, *fmt, seed=shape)
    packed, w = K.pack(qt), qt.dequantize(torch.float64)
    for m in ROWS:
        check(packed, qt, activations(m, k, seed=m), w)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}bit-g{f[1]}-{str(f[2])[-7:]}-bias{int(f[3])}")
def test_every_format_on_an_odd_shape(fmt):
    qt = random_quantized(37, 96, *fmt, seed=1)          # 3 tiles, the last one partial; 3 blocks
    packed = K.pack(qt)
    for m in (1, 5, 9):
        check(packed, qt, activations(m, 96, seed=m))
    rows = torch.tensor([0, 36, 17, 16, 15, 3, 3])
    assert torch.equal(packed.take_rows(rows), qt.dequantize()[rows])       # embedding lookups: exact


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}bit-g{f[1]}-{str(f[2])[-7:]}-bias{int(f[3])}")
@pytest.mark.parametrize("acts", K.ACTIVATIONS)
def test_chosen_entries_are_the_references_own(fmt, acts):
    """matmul_rows (what the screened LM head rescores with) equals reference_matmul's entries."""
    qt = random_quantized(37, 96, *fmt, seed=2)
    packed = K.pack(qt)
    x = activations(3, 96, seed=5)
    ids = torch.tensor([[0, 36, 17, 17], [16, 15, 3, 0], [36, 35, 1, 2]])
    want = K.reference_matmul(x, qt, acts).gather(1, ids)
    torch.testing.assert_close(packed.matmul_rows(x, ids, acts).double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="out of range"):
        packed.matmul_rows(x, torch.full((3, 1), 37), acts)


def test_a_full_width_lm_head():
    k, n = SHAPES["gemma3-270m"][4]
    qt = random_quantized(n, k, 4, 32, torch.float16, False, 8, seed=3)
    packed = K.pack(qt)
    x = activations(2, k, seed=4)
    y = packed.matmul(x, "int16")
    for start in range(0, n, 32768):                   # the reference in slices of rows, to bound memory
        part = K.reference_matmul(x, type(qt)(qt.codes[start:start + 32768], qt.scales[start:start + 32768],
                                              None, 4, 32, 8), "int16")
        assert (y[:, start:start + 32768].double() - part).abs().max() <= 1e-5 * part.abs().max() + 1e-6
    ids = torch.tensor([0, n - 1, 12345])
    assert torch.equal(packed.take_rows(ids), type(qt)(qt.codes[ids], qt.scales[ids], None, 4, 32, 8).dequantize())


def test_shapes_the_kernels_cannot_take_are_refused_with_a_clear_error():
    qt = random_quantized(16, 48, 8, 16)                 # 48 columns: not whole 32-blocks
    assert not K.can_pack_for_cpu(qt)
    with pytest.raises(ValueError, match="multiple of 32"):
        K.pack(qt)
    packed = K.pack(random_quantized(16, 64, 8, 32))
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        packed.matmul(torch.randn(2, 32))
    with pytest.raises(RuntimeError, match="activations must be int8, int8x2 or int16"):
        packed.matmul(torch.randn(2, 64), "int4")
    assert packed.matmul(torch.randn(0, 64)).shape == (0, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        packed.take_rows(torch.tensor([16]))


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_activation_quantization_matches_its_reference(rows):
    # 40 rows: more than one parallel chunk; 7 x 128 with outliers and an all-zero block
    x = activations(rows, 128, seed=9)
    x[0, 32:64] = 0
    for mode in K.ACTIVATIONS:
        want, _ = K.reference_quantize_activations(x, mode)
        first = None
        for isa in ISAS:
            q, d, s16 = K.extension().quantize_activations(x, mode, isa)
            assert q.dtype == (torch.int16 if mode == "int16" else torch.int8)
            got = sum(q[p].double() * d[p].double().repeat_interleave(32, dim=1) for p in range(q.shape[0]))
            assert torch.equal(got, want), (isa, mode)
            # s16: d * (sum of q) over each 16 elements, summed over the passes, as the kernels' bias term uses
            sums = (q.double() * d.double().repeat_interleave(32, dim=-1)).reshape(q.shape[0], rows, 8, 16)
            assert torch.allclose(s16.double(), sums.sum(-1).sum(0), rtol=1e-6, atol=1e-6), (isa, mode)
            if first is None:
                first = (q, d, s16)
            else:                                # every vector path gives the scalar path's bytes
                assert all(torch.equal(a, b) for a, b in zip(first, (q, d, s16))), (isa, mode)


def test_int16_activations_are_at_least_as_exact_as_two_int8_passes():
    # why "auto" may pick either: on Gemma-like outliers both stay far inside one int8 pass's error
    x = activations(16, 2048, seed=5)
    err = {mode: (K.reference_quantize_activations(x, mode)[0] - x.double()).abs().max().item()
           for mode in K.ACTIVATIONS}
    assert err["int16"] <= err["int8x2"] < err["int8"] / 50


CAPPED = """
import torch
from conftest import random_quantized
from gemlora.kernels import qmatmul as K
qt = random_quantized(520, 640, 4, 32)
x = torch.randn(3, 640)
y = K.pack(qt).matmul(x)
ref = K.reference_matmul(x, qt)
assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
try:
    K.pack(qt).matmul(x, isa="avx512_vnni")
    refused = ""
except RuntimeError as exc:
    refused = str(exc).splitlines()[0]
print(K.extension().cpu_isa(), "|", refused)
"""


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2 path to cap at")
def test_gemlora_cpu_isa_caps_every_kernel_at_a_narrower_path():
    """GEMLORA_CPU_ISA=avx2 runs an AVX2-only CPU's paths on a wider one: auto picks AVX2 (and stays exact
    against the reference), a wider path named explicitly is refused."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "GEMLORA_CPU_ISA": "avx2", "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-c", CAPPED], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    isa, refused = out.stdout.strip().splitlines()[-1].split(" | ")
    assert isa == "avx2"
    assert "cannot run the avx512_vnni path" in refused


def test_an_unknown_gemlora_cpu_isa_is_a_clear_error(monkeypatch):
    from gemlora.kernels import build
    monkeypatch.setenv("GEMLORA_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="GEMLORA_CPU_ISA must be one of auto, avx512_vnni, avx2, scalar"):
        build.extension()
