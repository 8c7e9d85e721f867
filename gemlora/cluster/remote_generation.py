"""RemoteGeneration: TextGeneration's `stream` for the ingress, run on an engine replica.

The finetune a request names is looked up here first (the caller's, or a public one: the same errors
as one process gives), and its id becomes the request's `multiplexed_model_id`, so Ray Serve sends it
to a replica that already holds that adapter when one has room, and else to the least loaded one,
which loads it. Base-model requests carry no id and balance by queue length. The replica validates
and generates exactly as TextGeneration does in one process; its errors (ApiError before the first
chunk, EngineError later) come back unwrapped from Ray's. Closing the stream cancels the remote call,
which aborts the request in its engine. Requests in flight are counted per finetune (in the pool) from
before they are routed until they end, so deleting a finetune in use is refused as in one process.
Knows Ray Serve handles and TextGeneration's contract.
"""

from __future__ import annotations

from collections import Counter
from typing import AsyncIterator

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from gemlora.api.output_reader import OutputReader
from gemlora.api.schemas import GenerateRequest
from gemlora.api.textgen import chained, finetune_for
from gemlora.cluster.replica_pool import ReplicaPool
from gemlora.engine.async_engine import EngineDeadError, GenerationChunk
from gemlora.finetunes.store import FinetuneStore


class RemoteGeneration:
    def __init__(self, pool: ReplicaPool, store: FinetuneStore, replicas: DeploymentHandle,
                 tool_format: str | None = None):
        self.engine, self.store, self.replicas = pool, store, replicas
        self.outputs = OutputReader(pool.tokenizer, tool_format)      # the replicas' outputs are read here

    async def stream(self, account: str, req: GenerateRequest, request_id: str) -> AsyncIterator[GenerationChunk]:
        finetune_id = (await finetune_for(self.store, account, req.lora)).id if req.lora is not None else ""
        handle = self.replicas.options(stream=True, multiplexed_model_id=finetune_id)
        chunks = _counted(self.engine.adapter_requests, finetune_id,
                          _unwrapped(handle.generate.remote(account, req, request_id)))
        first = await chunks.__anext__()
        return chained(first, chunks)


async def _counted(requests: Counter[str], finetune_id: str, chunks: AsyncIterator[GenerationChunk]):
    """`chunks`, counted in `requests[finetune_id]` from now until they end (a finetune in use is not deleted)."""
    requests[finetune_id] += 1
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        requests[finetune_id] -= 1
        if requests[finetune_id] <= 0:
            del requests[finetune_id]
        await chunks.aclose()


async def _unwrapped(remote) -> AsyncIterator[GenerationChunk]:
    try:
        async for chunk in remote:
            yield chunk
    except RayTaskError as exc:          # the replica's own exception (ApiError, EngineError, ...)
        raise exc.cause from None
    except Exception as exc:
        if type(exc).__module__.startswith("ray."):     # the replica died or could not be reached
            raise EngineDeadError(f"engine replica unavailable: {exc}") from exc
        raise
    finally:
        remote.cancel()
