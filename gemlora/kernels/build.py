"""Builds and loads gemlora's C++ CPU kernels (gemlora/kernels/cpu/*.cpp) as one torch extension.

Built from source on first use with torch.utils.cpp_extension (about a minute on 2 cores) into
~/.cache/gemlora/kernels/<hash of the sources and torch version>, so later starts load it at once
and a changed source is rebuilt. Base code is compiled for plain x86-64; each vector path carries
its own target attribute and is picked at run time by what the CPU has, capped by GEMLORA_CPU_ISA
(avx2 or scalar: run a narrower CPU's paths on a wider one). With no compiler (or with
GEMLORA_NO_KERNELS set) `extension()` warns once and returns None, and callers take their plain
torch paths. Knows compilers and files; nothing of models or formats.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("gemlora.kernels")

_SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
_HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
_lock = threading.Lock()
_ext = None
_tried = False


ISA_CAPS = ("auto", "avx512_vnni", "avx2", "scalar")


def extension():
    """The compiled CPU kernels, or None when they cannot be built here (warned once)."""
    global _ext, _tried
    cap = os.environ.get("GEMLORA_CPU_ISA", "")
    if cap and cap not in ISA_CAPS:     # a typo must not silently run the widest path
        raise ValueError(f"GEMLORA_CPU_ISA must be one of {', '.join(ISA_CAPS)}, not {cap!r}")
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        if os.environ.get("GEMLORA_NO_KERNELS"):
            log.warning("GEMLORA_NO_KERNELS is set: quantized weights are dequantized per call (slow)")
        else:
            _ext = _build()
        _tried = True
        return _ext


def _build():
    try:
        from torch.utils.cpp_extension import load
        digest = hashlib.sha256(torch.__version__.encode())
        for path in _SOURCES + _HEADERS:
            digest.update(path.name.encode() + path.read_bytes())
        key = digest.hexdigest()[:16]
        cache = Path(os.environ.get("GEMLORA_CACHE", "~/.cache/gemlora")).expanduser() / "kernels" / key
        cache.mkdir(parents=True, exist_ok=True)
        # -ffp-contract=off: the scalar dequantization must round like the reference (no fused a*b+c)
        ext = load(name=f"gemlora_kernels_{key}", sources=[str(p) for p in _SOURCES], build_directory=str(cache),
                   extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        log.info("CPU kernels loaded (%s path)", ext.cpu_isa())
        return ext
    except Exception as exc:   # no compiler, no headers, a build error: stay correct, just slower
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("could not build gemlora's CPU kernels (%s); quantized weights are dequantized per call "
                    "instead, which is much slower. Install a C++ compiler (g++) for the fast path.", detail)
        return None
