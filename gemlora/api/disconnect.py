"""Non-streaming generations that end when their client leaves.

Starlette cancels nothing when a client disconnects during a plain (non-streaming) handler, so a
generation nobody will read would hold its KV blocks and adapter until `max_tokens`. `collect` reads
a generation to its end while a watcher waits for the ASGI `http.disconnect` message (as vLLM's
`with_cancellation` does); whichever comes first wins, and a departed client's generation is
closed at once, which aborts it in the engine. Knows ASGI requests and chunk streams only.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request

from gemlora.api.metrics import RequestRecord
from gemlora.engine.async_engine import GenerationChunk


class ClientDisconnected(Exception):
    """The client went away before its response was ready (logged as status 499)."""


async def collect(request: Request, chunks: AsyncIterator[GenerationChunk], record: RequestRecord) -> str:
    """The whole generated text, or ClientDisconnected once the client has left (its request aborted)."""
    async def read() -> str:
        try:
            return "".join([record.chunk(chunk).text async for chunk in chunks])
        finally:
            await chunks.aclose()          # also when cancelled: the engine aborts the request now

    work = asyncio.ensure_future(read())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        record.done()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn sends it when the
    # connection closes).
    while (await request.receive())["type"] != "http.disconnect":
        pass
