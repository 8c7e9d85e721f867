"""The records of the fine-tunes API: Finetune, Asset, and FinetuneError with its Workers AI codes.

Plain values shared by the store and the HTTP layer; no storage, no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gemlora.finetunes import files
from gemlora.finetunes.files import ASSET_NAMES


class FinetuneError(Exception):
    """A refused finetune operation: Workers AI error `code`, HTTP `status` and a message for the user."""

    def __init__(self, code: int, status: int, message: str):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message

    def __repr__(self) -> str:
        return f"FinetuneError({self.code}, {self.status}, {self.message!r})"


def not_found(what: str) -> FinetuneError:
    return FinetuneError(3037, 404, f"Finetune {what} not found")


def missing_files() -> FinetuneError:
    return FinetuneError(3039, 400, "Finetune is missing required files (model.safetensors and config.json)")


def bad_input(message: str) -> FinetuneError:
    return FinetuneError(5006, 400, message)


def too_large(message: str) -> FinetuneError:
    return FinetuneError(3006, 413, f"Request is too large: {message}")


@dataclass(frozen=True)
class Finetune:
    id: str
    account_id: str
    name: str
    model: str
    description: str
    public: bool
    created_at: str
    modified_at: str
    assets: frozenset[str]
    path: Path
    summary: str | None
    error: str | None = None     # why its stored adapter was refused when the server last started, if it was

    @property
    def ready(self) -> bool:
        return self.assets == frozenset(ASSET_NAMES) and self.summary is not None

    def to_api(self) -> dict:
        return {"id": self.id, "name": self.name, "model": self.model, "description": self.description,
                "public": self.public, "created_at": self.created_at, "modified_at": self.modified_at}


@dataclass(frozen=True)
class Asset:
    id: str
    finetune_id: str
    file_name: str
    bucket_name: str
    created_at: str
    modified_at: str

    def to_api(self) -> dict:
        return {"id": self.id, "bucket_name": self.bucket_name, "created_at": self.created_at,
                "file_name": self.file_name, "finetune_id": self.finetune_id, "modified_at": self.modified_at}


def now_iso() -> str:
    return files.iso(datetime.now(timezone.utc))
