"""AdapterAffinityRouter: Ray Serve's request-router API, ranking engine replicas by the adapter a request
names (its `multiplexed_model_id`, the finetune id).

First the replicas that report the adapter resident; while none does yet, the replica it was last sent to
(a replica reports what it holds a moment after loading it: without this, concurrent first requests for a
new adapter would each load it somewhere else); then the replicas holding the fewest adapters; then all.
Ray's router probes the queue lengths within a rank and sends the request to the least loaded replica of
the first rank that has room, so an adapter's replica takes its requests until it is full, and then the
least loaded other replica takes (and loads) it. Base-model requests rank every replica alike: the least
loaded wins. Knows Ray Serve's router API only.
"""

from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, ReplicaResult, RequestRouter
from ray.serve.request_router import RunningReplica


class AdapterAffinityRouter(MultiplexMixin, RequestRouter):
    def initialize_state(self, **kwargs):
        self._sent_to: dict[str, ReplicaID] = {}       # adapter -> the replica its last request went to

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter:
            return [candidate_replicas]
        resident, fewest, others = self.rank_replicas_via_multiplex(candidate_replicas, adapter)
        ranks = [resident]
        if not resident:
            # Decided here, not when routed: concurrent first requests for an adapter choose at once.
            chosen = self._sent_to.get(adapter)
            if chosen is None and fewest:
                chosen = min(fewest, key=self._queue_len).replica_id
                self._sent_to[adapter] = chosen
            ranks.append([r for r in candidate_replicas if r.replica_id == chosen])
        ranks += [fewest, others]
        return [rank for rank in ranks if rank]

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            self._sent_to[adapter] = replica_id

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self._sent_to = {a: r for a, r in self._sent_to.items() if r != replica_id}
