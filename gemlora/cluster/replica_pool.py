"""ReplicaPool: the engine replicas, as the HTTP API sees one engine.

The app (gemlora.api) asks an engine for its model's config, context window and tokenizer, its stats,
health and adapter counters, and to shut down. Here those come from the model folder itself (read once;
the same numbers every replica computes) and from the Board, which every replica posts to each
second: stats are summed over the replicas that posted recently, health is up while one of them steps.
Generation goes through RemoteGeneration, not through this object. Knows the Board and the engine's
read-only nouns; nothing of HTTP.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import fields
from pathlib import Path

import ray

from gemlora.cluster.board import NAME as BOARD, NAMESPACE
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import EngineHealth
from gemlora.engine.engine import EngineStats, kv_blocks_and_window
from gemlora.model.loader import load_config, quantizes
from gemlora.text.tokenizer import Tokenizer

log = logging.getLogger("gemlora.cluster")


class ClusterAdapters:
    """The adapter-registry counters the metrics read, summed over the replicas."""

    def __init__(self, pool: ReplicaPool):
        self._pool = pool

    def _sum(self, key: str) -> float:
        return sum(n[key] for n in self._pool.replica_numbers().values())

    @property
    def num_loaded(self) -> int:
        return int(self._sum("ram_adapters"))

    @property
    def loads(self) -> int:
        return int(self._sum("ram_loads"))

    @property
    def load_seconds(self) -> float:
        return self._sum("load_seconds")



class ReplicaPool:
    def __init__(self, config: EngineConfig, model_dir: Path, num_replicas: int):
        self.config = config
        self.model_config = load_config(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        dtype = config.activation_dtype(quantizes(model_dir, config.quantization))
        _, self.max_model_len = kv_blocks_and_window(self.model_config, config, config.kv_torch_dtype(dtype))
        self.num_replicas = num_replicas
        self.registry = ClusterAdapters(self)
        self.adapter_requests: Counter[str] = Counter()      # finetune id -> requests in flight on it
        self._board = ray.get_actor(BOARD, namespace=NAMESPACE)
        self._numbers: dict[str, dict] = {}
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_board, name="gemlora-board-read", daemon=True)
        self._reader.start()

    def _read_board(self) -> None:
        while True:
            try:
                self._numbers = ray.get(self._board.read.remote(), timeout=5)
            except Exception:
                log.exception("reading the replicas' numbers failed")
                self._numbers = {}
            if self._stop.wait(1.0):
                return

    def replica_numbers(self) -> dict[str, dict]:
        """{replica id: its latest numbers} of the replicas that posted in the last seconds."""
        return dict(self._numbers)

    def stats(self) -> EngineStats:
        posted = [n["stats"] for n in self.replica_numbers().values()]
        return EngineStats(**{f.name: sum(p[f.name] for p in posted) for f in fields(EngineStats)})

    def health(self) -> EngineHealth:
        states = [n["health"] for n in self.replica_numbers().values()]
        stepping = [s for s in states if s["stepping"]]
        detail = (f"{len(stepping)} of {self.num_replicas} engine replicas stepping" if states
                  else "no engine replica has reported yet")
        return EngineHealth(bool(states), bool(stepping), detail if stepping else detail + " (none stepping)",
                            sum(s["steps"] for s in states), None)

    def requests_on_adapter(self, adapter_id: str) -> int:
        """Requests in flight on the finetune, on any replica: every request passes through this ingress
        (RemoteGeneration counts them), so a finetune in use is refused deletion as in one process."""
        return self.adapter_requests[adapter_id]

    def remove_adapter(self, adapter_id: str) -> None:
        # Each replica finds a finetune through the shared store, which no longer has it: none can start
        # a request on it, and its weights leave the replicas' RAM through their LRUs.
        return None

    def shutdown(self) -> None:
        self._stop.set()
