"""Builds and loads gemlora's C++ CPU kernels (gemlora/kernels/cpu/*.cpp) as one torch extension.

Built from source once per install with torch.utils.cpp_extension (a minute or two on 2 cores) into
<cache>/kernels/<name>_<key>.so, the key hashing the sources, flags, torch and the interpreter's ABI; every
later start of any process with the same key loads that file directly, without a lock, and a changed
source is rebuilt. The model loader asks for the library at start, so a build never happens inside a
request's first step. Base code is compiled for plain x86-64; each vector path carries
its own target attribute and is picked at run time by what the CPU has, capped by GEMLORA_CPU_ISA
(avx2 or scalar: run a narrower CPU's paths on a wider one). With no compiler (or with
GEMLORA_NO_KERNELS set) `extension()` warns once and returns None, and callers take their plain
torch paths. Knows compilers and files; nothing of models or formats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from gemlora.disk_cache import cache_dir, exclusive

log = logging.getLogger("gemlora.kernels")

_SOURCES = sorted((Path(__file__).parent / "cpu").glob("*.cpp"))
_HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))
_lock = threading.Lock()
_ext = None
_tried = False
_error: str | None = None         # why the build failed, where it did


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


def build_error() -> str | None:
    """Why `extension()` gave None, when a build was tried and failed."""
    return _error


def _build():
    try:
        # -ffp-contract=off: the scalar dequantization must round like the reference (no fused a*b+c)
        ext = compiled("gemlora_kernels", _SOURCES, _HEADERS, cflags=("-O3", "-ffp-contract=off", "-fopenmp"),
                       ldflags=("-fopenmp",))
        log.info("CPU kernels loaded (%s path)", ext.cpu_isa())
        return ext
    except Exception as exc:   # no compiler, no headers, a build error: stay correct, just slower
        global _error
        _error = str(exc).strip() or type(exc).__name__
        detail = _error.splitlines()[-1]
        log.warning("could not build gemlora's CPU kernels (%s); quantized weights are dequantized per call "
                    "instead, which is much slower. Install a C++ compiler (g++) for the fast path.", detail)
        return None


def library_key(name: str, sources: Sequence[Path], headers: Sequence[Path] = (), cflags: Sequence[str] = (),
                ldflags: Sequence[str] = ()) -> str:
    """What the built library depends on: its sources, flags, torch's version and C++ ABI, and the
    interpreter's extension ABI (a cpython-311 build cannot load in 3.12). Not the interpreter's path:
    two virtualenvs with the same Python and torch share one build."""
    digest = hashlib.sha256()
    for part in (name, torch.__version__, str(torch.compiled_with_cxx11_abi()), sysconfig.get_config_var("EXT_SUFFIX"),
                 platform.machine(), *cflags, "|", *ldflags):
        digest.update(str(part).encode() + b"\0")
    for path in (*sources, *headers):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def compiled(name: str, sources: Sequence[Path], headers: Sequence[Path] = (), cflags: Sequence[str] = (),
             ldflags: Sequence[str] = (), wait_s: float | None = None) -> ModuleType:
    """The Python extension module built from `sources`, loaded straight from the cache
    (`<cache>/kernels/<name>_<key>.so`) when any process built it before; otherwise built once, by one
    process, in a child interpreter and a fresh folder, then renamed into place whole. Waiting on another
    builder is said and bounded (gemlora.disk_cache.exclusive); a build killed at any point leaves nothing a
    later start waits on."""
    full = f"{name}_{library_key(name, sources, headers, cflags, ldflags)}"
    root = cache_dir() / "kernels"
    target = root / f"{full}.so"
    if not target.is_file():
        with exclusive(root / f"{full}.lock", f"the C++ library {full}", target.is_file, wait_s) as must_build:
            if must_build:
                _build_into(target, full, sources, cflags, ldflags)
    return _load(full, target)


def _build_into(target: Path, full: str, sources: Sequence[Path], cflags: Sequence[str],
                ldflags: Sequence[str]) -> None:
    """Under the lock: compile in a child interpreter (torch's `load` imports what it builds; the parent
    loads the final file once) in a fresh folder, and rename the library into `target`."""
    for stale in target.parent.glob(f"{full}.build-*"):       # left by a builder that was killed
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{full}.build-", dir=target.parent))
    log.warning("building the C++ library %s (once for this torch and Python; a minute or two on 2 cores)", full)
    args = dict(name=full, sources=[str(p) for p in sources], build_directory=str(work), extra_cflags=list(cflags),
                extra_ldflags=list(ldflags), verbose=False)
    try:
        out = subprocess.run([sys.executable, "-c", _BUILDER, json.dumps(args)], capture_output=True, text=True)
        if out.returncode != 0:    # the compiler's words, not the child's traceback
            report = (out.stderr or out.stdout).strip()
            report = report[report.find("Error building extension"):] if "Error building extension" in report else report
            raise RuntimeError(f"building {full} failed: {report[-3000:]}")
        os.replace(work / f"{full}.so", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# The child dies with its parent (Linux), so a killed start leaves no compiler running behind it.
_BUILDER = """
import ctypes, json, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
except Exception:
    pass
from torch.utils.cpp_extension import load
load(**json.loads(sys.argv[1]))
"""


def _load(full: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(full, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
