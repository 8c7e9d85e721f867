"""The operator's public adapters: a read-only folder (`public_dir`) with one adapter per subfolder.

Owns scanning that folder at startup: which subfolders are complete adapters, their stable ids
(uuid5 of the folder name), the model they report, and the ids of their asset records.

Must not know SQLite, accounts' finetunes, uploads, HTTP or the engine: validation is injected, and
the store turns each `PublicAdapter` into its Finetune. Never writes to the folder.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemlora.finetunes.files import ASSET_NAMES, CONFIG_NAME, WEIGHTS_NAME, mtime_iso

log = logging.getLogger("gemlora.finetunes.store")   # the store's log, as before the split

PUBLIC_ACCOUNT = "public"                 # account_id of the public_dir adapters
PUBLIC_NAMESPACE = uuid.UUID("6f1c3b0e-5a3d-5c8e-9f57-2f0c4a1d9e11")   # uuid5 namespace of public_dir ids


@dataclass(frozen=True)
class PublicAdapter:
    id: str
    name: str
    model: str
    timestamp: str
    folder: Path
    summary: str


def asset_id(name: str, file_name: str) -> str:
    return str(uuid.uuid5(PUBLIC_NAMESPACE, f"{name}/{file_name}"))


def scan(public_dir: Path | None, validate: Callable[[Path], str], public_model: str | None) -> list[PublicAdapter]:
    """The complete, valid adapters of `public_dir`, by folder name; `public_model` (default: each config's
    base_model_name_or_path, else "") is the model they report."""
    if public_dir is None:
        return []
    if not public_dir.is_dir():
        log.warning("public adapters folder %s does not exist", public_dir)
        return []
    public = []
    for folder in sorted(public_dir.iterdir()):
        if folder.name.startswith(".") or not all((folder / n).is_file() for n in ASSET_NAMES):
            continue
        try:
            summary = str(validate(folder))
        except Exception as exc:
            log.warning("public adapter %s skipped: %s", folder, exc)
            continue
        model = public_model
        if model is None:
            try:
                model = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get(
                    "base_model_name_or_path") or ""
            except (OSError, ValueError, AttributeError):
                model = ""
        fid = str(uuid.uuid5(PUBLIC_NAMESPACE, folder.name))
        public.append(PublicAdapter(id=fid, name=folder.name, model=str(model),
                                    timestamp=mtime_iso(folder / WEIGHTS_NAME), folder=folder, summary=summary))
        log.info("public adapter %s (%s): %s", folder.name, fid, summary)
    return public
