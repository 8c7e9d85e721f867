"""EngineReplica: what one Ray Serve replica of the engine deployment runs.

One AsyncEngine (its own KV cache and adapter slots) with the TextGeneration of a single-process server
over the shared finetune store, so a request behaves exactly as it does there. The ingress routes a
request for an adapter with Ray Serve's multiplexing (`multiplexed_model_id` = the finetune's id):
`adapter` is the multiplexed loader (made in __init__: the engine's RAM tier sets its size), so Ray
knows which replica holds which adapter and sends later requests for it there; the engine's own
registry (RAM, LRU) and slots hold the weights. Every second
the replica posts its numbers to the Board. Knows Ray Serve, the engine and TextGeneration; nothing of
HTTP.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from typing import AsyncIterator

import ray
from ray import serve

from gemlora.api.app import ServerSettings, finetune_store
from gemlora.api.schemas import GenerateRequest
from gemlora.api.textgen import TextGeneration
from gemlora.cluster.board import NAME as BOARD, NAMESPACE
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine, GenerationChunk

log = logging.getLogger("gemlora.cluster")


class EngineReplica:
    def __init__(self, config: EngineConfig, settings: ServerSettings):
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncEngine.from_config(config, progress=False).start()
        self.textgen = TextGeneration(self.engine, finetune_store(self.engine, settings), settings.tool_format)
        # Ray's own LRU of the adapters this replica holds, as large as the engine's RAM tier, so that Ray
        # routes to a replica for an adapter while the engine still holds it.
        self.adapter = serve.multiplexed(max_num_models_per_replica=config.max_cpu_loras)(_hold_adapter)
        self.board = ray.get_actor(BOARD, namespace=NAMESPACE)
        self._stop = threading.Event()
        threading.Thread(target=self._post_numbers, name="gemlora-board-post", daemon=True).start()
        log.info("replica %s serving (pid %d)", self.replica, os.getpid())

    async def generate(self, account: str, req: GenerateRequest, request_id: str) -> AsyncIterator[GenerationChunk]:
        finetune_id = serve.get_multiplexed_model_id()
        if finetune_id:
            await self.adapter(finetune_id)
        chunks = await self.textgen.stream(account, req, request_id)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()          # the caller left (Ray cancels the stream): abort in the engine

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a replica whose engine loop died is restarted."""
        health = self.engine.health()
        if not health.alive:
            raise RuntimeError(f"engine replica {self.replica}: {health.detail}")

    def numbers(self) -> dict:
        stats, registry, health = self.engine.stats(), self.engine.registry, self.engine.health()
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "stats": dataclasses.asdict(stats), "health": dataclasses.asdict(health),
                "ram_adapters": registry.num_loaded, "ram_loads": registry.loads,
                "load_seconds": registry.load_seconds}

    def _post_numbers(self) -> None:
        while not self._stop.wait(1.0):
            try:
                ray.get(self.board.post.remote(self.replica, self.numbers()), timeout=5)
            except Exception:          # a lost board must not end the replica; the ingress sees it stale
                log.exception("replica %s: posting numbers failed", self.replica)

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()
        if hasattr(self, "engine"):
            self.engine.shutdown()


async def _hold_adapter(finetune_id: str) -> str:
    """Ray Serve's multiplexed loader: the weights are loaded (from the shared store, for the request's
    account) by TextGeneration; this marks the adapter as this replica's for Ray's routing."""
    return finetune_id
