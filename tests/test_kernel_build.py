"""The kernel library is built once per install and loaded directly after: no start waits on a lock
without saying so or without bound, a start killed at any point leaves nothing a later one waits on, and
two virtualenvs with the same Python and torch share one build (gemlora.kernels.build, gemlora.disk_cache)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gemlora.disk_cache import LockTimeout, exclusive

REPO = Path(__file__).resolve().parents[1]

# A Python C-API module: builds in about a second, so a build can be interrupted at many points.
TINY_SOURCE = """
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(%d); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
#define STR2(n) #n
#define STR(n) STR2(n)
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), NULL, -1, methods};
#define INIT2(n) PyInit_##n
#define INIT(n) INIT2(n)
PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""

BUILD_TINY = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from pathlib import Path
from gemlora.kernels.build import compiled
m = compiled("tiny", [Path(sys.argv[1])], cflags=["-O1"])
print("ANSWER", m.answer(), m.__file__)
"""


def tiny_source(tmp_path: Path, answer: int = 42) -> Path:
    src = tmp_path / "src" / "tiny.c"
    src.parent.mkdir(exist_ok=True)
    src.write_text(TINY_SOURCE % answer)
    return src


def env_with_cache(cache: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GEMLORA_NO_KERNELS"}
    return {**env, "GEMLORA_CACHE": str(cache), "PYTHONPATH": str(REPO), **extra}


def build_tiny(src: Path, cache: Path, python: str = sys.executable, timeout: float = 120, **extra):
    return subprocess.run([python, "-c", BUILD_TINY, str(src)], env=env_with_cache(cache, **extra),
                          capture_output=True, text=True, timeout=timeout)


def test_a_built_library_is_loaded_directly_without_a_lock_or_a_rebuild(tmp_path):
    src, cache = tiny_source(tmp_path), tmp_path / "cache"
    first = build_tiny(src, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "ANSWER 42" in first.stdout and "building the C++ library tiny_" in first.stderr
    [lib] = (cache / "kernels").glob("tiny_*.so")
    assert not list((cache / "kernels").glob("*.build-*"))            # the build folder went with the build
    stamp = lib.stat().st_mtime_ns
    lock = lib.with_suffix(".lock")
    holder = hold_lock(lock)                    # a live holder of the lock cannot delay a start that loads
    try:
        again = build_tiny(src, cache, timeout=60)
    finally:
        holder.kill()
    assert again.returncode == 0 and "ANSWER 42" in again.stdout, again.stderr[-3000:]
    assert "building" not in again.stderr and "waiting" not in again.stderr
    assert lib.stat().st_mtime_ns == stamp
    changed = build_tiny(tiny_source(tmp_path, 7), cache)                # a changed source is a new library
    assert "ANSWER 7" in changed.stdout and len(list((cache / "kernels").glob("tiny_*.so"))) == 2


def hold_lock(lock: Path) -> subprocess.Popen:
    """A live process holding `lock` as a builder would (its pid written in it)."""
    code = textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())
        print("held", flush=True)
        time.sleep(600)
    """)
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_start_that_finds_the_lock_held_says_so_and_waits_bounded(tmp_path, caplog):
    lock = tmp_path / "entry.lock"
    holder = hold_lock(lock)
    try:
        start = time.monotonic()
        with pytest.raises(LockTimeout, match=rf"waiting for process {holder.pid}.*GEMLORA_LOCK_WAIT_S"):
            with exclusive(lock, "the entry", lambda: False, wait_s=1.0):
                pass
        assert time.monotonic() - start < 10
        assert f"waiting for process {holder.pid}, which is building the entry" in caplog.text

        # the holder dies (SIGKILL, as an OOM kill would): the waiter goes on at once and builds itself
        waited = {}

        def kill_soon():
            time.sleep(0.5)
            holder.kill()
        import threading
        threading.Thread(target=kill_soon, daemon=True).start()
        start = time.monotonic()
        with exclusive(lock, "the entry", lambda: False, wait_s=60.0) as must_build:
            waited["s"], waited["build"] = time.monotonic() - start, must_build
        assert waited["build"] and waited["s"] < 10
        assert lock.read_text().strip() == str(os.getpid())
    finally:
        holder.kill()


def test_a_waiter_loads_what_the_holder_finished_without_building_again(tmp_path):
    lock, done = tmp_path / "entry.lock", tmp_path / "entry"
    holder = hold_lock(lock)
    try:
        import threading
        threading.Timer(0.3, done.touch).start()
        start = time.monotonic()
        with exclusive(lock, "the entry", done.exists, wait_s=60.0) as must_build:
            assert not must_build
        assert time.monotonic() - start < 10
    finally:
        holder.kill()


def test_an_invalid_wait_limit_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMLORA_LOCK_WAIT_S", "forever")
    with pytest.raises(ValueError, match="GEMLORA_LOCK_WAIT_S must be a number of seconds"):
        with exclusive(tmp_path / "x.lock", "x", lambda: False):
            pass


@pytest.mark.timeout(600)
def test_a_build_killed_at_any_point_never_blocks_the_next_start(tmp_path):
    """SIGKILL a builder at random moments of its build (lock taken, compiler running, library being
    renamed): each time, the next start finishes within its bound and loads a working library."""
    src, cache = tiny_source(tmp_path), tmp_path / "cache"
    start = time.monotonic()
    assert build_tiny(src, cache).returncode == 0
    span = time.monotonic() - start            # one build here: the kills are spread over it
    kernels = cache / "kernels"
    rng = random.Random(0)
    for _ in range(8):
        for lib in kernels.glob("tiny_*.so"):
            lib.unlink()
        proc = subprocess.Popen([sys.executable, "-c", BUILD_TINY, str(src)], env=env_with_cache(cache),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, span))
        proc.kill()
        proc.wait()
        nxt = build_tiny(src, cache, timeout=120, GEMLORA_LOCK_WAIT_S="60")
        assert nxt.returncode == 0 and "ANSWER 42" in nxt.stdout, nxt.stderr[-3000:]
        assert "waiting" not in nxt.stderr                    # the killed builder's lock died with it
    assert not list(kernels.glob("*.build-*"))                # stale build folders were cleaned


def test_two_virtualenvs_with_the_same_python_and_torch_share_one_build(tmp_path):
    """A second virtualenv (its own interpreter path, the same packages) loads the library the first
    built; before, each alternation rebuilt the kernels under the lock."""
    import site
    import venv
    src, cache = tiny_source(tmp_path), tmp_path / "cache"
    first = build_tiny(src, cache)
    assert first.returncode == 0 and "building" in first.stderr, first.stderr[-3000:]
    other = tmp_path / "venv2"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(other)
    python = other / "bin" / "python"
    site_dir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(site_dir, "parent-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    assert subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                          check=True).stdout.strip() == str(other)
    second = build_tiny(src, cache, python=str(python))
    assert second.returncode == 0 and "ANSWER 42" in second.stdout, second.stderr[-3000:]
    assert "building" not in second.stderr
    assert len(list((cache / "kernels").glob("tiny_*.so"))) == 1


@pytest.mark.timeout(900)
def test_gemlora_generate_killed_during_start_never_hangs_a_later_one(tiny_real_vocab, tmp_path, kernels):
    """The issue's report: a `gemlora generate` interrupted during its start made every later one wait
    forever in torch's build baton. With the kernels built, starts killed at random points leave nothing
    behind that a later start waits on."""
    ext = kernels
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True)
    shutil.copy2(ext.__file__, cache / "kernels" / Path(ext.__file__).name)
    cmd = [sys.executable, "-m", "gemlora.cli", "generate", "--model", str(tiny_real_vocab), "--max-tokens", "4",
           "--temperature", "0", "--raw", "Hello"]
    env = env_with_cache(cache, GEMLORA_LOCK_WAIT_S="60")
    start = time.monotonic()
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    span = time.monotonic() - start
    assert first.returncode == 0, first.stderr[-3000:]
    assert "building" not in first.stderr
    rng = random.Random(1)
    for _ in range(5):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, span))
        proc.kill()
        proc.wait()
    last = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    assert last.stdout == first.stdout and "waiting" not in last.stderr


def test_a_failed_kernel_build_fails_the_kernel_tests_instead_of_skipping_them(tmp_path):
    """Where the kernels should build (x86-64, a compiler) but do not, the kernel test modules fail, so CI
    cannot pass with no kernel coverage; GEMLORA_NO_KERNELS still skips them."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from conftest import kernels_missing
        print("MISSING", (kernels_missing() or ("none",))[0])
    """)
    broken = subprocess.run([sys.executable, "-c", code, str(REPO / "tests")], capture_output=True, text=True,
                            env=env_with_cache(tmp_path / "cache", CXX="false"), timeout=300)
    assert "MISSING fail" in broken.stdout, broken.stderr[-3000:]
    off = subprocess.run([sys.executable, "-c", code, str(REPO / "tests")], capture_output=True, text=True,
                         env=env_with_cache(tmp_path / "cache", GEMLORA_NO_KERNELS="1"), timeout=300)
    assert "MISSING skip" in off.stdout, off.stderr[-3000:]
