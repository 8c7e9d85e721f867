"""OpenAI-compatible routes: chat completions, completions and models, streamed or not.

    POST /v1/chat/completions     POST /v1/completions     GET /v1/models
(also under /client/v4/accounts/{account_id}/ai/, as Workers AI mounts them). `model` is a served
model name, or one of the caller's finetunes by name or id; an extra `lora` body field also picks
one. Errors use OpenAI's `{"error": {...}}` body. Knows HTTP and TextGeneration; not the engine.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gemlora.api.disconnect import collect
from gemlora.api.errors import ApiError, bad_input
from gemlora.api.openai_logprobs import Logprobs
from gemlora.api.openai_schemas import parse_chat_completion, parse_completion
from gemlora.api.schemas import GenerateRequest
from gemlora.api.streaming import DONE, openai_usage, sse
from gemlora.api.textgen import engine_failure
from gemlora.api.tools import openai_calls
from gemlora.engine.async_engine import EngineError
from gemlora.finetunes.finetune import FinetuneError
from gemlora.sampling import InvalidRequestError

router = APIRouter()


def _account(request: Request) -> str:
    return request.app.state.ctx.auth.account(request.headers.get("authorization"),
                                              request.path_params.get("account_id"))


async def _with_model(ctx, account: str, model: str, req: GenerateRequest) -> GenerateRequest:
    """A finetune given as `model` becomes the request's adapter."""
    if model in ctx.settings.model_names:
        return req
    if req.lora is None:
        try:
            await asyncio.to_thread(ctx.store.get, account, model)
        except FinetuneError as exc:
            raise ApiError(404, 404, f"The model `{model}` does not exist", param="model") from exc
        return GenerateRequest(**{**req.__dict__, "lora": model})
    raise ApiError(5006, 400, f"`model` must be a base model ({', '.join(ctx.settings.model_names)}) when `lora` "
                              "names the adapter", param="model")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _complete(request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request):
    return await _complete(request, chat=False)


async def _complete(request: Request, chat: bool):
    ctx = request.app.state.ctx
    account = _account(request)
    parse = parse_chat_completion if chat else parse_completion
    # pydantic and the body walk off the event loop: a large body must not stall other streams
    model, req = await asyncio.to_thread(parse, await request.body(), max_length=ctx.settings.max_input_length)
    req = await _with_model(ctx, account, model, req)
    record = ctx.metrics.record(request.state.request_id, account, req.lora)
    chunks = await ctx.textgen.stream(account, req, request.state.request_id)
    oid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    logprobs = Logprobs(ctx.textgen.engine.tokenizer, chat) if req.params.logprobs is not None else None
    if req.stream:
        tools = ctx.textgen.outputs.stream(req)
        finish = functools.partial(ctx.textgen.outputs.finish_stream, req, tools) if tools is not None else None
        return StreamingResponse(_stream(chunks, record, oid, created, model, chat, req.include_usage, logprobs,
                                         tools, finish),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})
    kept: list = []
    content = await collect(request, _keeping_logprobs(chunks, kept), record)
    last = record.last
    content, calls = ctx.textgen.outputs.read(req, content, last.finish_reason)
    rendered = logprobs.render(kept) if logprobs is not None else None
    if chat:
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = openai_calls(calls)
        choice = {"index": 0, "message": message}
    else:
        choice = {"index": 0, "text": content, "logprobs": rendered}
    if chat and logprobs is not None:
        choice["logprobs"] = rendered
    choice["finish_reason"] = "tool_calls" if calls else _finish(last)
    return {"id": oid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice],
            "usage": openai_usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)}


async def _keeping_logprobs(chunks, kept: list):
    """The chunks, passed on, with their logprobs gathered into `kept`."""
    try:
        async for chunk in chunks:
            kept.extend(chunk.logprobs or ())
            yield chunk
    finally:
        await chunks.aclose()


async def _stream(chunks, record, oid, created, model, chat, include_usage, logprobs: Logprobs | None,
                  tools=None, finish_tools=None):
    """`tools` (a ToolStream) holds calls back; `finish_tools(finish_reason)` gives (text, calls) at the end,
    sent as one delta per call (id, name and the whole arguments), as the openai SDK assembles them."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    pending: list = []     # logprobs of tokens whose text has not been sent yet (held back by the detokenizer)

    def frame(text: str | None, finish: str | None, first: bool = False, calls=None) -> bytes:
        rendered = None
        if logprobs is not None:
            rendered = logprobs.render(pending) if pending or not chat else None
            pending.clear()
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            if calls:
                delta["tool_calls"] = calls
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if rendered is not None:
                choice["logprobs"] = rendered
        else:
            choice = {"index": 0, "text": text or "", "logprobs": rendered, "finish_reason": finish}
        return sse({"id": oid, "object": obj, "created": created, "model": model, "choices": [choice]})

    first = True
    try:
        async for chunk in chunks:
            pending.extend(chunk.logprobs or ())
            text = record.chunk(chunk).text
            if text and tools is not None:
                text = tools.push(text)
            if text or first:
                yield frame(text, None, first)
                first = False
        last = record.last
        finish = _finish(last)
        if tools is not None:
            rest, calls = finish_tools(last.finish_reason)
            if rest:
                yield frame(rest, None)
            for i, call in enumerate(openai_calls(calls)):
                yield frame(None, None, calls=[{"index": i, **call}])
            finish = "tool_calls" if calls else finish
        yield frame(None, finish)
        if include_usage:
            yield sse({"id": oid, "object": obj, "created": created, "model": model, "choices": [],
                       "usage": openai_usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)})
    except EngineError as exc:   # the status line is sent: the error goes in the stream, as vLLM does
        yield sse(engine_failure(exc).openai_body())
    except InvalidRequestError as exc:     # refused mid-way (a schema the output cannot follow further)
        yield sse(bad_input(str(exc), exc.field).openai_body())
    except ApiError as exc:                # calls cut short (a stop string): said in the stream
        yield sse(exc.openai_body())
    finally:
        await chunks.aclose()    # a client that left aborts the request now, not when GC gets to it
        record.done()
    yield DONE


def _finish(chunk) -> str:
    return "length" if chunk.finish_reason and chunk.finish_reason.value == "length" else "stop"


@router.get("/v1/models")
async def models(request: Request):
    ctx = request.app.state.ctx
    account = _account(request)
    created = int(ctx.started)
    base = ctx.settings.model_names[0]
    data = [{"id": name, "object": "model", "created": created, "owned_by": "gemlora"}
            for name in ctx.settings.model_names]
    for f in await asyncio.to_thread(ctx.store.list, account):
        if f.ready:
            data.append({"id": f.name, "object": "model", "created": created, "owned_by": account,
                         "parent": f.model or base, "root": f.id})
    return {"object": "list", "data": data}
