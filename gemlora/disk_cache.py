"""gemlora's on-disk cache of things built once per machine (GGUF conversions, compiled CPU kernels):
where it lives, and the lock under which one process builds an entry while the others wait.

The lock is an `fcntl.flock` on `<entry>.lock`, which the kernel releases when its holder dies however it
dies (Ctrl-C, SIGKILL, OOM), so no file left behind can block a later start. A process that finds the
lock held says so (naming the holder's pid) and waits at most GEMLORA_LOCK_WAIT_S seconds (default 1800),
returning early when the entry appears; then it raises `LockTimeout`. Builders write into a partial
folder and rename the finished entry into place, so a reader sees no entry or a whole one and never
takes the lock. Knows files and processes; nothing of models, kernels or requests.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("gemlora.disk_cache")

DEFAULT_WAIT_S = 1800.0
_POLL_S = 0.1
_REPORT_EVERY_S = 30.0


class LockTimeout(TimeoutError):
    """Another live process held an entry's lock for longer than this process would wait."""


def cache_dir() -> Path:
    """GEMLORA_CACHE, else ~/.cache/gemlora."""
    return Path(os.environ.get("GEMLORA_CACHE") or Path.home() / ".cache" / "gemlora").expanduser()


def wait_limit_s() -> float:
    raw = os.environ.get("GEMLORA_LOCK_WAIT_S", "")
    try:
        value = float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"GEMLORA_LOCK_WAIT_S must be a number of seconds >= 0, not {raw!r}")
    return value


@contextmanager
def exclusive(lock_path: Path, what: str, done: Callable[[], bool], wait_s: float | None = None) -> Iterator[bool]:
    """Holds `lock_path` while the caller builds `what`; yields False (without the lock) when `done()`
    became true while waiting, so the caller only loads what another process built."""
    wait_s = wait_limit_s() if wait_s is None else wait_s
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            log.warning("waiting for process %s, which is building %s (lock %s; at most %.0f s)",
                        holder, what, lock_path, wait_s)
            start = last_report = time.monotonic()
            while not _try_lock(fd):
                if done():
                    yield False
                    return
                now = time.monotonic()
                if now - start >= wait_s:
                    raise LockTimeout(f"gave up after {wait_s:.0f} s waiting for process {holder}, which is still "
                                      f"building {what} (lock {lock_path}); raise GEMLORA_LOCK_WAIT_S to wait longer")
                if now - last_report >= _REPORT_EVERY_S:
                    log.warning("still waiting for process %s building %s (%.0f s)", holder, what, now - start)
                    last_report = now
                time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield not done()
    finally:
        os.close(fd)          # releases the lock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
