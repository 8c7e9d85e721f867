"""FinetuneStore: each account's fine-tunes (Workers AI's "finetunes"), their metadata and adapter files.

Owns the finetunes of every account: metadata (id, name, model, description, public, timestamps, the
validated adapter's summary) and asset records in SQLite (`<data_dir>/finetunes.sqlite3`, WAL), and the
two adapter files of each in `<data_dir>/finetunes/<id>/`. Plus, read-only, the operator's public
adapters (`public_dir`, one subfolder each; scanned by `public.py`). Crash-safe by construction (the file
writing itself, temp file, fsync, rename, and the format checks, is `files.py`):

- which assets a finetune has is decided by the files on disk, never by the database, so a crash
  between writing a file and recording it loses nothing (the record is re-created on startup);
- an upload streams into a temp file in the finetune's folder, is fsynced, then `os.replace`d to its
  final name (and the folder fsynced): a file under a final name is always complete; `recover()`
  deletes the temp files a crash left;
- a delete first renames the folder to a trash name (the commit point), then drops the rows and the
  files; `recover()` finishes any delete a crash interrupted, so a half-deleted adapter is never seen;
- an adapter is validated once both files are present; one the crash left unvalidated is validated
  on startup.

Thread-safe (the HTTP server calls it from a thread pool): one SQLite connection per call, write
transactions are BEGIN IMMEDIATE, and a lock per finetune orders its uploads and its delete.

Must not know HTTP, the engine, slots or requests: validation (`validate(folder) -> summary`) and
"is it in use" (`delete(..., in_use=)`) are injected; errors carry the Workers AI code and HTTP status
for the HTTP layer to put in its envelope.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from gemlora.finetunes import files
from gemlora.finetunes import public as public_folder
from gemlora.finetunes.files import (ASSET_NAMES, CHUNK, CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME,  # noqa: F401
                                     FileTooLarge, FormatError, fsync_dir as _fsync_dir, mtime_iso as _mtime_iso)
from gemlora.finetunes.finetune import (Asset, Finetune, FinetuneError, bad_input, missing_files,  # noqa: F401
                                        not_found, now_iso, too_large)
from gemlora.finetunes.public import PUBLIC_ACCOUNT, PUBLIC_NAMESPACE  # noqa: F401

log = logging.getLogger(__name__)

BUCKET_NAME = "gemlora-finetunes"        # Asset.bucket_name: Workers AI names its R2 bucket there
RESERVED_PREFIX = "cf-"                   # Workers AI reserves cf-public-*; we reserve all of cf-
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TRASH_PREFIX = ".trash-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS finetunes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    description TEXT NOT NULL,
    public INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    modified_at TEXT NOT NULL,
    summary TEXT,
    error TEXT,
    UNIQUE (account_id, name)
);
CREATE INDEX IF NOT EXISTS finetunes_public ON finetunes (public) WHERE public = 1;
CREATE TABLE IF NOT EXISTS assets (
    id TEXT PRIMARY KEY,
    finetune_id TEXT NOT NULL,
    file_name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    modified_at TEXT NOT NULL,
    UNIQUE (finetune_id, file_name)
);
"""


class FinetuneStore:
    def __init__(self, data_dir: Path, *, validate: Callable[[Path], str], max_file_bytes: int = 300 * 2**20,
                 max_per_account: int = 30, public_dir: Path | None = None, public_model: str | None = None):
        """`validate(folder)` returns the adapter's summary or raises AdapterError/ValueError to refuse it.
        `public_model` is the model the public_dir adapters report (default: their config's
        base_model_name_or_path, else "")."""
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "finetunes"
        self.db_path = self.data_dir / "finetunes.sqlite3"
        self.validate = validate
        self.max_file_bytes, self.max_per_account = max_file_bytes, max_per_account
        self.public_dir = Path(public_dir) if public_dir is not None else None
        self.public_model = public_model
        self._lock = threading.Lock()                       # guards the two dicts below
        self._finetune_locks: dict[str, threading.Lock] = {}
        self._uploading: set[tuple[str, str]] = set()       # (finetune id, file name) being streamed
        self._public: dict[str, Finetune] = {}              # public_dir adapters by id
        self.root.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            if "error" not in {r["name"] for r in db.execute("PRAGMA table_info(finetunes)")}:
                db.execute("ALTER TABLE finetunes ADD COLUMN error TEXT")    # a data dir from before the column
        self.recover()

    # ---- queries -------------------------------------------------------------------------------

    def create(self, account_id: str, *, model: str, name: str, description: str = "",
               public: bool = False) -> Finetune:
        _check_name(name)
        if not isinstance(model, str) or not model:
            raise bad_input("'model' must be a non-empty string")
        if not isinstance(description, str) or not isinstance(public, bool):
            raise bad_input("'description' must be a string and 'public' a boolean")
        fid, ts = str(uuid.uuid4()), now_iso()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM finetunes WHERE account_id = ? AND name = ?", (account_id, name)).fetchone():
                raise bad_input(f"a finetune named {name!r} already exists in this account; names are unique "
                                "per account")
            (count,) = db.execute("SELECT COUNT(*) FROM finetunes WHERE account_id = ?", (account_id,)).fetchone()
            if count >= self.max_per_account:
                raise bad_input(f"this account has reached its limit of {self.max_per_account} finetunes; delete "
                                "one (DELETE /accounts/{account_id}/ai/finetunes/{id}) to create another")
            db.execute("INSERT INTO finetunes (id, account_id, name, model, description, public, created_at, "
                       "modified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (fid, account_id, name, model, description, int(public), ts, ts))
        # after the commit: a crash before this mkdir leaves a row without a folder, which recover() mends
        (self.root / fid).mkdir(exist_ok=True)
        _fsync_dir(self.root)
        return self._row_to_finetune(self._row(fid))

    def list(self, account_id: str) -> list[Finetune]:
        """The account's own finetunes, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM finetunes WHERE account_id = ? ORDER BY seq", (account_id,)).fetchall()
        return [self._row_to_finetune(r) for r in rows]

    def list_public(self) -> list[Finetune]:
        """The public_dir adapters (by name), then the public finetunes of every account, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM finetunes WHERE public = 1 ORDER BY seq").fetchall()
        return sorted(self._public.values(), key=lambda f: f.name) + [self._row_to_finetune(r) for r in rows]

    def get(self, account_id: str, id_or_name: str) -> Finetune:
        """The account's own finetune with this id or name; else a public one: a public_dir adapter by id
        or name, another account's public finetune by id only (names are unique per account only)."""
        with self._db() as db:
            row = self._own_row(db, account_id, id_or_name)
            if row is None:
                row = db.execute("SELECT * FROM finetunes WHERE id = ? AND public = 1", (id_or_name,)).fetchone()
        if row is not None:
            return self._row_to_finetune(row)
        public = self._public.get(id_or_name) or next(
            (f for f in self._public.values() if f.name == id_or_name), None)
        if public is None:
            raise not_found(id_or_name)
        return public

    def get_assets(self, account_id: str, id_or_name: str) -> list[Asset]:
        """The asset records of a finetune get() finds (files present on disk only), in ASSET_NAMES order."""
        f = self.get(account_id, id_or_name)
        if f.account_id == PUBLIC_ACCOUNT and f.id in self._public:
            return [Asset(public_folder.asset_id(f.name, n), f.id, n, BUCKET_NAME, f.created_at, f.modified_at)
                    for n in ASSET_NAMES]
        with self._db() as db:
            rows = {r["file_name"]: r for r in
                    db.execute("SELECT * FROM assets WHERE finetune_id = ?", (f.id,)).fetchall()}
        return [_row_to_asset(rows[n]) for n in ASSET_NAMES if n in f.assets and n in rows]

    # ---- uploads -------------------------------------------------------------------------------

    def put_asset(self, account_id: str, id_or_name: str, file_name: str,
                  data: BinaryIO | bytes) -> tuple[Finetune, Asset]:
        """Stores one of the two files of the account's own finetune; validates the adapter once both are
        there. Assets cannot be replaced (as in Workers AI): a refused adapter loses the file just sent."""
        if file_name not in ASSET_NAMES:
            raise bad_input(f"file_name {file_name!r} is not accepted; it must be one of "
                            f"{' or '.join(ASSET_NAMES)}")
        with self._db() as db:
            row = self._own_row(db, account_id, id_or_name)
        if row is None:
            raise not_found(id_or_name)
        fid, name = row["id"], row["name"]
        folder, final = self.root / fid, self.root / fid / file_name
        with self._lock:
            if (fid, file_name) in self._uploading:
                raise bad_input(f"an upload of {file_name} to finetune {name} is already in progress")
            if final.exists():
                raise _already_uploaded(file_name, name)
            self._uploading.add((fid, file_name))
        tmp = files.temp_path(folder, file_name)
        try:
            self._receive(tmp, data, file_name, id_or_name)
            with self._finetune_lock(fid):
                return self._commit(fid, name, file_name, tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._uploading.discard((fid, file_name))

    def _receive(self, tmp: Path, data: BinaryIO | bytes, file_name: str, id_or_name: str) -> None:
        """Streams `data` into `tmp` (fsynced), refusing it past max_file_bytes, then checks its format."""
        stream: Any = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            size = files.write_stream(tmp, stream, self.max_file_bytes)
        except FileNotFoundError:   # the folder went: deleted while we were resolving it
            raise not_found(id_or_name) from None
        except FileTooLarge:
            raise too_large(f"{file_name} is larger than the limit of {self.max_file_bytes} bytes "
                            f"({self.max_file_bytes / 2**20:g} MiB)") from None
        try:
            files.check_format(tmp, file_name, size)
        except FormatError as exc:
            raise bad_input(str(exc)) from None

    def _commit(self, fid: str, name: str, file_name: str, tmp: Path, final: Path) -> tuple[Finetune, Asset]:
        """Under the finetune's lock: publish the file, record it, validate if complete."""
        folder = final.parent
        with self._db() as db:
            if db.execute("SELECT 1 FROM finetunes WHERE id = ?", (fid,)).fetchone() is None:
                raise not_found(name)   # deleted while the file was streaming
        files.publish(tmp, final)
        ts = now_iso()
        with self._tx() as db:
            db.execute("DELETE FROM assets WHERE finetune_id = ? AND file_name = ?", (fid, file_name))
            db.execute("INSERT INTO assets (id, finetune_id, file_name, created_at, modified_at) "
                       "VALUES (?, ?, ?, ?, ?)", (str(uuid.uuid4()), fid, file_name, ts, ts))
            db.execute("UPDATE finetunes SET modified_at = ? WHERE id = ?", (ts, fid))
        if all((folder / n).is_file() for n in ASSET_NAMES):
            try:
                summary = str(self.validate(folder))
            except Exception as exc:
                self._drop_asset(fid, final)
                if isinstance(exc, ValueError):
                    other = next(n for n in ASSET_NAMES if n != file_name)
                    raise bad_input(f"adapter refused: {_scrub(str(exc), folder, name)} ({file_name} was not "
                                    f"kept: upload a corrected one; if {other} is at fault, create a new "
                                    "finetune, since assets cannot be replaced)") from None
                raise
            with self._tx() as db:
                db.execute("UPDATE finetunes SET summary = ?, error = NULL, modified_at = ? WHERE id = ?",
                           (summary, now_iso(), fid))
        finetune = self._row_to_finetune(self._row(fid))
        with self._db() as db:
            asset = db.execute("SELECT * FROM assets WHERE finetune_id = ? AND file_name = ?",
                               (fid, file_name)).fetchone()
        return finetune, _row_to_asset(asset)

    def _drop_asset(self, fid: str, path: Path) -> None:
        files.remove(path)
        with self._tx() as db:
            db.execute("DELETE FROM assets WHERE finetune_id = ? AND file_name = ?", (fid, path.name))
            db.execute("UPDATE finetunes SET summary = NULL, modified_at = ? WHERE id = ?", (now_iso(), fid))

    # ---- delete --------------------------------------------------------------------------------

    def delete(self, account_id: str, id_or_name: str, *,
               in_use: Callable[[str], bool] = lambda fid: False) -> Finetune:
        """Deletes the account's own finetune unless `in_use(id)` (a bool, or a count of requests)."""
        with self._db() as db:
            row = self._own_row(db, account_id, id_or_name)
        if row is None:
            raise not_found(id_or_name)
        fid = row["id"]
        with self._finetune_lock(fid):
            row = self._row(fid)
            if row is None:   # a concurrent delete won
                raise not_found(id_or_name)
            finetune = self._row_to_finetune(row)
            busy = in_use(fid)
            if busy:
                n = (f"{busy} request{'s' if busy != 1 else ''}" if type(busy) is int
                     else "requests in flight")
                raise bad_input(f"finetune {finetune.name} is in use by {n}; retry when they finish")
            folder, trash = self.root / fid, self.root / f"{_TRASH_PREFIX}{fid}.{uuid.uuid4().hex}"
            if folder.exists():
                os.rename(folder, trash)     # the commit point: recover() finishes the rest after a crash
                _fsync_dir(self.root)
            self._forget(fid)
            shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._finetune_locks.pop(fid, None)
        return finetune

    def _forget(self, fid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM assets WHERE finetune_id = ?", (fid,))
            db.execute("DELETE FROM finetunes WHERE id = ?", (fid,))

    # ---- startup -------------------------------------------------------------------------------

    def recover(self) -> None:
        """Mends what a crash can leave: finishes interrupted deletes, removes temp files of uploads,
        re-creates missing asset records (the files decide), validates complete but unvalidated
        adapters, and (re)loads the public_dir adapters."""
        with self._db() as db:
            ids = {r["id"] for r in db.execute("SELECT id FROM finetunes").fetchall()}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(_TRASH_PREFIX):
                fid = entry.name[len(_TRASH_PREFIX):].split(".")[0]
                if fid in ids:
                    log.info("finishing the interrupted delete of finetune %s", fid)
                    self._forget(fid)
                    ids.discard(fid)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and entry.name not in ids:
                if not any((entry / n).exists() for n in ASSET_NAMES):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    log.warning("finetune folder %s has adapter files but no database record; left alone", entry)
        for fid in sorted(ids):
            self._recover_one(fid)
        self._public = self._scan_public()

    def _recover_one(self, fid: str) -> None:
        folder = self.root / fid
        folder.mkdir(exist_ok=True)
        for tmp in folder.glob(f"{files.TEMP_PREFIX}*"):
            log.info("removing %s, left by an interrupted upload", tmp)
            tmp.unlink(missing_ok=True)
        present = [n for n in ASSET_NAMES if (folder / n).is_file()]
        with self._tx() as db:
            recorded = {r["file_name"] for r in
                        db.execute("SELECT file_name FROM assets WHERE finetune_id = ?", (fid,)).fetchall()}
            for n in recorded - set(present):
                db.execute("DELETE FROM assets WHERE finetune_id = ? AND file_name = ?", (fid, n))
            for n in set(present) - recorded:
                ts = _mtime_iso(folder / n)
                db.execute("INSERT INTO assets (id, finetune_id, file_name, created_at, modified_at) "
                           "VALUES (?, ?, ?, ?, ?)", (str(uuid.uuid4()), fid, n, ts, ts))
            if len(present) < len(ASSET_NAMES):
                db.execute("UPDATE finetunes SET summary = NULL WHERE id = ? AND summary IS NOT NULL", (fid,))
        row = self._row(fid)
        if len(present) < len(ASSET_NAMES) or row["summary"] is not None:
            return
        try:
            summary = str(self.validate(folder))
        except ValueError as exc:
            # as put_asset would have done: drop the file written last, so a corrected one can be sent; the
            # finetune says why until then (validation is bounded, gemlora.lora.patterns: it cannot hang here)
            newest = max((folder / n for n in ASSET_NAMES), key=lambda p: p.stat().st_mtime_ns)
            log.warning("finetune %s (%s): adapter refused on recovery, removing %s: %s", row["name"], fid,
                        newest.name, exc)
            self._drop_asset(fid, newest)
            self._set_error(fid, f"its adapter was refused: {_scrub(str(exc), folder, row['name'])} "
                                 f"({newest.name} was removed: upload a corrected one)")
            return
        except Exception as exc:   # not a refusal (e.g. an I/O error): keep the files, try again next startup
            log.exception("finetune %s (%s): could not validate its adapter; it stays unready", row["name"], fid)
            self._set_error(fid, f"its adapter could not be checked when the server started ({type(exc).__name__}); "
                                 "the server retries at its next start")
            return
        with self._tx() as db:
            db.execute("UPDATE finetunes SET summary = ?, error = NULL WHERE id = ?", (summary, fid))

    def _set_error(self, fid: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE finetunes SET error = ? WHERE id = ?", (error, fid))

    def _scan_public(self) -> dict[str, Finetune]:
        return {a.id: Finetune(id=a.id, account_id=PUBLIC_ACCOUNT, name=a.name, model=a.model, description="",
                               public=True, created_at=a.timestamp, modified_at=a.timestamp,
                               assets=frozenset(ASSET_NAMES), path=a.folder, summary=a.summary)
                for a in public_folder.scan(self.public_dir, self.validate, self.public_model)}

    # ---- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _finetune_lock(self, fid: str) -> threading.Lock:
        with self._lock:
            return self._finetune_locks.setdefault(fid, threading.Lock())

    def _row(self, fid: str) -> sqlite3.Row | None:
        with self._db() as db:
            return db.execute("SELECT * FROM finetunes WHERE id = ?", (fid,)).fetchone()

    @staticmethod
    def _own_row(db: sqlite3.Connection, account_id: str, id_or_name: str) -> sqlite3.Row | None:
        """By id first, then by name."""
        return db.execute("SELECT * FROM finetunes WHERE account_id = ? AND (id = ? OR name = ?) "
                          "ORDER BY id = ? DESC LIMIT 1", (account_id, id_or_name, id_or_name, id_or_name)).fetchone()

    def _row_to_finetune(self, row: sqlite3.Row) -> Finetune:
        path = self.root / row["id"]
        return Finetune(id=row["id"], account_id=row["account_id"], name=row["name"], model=row["model"],
                        description=row["description"], public=bool(row["public"]), created_at=row["created_at"],
                        modified_at=row["modified_at"],
                        assets=frozenset(n for n in ASSET_NAMES if (path / n).is_file()),
                        path=path, summary=row["summary"], error=row["error"])


def _row_to_asset(row: sqlite3.Row) -> Asset:
    return Asset(id=row["id"], finetune_id=row["finetune_id"], file_name=row["file_name"], bucket_name=BUCKET_NAME,
                 created_at=row["created_at"], modified_at=row["modified_at"])


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise bad_input(f"name {name!r} is not valid: use 1 to 64 letters, digits, '-', '_' or '.'")
    if name.lower().startswith(RESERVED_PREFIX):
        raise bad_input(f"name {name!r} is not valid: the prefix {RESERVED_PREFIX!r} is reserved")
    try:
        uuid.UUID(name)
    except ValueError:
        return
    raise bad_input(f"name {name!r} is not valid: a name cannot look like a finetune id (a UUID)")


def _already_uploaded(file_name: str, name: str) -> FinetuneError:
    return bad_input(f"{file_name} was already uploaded to finetune {name}; assets cannot be replaced; "
                     "create a new finetune")


def _scrub(message: str, folder: Path, name: str) -> str:
    """The validator's message without our server's paths."""
    return message.replace(f"{folder}{os.sep}", "").replace(str(folder), f"finetune {name}")
