"""AdapterRegistry: which adapters exist, under which stable id and name, and which are held in RAM.

An adapter has a stable id apart from its name (Workers AI addresses a finetune by either), so a
re-upload under the same name is a different adapter. Adapters are validated when registered
and loaded (from their folder) into an LRU of at most `max_cpu_loras`; one with requests in flight
is never dropped, and unregistering it is refused until they finish (or, `when_idle`, it can no
longer be found at once and goes when its last request ends). `on_unregister` hears of every adapter
that is gone, so whoever caches its weights elsewhere (the engine's slots) can drop them. Thread-safe:
HTTP handlers and the engine thread both call in. Knows adapter files and counts; nothing of slots
or requests.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gemlora.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from gemlora.model.config import GemmaConfig


class UnknownAdapterError(KeyError):
    def __str__(self) -> str:
        return f"no adapter named or with id {self.args[0]!r}"


class AdapterInUseError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class AdapterRef:
    id: str
    name: str
    path: Path


class AdapterRegistry:
    def __init__(self, model_cfg: GemmaConfig, *, max_cpu_loras: int = 64, max_rank: int = 32,
                 max_file_bytes: int = 300 * 2**20):
        if max_cpu_loras < 1:
            raise ValueError("max_cpu_loras must be at least 1")
        self.model_cfg = model_cfg
        self.max_cpu_loras, self.max_rank, self.max_file_bytes = max_cpu_loras, max_rank, max_file_bytes
        self._lock = threading.RLock()
        self._by_id: dict[str, AdapterRef] = {}
        self._by_name: dict[str, AdapterRef] = {}
        self._loaded: OrderedDict[str, LoRAAdapter] = OrderedDict()   # id -> weights, LRU order
        self._in_flight: dict[str, int] = {}
        self._doomed: set[str] = set()      # unregistered while in flight: dropped at the last release
        self._loading: dict[str, threading.Lock] = {}   # per adapter id: one disk read at a time
        self.on_unregister: Callable[[str], None] | None = None
        self.loads = 0          # loads from disk, for metrics
        self.load_seconds = 0.0

    def register(self, path: str | Path, name: str | None = None, adapter_id: str | None = None) -> AdapterRef:
        """Validates the folder now (fail closed) and makes it addressable by id and name."""
        path = Path(path)
        adapter = self._load(path)          # raises AdapterError before anything is recorded
        ref = AdapterRef(adapter_id or uuid.uuid4().hex, name or path.name, path)
        with self._lock:
            if ref.name in self._by_name or ref.id in self._by_id:
                raise AdapterError(f"an adapter named {ref.name!r} or with id {ref.id!r} is already registered")
            self._by_id[ref.id] = self._by_name[ref.name] = ref
            self._remember(ref.id, adapter)
        return ref

    def ensure(self, path: str | Path, adapter_id: str) -> AdapterRef:
        """Register under `adapter_id` (also its name) unless it already is; safe to race."""
        with self._lock:
            ref = self._by_id.get(adapter_id)
        if ref is not None:
            return ref
        try:
            with self._load_lock(adapter_id):     # concurrent first requests read the files once
                with self._lock:
                    ref = self._by_id.get(adapter_id)
                return ref if ref is not None else self.register(path, name=adapter_id, adapter_id=adapter_id)
        except AdapterError:
            with self._lock:
                if adapter_id in self._by_id:      # a concurrent caller won the race
                    return self._by_id[adapter_id]
            raise

    def is_registered(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._by_id

    def register_folder(self, root: str | Path) -> list[AdapterRef]:
        """Every subfolder holding an adapter_config.json, named after the subfolder."""
        return [self.register(d) for d in sorted(Path(root).iterdir()) if (d / "adapter_config.json").is_file()]

    def resolve(self, name_or_id: str) -> AdapterRef:
        with self._lock:
            ref = self._by_id.get(name_or_id) or self._by_name.get(name_or_id)
        if ref is None:
            raise UnknownAdapterError(name_or_id)
        return ref

    def refs(self) -> list[AdapterRef]:
        with self._lock:
            return list(self._by_id.values())

    def acquire(self, name_or_id: str) -> tuple[AdapterRef, LoRAAdapter]:
        """Resolve and pin for one request (loading from disk if it left RAM); pair with release()."""
        with self._lock:
            ref = self.resolve(name_or_id)
            self._in_flight[ref.id] = self._in_flight.get(ref.id, 0) + 1
            adapter = self._loaded.get(ref.id)
            if adapter is not None:
                self._loaded.move_to_end(ref.id)
                return ref, adapter
        try:
            # outside the registry's lock: a disk read must not block other adapters' callers; under the
            # adapter's own, so that concurrent requests for it read it once
            with self._load_lock(ref.id):
                with self._lock:
                    adapter = self._loaded.get(ref.id)
                if adapter is None:
                    adapter = self._load(ref.path)
                    with self._lock:
                        self._remember(ref.id, adapter)
        except BaseException:
            self.release(ref)
            raise
        return ref, adapter

    def _load_lock(self, adapter_id: str) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(adapter_id, threading.Lock())

    def release(self, ref: AdapterRef) -> None:
        gone = False
        with self._lock:
            n = self._in_flight.get(ref.id, 0) - 1
            if n > 0:
                self._in_flight[ref.id] = n
            else:
                self._in_flight.pop(ref.id, None)
                if ref.id in self._doomed:
                    self._doomed.discard(ref.id)
                    self._loaded.pop(ref.id, None)
                    gone = True
                self._evict_over_limit()
        if gone:
            self._gone(ref)

    def in_flight(self, ref: AdapterRef) -> int:
        with self._lock:
            return self._in_flight.get(ref.id, 0)

    def unregister(self, name_or_id: str, *, when_idle: bool = False) -> AdapterRef:
        """Refused while requests use it, unless `when_idle`: then no new request can find it from
        now on, and it is dropped when the last one in flight releases it."""
        with self._lock:
            ref = self.resolve(name_or_id)
            busy = self._in_flight.get(ref.id)
            if busy and not when_idle:
                raise AdapterInUseError(f"adapter {ref.name!r} has {busy} requests in flight")
            del self._by_id[ref.id], self._by_name[ref.name]
            if busy:
                self._doomed.add(ref.id)
                return ref
            self._loaded.pop(ref.id, None)
        self._gone(ref)
        return ref

    def _gone(self, ref: AdapterRef) -> None:
        with self._lock:
            self._loading.pop(ref.id, None)
        if self.on_unregister is not None:
            self.on_unregister(ref.id)

    @property
    def num_loaded(self) -> int:
        with self._lock:
            return len(self._loaded)

    def _load(self, path: Path) -> LoRAAdapter:
        start = time.perf_counter()
        adapter = load_adapter(path, self.model_cfg, max_rank=self.max_rank, max_file_bytes=self.max_file_bytes)
        self.loads += 1
        self.load_seconds += time.perf_counter() - start
        return adapter

    def _remember(self, adapter_id: str, adapter: LoRAAdapter) -> None:
        self._loaded[adapter_id] = adapter
        self._loaded.move_to_end(adapter_id)
        self._evict_over_limit()

    def _evict_over_limit(self) -> None:
        for adapter_id in list(self._loaded):
            if len(self._loaded) <= self.max_cpu_loras:
                return
            if not self._in_flight.get(adapter_id):
                del self._loaded[adapter_id]
