"""Crash-safe writing of a finetune's two adapter files, and quick checks of their format.

Owns the names of the two asset files, the temp-file naming of uploads, the chunked copy into a temp
file with a size limit, fsync, the atomic rename to the final name, directory fsync, and the cheap
format checks of adapter_config.json and adapter_model.safetensors done before a file is kept.

Must not know SQLite, accounts, finetune records, Workers AI error codes or HTTP: refusals are raised
as `FileTooLarge` / `FormatError` (a ValueError) with a message for the user, and the store turns
them into its FinetuneError.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

ASSET_NAMES = ("adapter_config.json", "adapter_model.safetensors")
CONFIG_NAME, WEIGHTS_NAME = ASSET_NAMES
CHUNK = 1 << 20
MAX_CONFIG_BYTES = 1 << 20                # a PEFT adapter_config.json is a few KB
TEMP_PREFIX, TEMP_SUFFIX = ".upload-", ".tmp"


class FileTooLarge(Exception):
    """The stream went past the size limit; the temp file is incomplete."""


class FormatError(ValueError):
    """The file is not of the format its name says; the message is for the user."""


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def mtime_iso(path: Path) -> str:
    return iso(datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(folder: Path, file_name: str) -> Path:
    """A fresh temp name in `folder` for an upload of `file_name`; `recover()` deletes these (TEMP_PREFIX)."""
    return folder / f"{TEMP_PREFIX}{file_name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"


def write_stream(tmp: Path, stream: BinaryIO, max_bytes: int) -> int:
    """Copies `stream` into the new file `tmp` (fsynced) and returns its size; raises FileTooLarge past
    `max_bytes`, FileNotFoundError when `tmp`'s folder is gone."""
    out = open(tmp, "xb")
    size = 0
    with out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise FileTooLarge(size)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


def publish(tmp: Path, final: Path) -> None:
    """Atomically renames the complete `tmp` to `final` and fsyncs the folder."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def check_format(path: Path, file_name: str, size: int) -> None:
    """Cheap format checks before a file is kept: a broken first file could never be replaced, and the
    adapter is only validated once the second arrives."""
    if size == 0:
        raise FormatError(f"{file_name} is empty")
    if file_name == CONFIG_NAME:
        if size > MAX_CONFIG_BYTES:
            raise FormatError(f"{file_name} is {size} bytes; a PEFT adapter config is a few KB "
                              f"(limit {MAX_CONFIG_BYTES} bytes)")
        try:
            config = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{file_name} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{file_name} must hold a JSON object (a PEFT LoraConfig)")
        return
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise FormatError(f"{file_name} looks like a PyTorch pickle, which is refused; re-save the adapter "
                              "with save_pretrained(..., safe_serialization=True)")
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 * 2**20):
            raise FormatError(f"{file_name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            header = None
        if not isinstance(header, dict):
            raise FormatError(f"{file_name} is not a safetensors file (its header is not a JSON object)")
