"""RoundRobinRouter: Ray Serve's request-router API, sending requests to the engine replicas in turn,
blind to adapters and load. Not a choice for serving: the baseline that bench/routing.py measures
adapter affinity against (`gemlora serve --replicas N --replica-routing round-robin`). Knows Ray Serve's
router API only.
"""

from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RoundRobinRouter(RequestRouter):
    def initialize_state(self, **kwargs):
        self._next = 0

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self._next += 1
        # The turn's replica first; the others only when it has no room, as Ray tries ranks in order.
        turn = ordered[self._next % len(ordered)]
        return [[turn], [r for r in ordered if r is not turn]]
