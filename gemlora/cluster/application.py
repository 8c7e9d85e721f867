"""The Ray Serve application behind `gemlora serve --replicas N`.

An ingress deployment runs the same FastAPI app as one process (auth, schemas, the finetune store's
API, /metrics, /health) over a ReplicaPool, with generation sent to N EngineReplica replicas, each an
AsyncEngine with its own KV cache and adapter slots and its share of the CPUs (or a GPU). All read
one finetune store: on one machine, the shared `--data-dir` (each replica opens the same SQLite file
and adapter folders). Without an address a local Ray cluster is started; with one, the application
joins it (every node must then see the same data directory, e.g. a network file system). Ray Serve
restarts a replica whose engine died (EngineReplica.check_health). Knows Ray Serve and the app's
builders; nothing of KV blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.cluster.affinity_router import AdapterAffinityRouter
from gemlora.cluster.board import NAME as BOARD, NAMESPACE, Board
from gemlora.cluster.remote_generation import RemoteGeneration
from gemlora.cluster.replica import EngineReplica
from gemlora.cluster.replica_pool import ReplicaPool
from gemlora.cluster.round_robin_router import RoundRobinRouter
from gemlora.config import EngineConfig
from gemlora.model.source import resolve_model_dir

log = logging.getLogger("gemlora.cluster")
APP_NAME = "gemlora"


@serve.ingress()
class Ingress:
    def __init__(self, replicas, config: EngineConfig, settings: ServerSettings, auth: Auth, num_replicas: int):
        self.pool = ReplicaPool(config, Path(config.model), num_replicas)
        self.asgi_app = create_app(self.pool, settings, auth,
                              generation=lambda store: RemoteGeneration(self.pool, store, replicas,
                                                                       settings.tool_format))

    def __serve_build_asgi_app__(self):
        return self.asgi_app


# --replica-routing: adapter affinity (ours), Ray Serve's default (power of two choices, preferring replicas
# that hold the adapter; loads adapters more often under many adapters), or blind round-robin (a baseline).
ROUTERS = {"affinity": AdapterAffinityRouter, "ray": None, "round-robin": RoundRobinRouter}


def serve_replicas(config: EngineConfig, settings: ServerSettings, auth: Auth, num_replicas: int,
                   address: str | None, host: str, port: int, routing: str = "affinity") -> None:
    """Deploy and serve until SIGINT / SIGTERM."""
    router = ROUTERS[routing]
    model_dir = resolve_model_dir(config.model)       # converted once here, before any replica loads it
    # Ray Serve's 5-10 s readiness checks fail on a small, busy machine while models load: give them a minute.
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S",
                 "RAY_SERVE_PROXY_GRACEFUL_SHUTDOWN_TIMEOUT_S"):
        os.environ.setdefault(name, "60")
    # A request for an adapter no replica has reported yet waits this long (1-2x) for the replica that
    # is loading it to report, before any replica may take it: Ray's 1 s default is shorter than a
    # report takes on a busy small machine, and each miss is one more load of the adapter.
    os.environ.setdefault("RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S", "5")
    # The router probes a replica's queue length before sending; an engine replica's event loop shares
    # the GIL with its engine thread and can take longer than Ray's 0.1 s to answer, and a late answer
    # counts as busy, which sends the request (and its adapter) to another replica.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1")
    os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5")
    config = dataclasses.replace(config, model=str(model_dir))
    if address:
        ray.init(address=address, namespace=NAMESPACE)
    else:
        ray.init(num_cpus=os.cpu_count(), namespace=NAMESPACE, include_dashboard=False)
    cpus = ray.cluster_resources().get("CPU", 1)
    replica_cpus = max(1.0, cpus // num_replicas)
    # kept referenced until the end: an actor no one references is collected
    board = ray.remote(Board).options(name=BOARD, namespace=NAMESPACE, num_cpus=0, get_if_exists=True).remote()
    serve.start(http_options={"host": host, "port": port})
    replicas = serve.deployment(EngineReplica).options(
        num_replicas=num_replicas, max_ongoing_requests=2 * config.max_num_seqs,
        ray_actor_options={"num_cpus": replica_cpus}, health_check_period_s=5, health_check_timeout_s=30,
        **({"request_router_config": RequestRouterConfig(request_router_class=router)} if router else {}))
    ingress = serve.deployment(Ingress).options(num_replicas=1, max_ongoing_requests=4096,
                                                 ray_actor_options={"num_cpus": 0})
    serve.run(ingress.bind(replicas.bind(config, settings), config, settings, auth, num_replicas),
              name=APP_NAME, route_prefix="/", blocking=False)
    log.warning("serving %s on http://%s:%d through %d engine replicas (%.0f CPUs each, %s routing)",
                ", ".join(settings.model_names), host, port, num_replicas, replica_cpus, routing)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    del board
    ray.shutdown()
