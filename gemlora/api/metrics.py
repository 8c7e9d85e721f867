"""Prometheus metrics of the server: requests by route and status, tokens, time to first token and
per output token, queue length, KV blocks, prefix-cache lookups and hits, resident adapters per tier,
adapter loads; behind `--replicas`, also per engine replica (`gemlora_replica_*{replica=...}`). The engine's numbers are read by a collector when scraped, so the engine never calls
in here."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gemlora.engine.async_engine import AsyncEngine, GenerationChunk

log = logging.getLogger("gemlora.api")

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine: AsyncEngine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gemlora_requests", "HTTP requests", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gemlora_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("gemlora_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gemlora_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("gemlora_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2), registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record(self, request_id: str, account: str, adapter: str | None) -> RequestRecord:
        return RequestRecord(self, request_id, account, adapter)


class RequestRecord:
    """One generation's timings and tokens: fed every chunk, closed with `done()` (metrics + log line)."""

    def __init__(self, metrics: Metrics, request_id: str, account: str, adapter: str | None):
        self.metrics, self.request_id, self.account, self.adapter = metrics, request_id, account, adapter
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: GenerationChunk | None = None
        self._done = False

    def chunk(self, chunk: GenerationChunk) -> GenerationChunk:
        if self.first is None and chunk.token_ids:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.start)
            self.metrics.prompt_tokens.inc(chunk.prompt_tokens)
        self.metrics.generated_tokens.inc(len(chunk.token_ids))
        self.last = chunk
        return chunk

    def done(self) -> None:
        """Idempotent; a stream the client left is logged with what it had got so far."""
        end, last = time.perf_counter(), self.last
        if last is None or self._done:
            return
        self._done = True
        if self.first is not None and last.completion_tokens > 1:
            self.metrics.tpot.observe((end - self.first) / (last.completion_tokens - 1))
        ttft = (self.first - self.start) if self.first is not None else float("nan")
        log.info("generated request=%s account=%s adapter=%s prompt_tokens=%d cached_tokens=%d "
                 "completion_tokens=%d finish=%s ttft=%.3fs total=%.3fs", self.request_id, self.account,
                 self.adapter or "-", last.prompt_tokens, last.cached_tokens, last.completion_tokens,
                 last.finish_reason.value if last.finished else "client-left", ttft, end - self.start)


class _EngineCollector:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        stats, registry = self.engine.stats(), self.engine.registry
        for name, doc, value in (("gemlora_queue_length", "Requests waiting", stats.waiting),
                                 ("gemlora_running_requests", "Requests running", stats.running),
                                 ("gemlora_kv_blocks_used", "KV cache blocks in use", stats.kv_blocks_used),
                                 ("gemlora_kv_blocks_free", "KV cache blocks free", stats.kv_blocks_free),
                                 ("gemlora_prefix_cache_blocks", "KV cache blocks holding a reusable prefix",
                                  stats.kv_blocks_cached),
                                 ("gemlora_engine_up", "1 while the engine loop runs and steps",
                                  int(self.engine.health().stepping))):
            yield GaugeMetricFamily(name, doc, value=value)
        resident = GaugeMetricFamily("gemlora_adapters_resident", "Adapters held, per tier", labels=["tier"])
        resident.add_metric(["slot"], stats.adapters_in_slots)
        resident.add_metric(["ram"], registry.num_loaded)
        yield resident
        loads = CounterMetricFamily("gemlora_adapter_loads", "Adapter loads, per tier", labels=["tier"])
        loads.add_metric(["slot"], stats.adapter_slot_loads)
        loads.add_metric(["ram"], registry.loads)
        yield loads
        seconds = CounterMetricFamily("gemlora_adapter_load_seconds", "Time spent validating and loading adapters")
        seconds.add_metric([], registry.load_seconds)
        yield seconds
        for name, doc, value in (("gemlora_engine_steps", "Engine steps run", stats.steps),
                                 ("gemlora_engine_failed_steps", "Engine steps that raised (their batch failed)",
                                  stats.failed_steps),
                                 ("gemlora_preemptions", "Requests preempted for KV blocks", stats.preemptions),
                                 ("gemlora_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  stats.prefix_cache_queries),
                                 ("gemlora_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  stats.prefix_cache_hits),
                                 ("gemlora_spec_decode_draft_tokens", "Draft tokens verified (prompt-lookup "
                                  "speculative decoding)", stats.spec_draft_tokens),
                                 ("gemlora_spec_decode_accepted_tokens", "Draft tokens verified and kept",
                                  stats.spec_accepted_tokens)):
            yield CounterMetricFamily(name, doc, value=value)
        per_replica = getattr(self.engine, "replica_numbers", None)     # engine replicas (gemlora.cluster)
        if per_replica is not None:
            yield from _per_replica(per_replica())


def _per_replica(numbers: dict[str, dict]):
    """The same numbers per engine replica, labelled by replica id (the unlabelled ones are their sums),
    and where each replica runs (host and process id), so an operator can find the process."""
    info = GaugeMetricFamily("gemlora_replica_info", "An engine replica's host and process id",
                             labels=["replica", "host", "pid"])
    for replica, n in sorted(numbers.items()):
        info.add_metric([replica, n["host"], str(n["pid"])], 1)
    yield info
    gauges = (("queue_length", "Requests waiting", lambda n: n["stats"]["waiting"]),
              ("running_requests", "Requests running", lambda n: n["stats"]["running"]),
              ("kv_blocks_used", "KV cache blocks in use", lambda n: n["stats"]["kv_blocks_used"]),
              ("kv_blocks_free", "KV cache blocks free", lambda n: n["stats"]["kv_blocks_free"]),
              ("adapters_in_slots", "Adapters in slots", lambda n: n["stats"]["adapters_in_slots"]),
              ("adapters_in_ram", "Adapters held in RAM", lambda n: n["ram_adapters"]))
    for name, doc, read in gauges:
        family = GaugeMetricFamily(f"gemlora_replica_{name}", doc + ", per engine replica", labels=["replica"])
        for replica, n in sorted(numbers.items()):
            family.add_metric([replica], read(n))
        yield family
    counters = (("adapter_loads", "Adapter loads from disk", lambda n: n["ram_loads"]),
                ("adapter_slot_loads", "Adapter loads into slots", lambda n: n["stats"]["adapter_slot_loads"]),
                ("engine_steps", "Engine steps run", lambda n: n["stats"]["steps"]))
    for name, doc, read in counters:
        family = CounterMetricFamily(f"gemlora_replica_{name}", doc + ", per engine replica", labels=["replica"])
        for replica, n in sorted(numbers.items()):
            family.add_metric([replica], read(n))
        yield family
