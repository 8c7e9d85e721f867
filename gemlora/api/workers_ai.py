"""Workers AI routes: run (JSON or SSE), and the fine-tunes API with adapter uploads.

    POST   /accounts/{account_id}/ai/run/{model}                       model names contain @ and /
    POST   /accounts/{account_id}/ai/finetunes                          {model, name, description, public}
    GET    /accounts/{account_id}/ai/finetunes
    GET    /accounts/{account_id}/ai/finetunes/public
    POST   /accounts/{account_id}/ai/finetunes/{id_or_name}/finetune-assets   multipart: file_name, file
    DELETE /accounts/{account_id}/ai/finetunes/{id_or_name}            (our extension)

Mounted at the root and under /client/v4, so either base-URL convention works. Every answer is the
v4 envelope `{result, success, errors, messages}`; streams are raw SSE. Knows HTTP and the
TextGeneration/FinetuneStore interfaces; nothing of the engine's insides.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gemlora.api.disconnect import collect
from gemlora.api.errors import ApiError, bad_input, no_such_model, output_cut
from gemlora.api.schemas import _json_object, _lone_surrogate, _pointer, parse_run_body
from gemlora.api.streaming import DONE, sse, usage
from gemlora.api.textgen import engine_failure
from gemlora.api.tools import workers_ai_calls
from gemlora.engine.async_engine import EngineError
from gemlora.finetunes.finetune import FinetuneError
from gemlora.lora.registry import UnknownAdapterError
from gemlora.sampling import InvalidRequestError

router = APIRouter()


def envelope(result) -> dict:
    return {"result": result, "success": True, "errors": [], "messages": []}


def _account(request: Request, account_id: str) -> str:
    return request.app.state.ctx.auth.account(request.headers.get("authorization"), account_id)


@router.post("/accounts/{account_id}/ai/run/{model:path}")
async def run(account_id: str, model: str, request: Request):
    ctx = request.app.state.ctx
    account = _account(request, account_id)
    if model not in ctx.settings.model_names:
        raise no_such_model(model)
    # pydantic and the body walk off the event loop: a large body must not stall other streams
    req = await asyncio.to_thread(parse_run_body, await request.body(), max_length=ctx.settings.max_input_length)
    record = ctx.metrics.record(request.state.request_id, account, req.lora)
    chunks = await ctx.textgen.stream(account, req, request.state.request_id)
    if req.stream:
        return StreamingResponse(_sse(chunks, record, request.state.request_id, ctx.textgen, req),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})
    text = await collect(request, chunks, record)
    last = record.last
    response, calls = ctx.textgen.outputs.read(req, text, last.finish_reason)
    if not calls and req.output_format is not None and req.output_format.field == "response_format":
        try:                           # in JSON mode Workers AI answers `response` as the JSON value itself
            response = json.loads(response)
        except ValueError:
            raise output_cut("response_format", f"finish reason {last.finish_reason.value}") from None
    result = {"response": response}
    if calls:
        result["tool_calls"] = workers_ai_calls(calls)
    result["usage"] = usage(last.prompt_tokens, last.completion_tokens)
    return envelope(result)


async def _sse(chunks, record, request_id: str, textgen, req):
    tools = textgen.outputs.stream(req)      # calls are held back and sent whole, in one event, when complete
    try:
        async for chunk in chunks:
            text = record.chunk(chunk).text
            if text and tools is not None:
                text = tools.push(text)
            if text:
                yield sse({"response": text})
        last = record.last
        if tools is not None:
            rest, calls = textgen.outputs.finish_stream(req, tools, last.finish_reason)
            if rest or calls:
                yield sse({"response": rest, **({"tool_calls": workers_ai_calls(calls)} if calls else {})})
        yield sse({"response": "", "usage": usage(last.prompt_tokens, last.completion_tokens)})
    except EngineError as exc:   # the status line is sent: the error goes in the stream, in the envelope
        yield sse(engine_failure(exc).workers_ai_body(request_id))
    except InvalidRequestError as exc:     # refused mid-way (a schema the output cannot follow further)
        yield sse(bad_input(str(exc), exc.field).workers_ai_body(request_id))
    except ApiError as exc:                # calls cut short (a stop string): said in the stream
        yield sse(exc.workers_ai_body(request_id))
    finally:
        await chunks.aclose()    # a client that left aborts the request now, not when GC gets to it
        record.done()
    yield DONE


def _finetune_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except FinetuneError as exc:
        raise api_error_of(exc) from exc


def api_error_of(exc: FinetuneError) -> ApiError:
    """The store's plain messages, in Workers AI's wording."""
    if exc.code == 5006:
        return bad_input(exc.message)
    if exc.code == 3006:
        return ApiError(3006, 413, f"Request is too large: {exc.message.removeprefix('Request is too large: ')}")
    return ApiError(exc.code, exc.status, f"AiError: AiError: {exc.message}")


@router.post("/accounts/{account_id}/ai/finetunes")
@router.post("/accounts/{account_id}/ai/finetunes/", include_in_schema=False)
async def create_finetune(account_id: str, request: Request):
    ctx = request.app.state.ctx
    account = _account(request, account_id)
    raw = await request.body()
    body = await asyncio.to_thread(_json_object, raw)   # None for anything but a JSON object
    if body is None:
        raise bad_input("the body must be a JSON object with model and name")
    where = await asyncio.to_thread(_lone_surrogate, body, raw, ("model", "name", "description", "public"))
    if where is not None:                            # SQLite cannot store it
        raise bad_input(f"'{_pointer(where)}' is not valid Unicode text (it holds a lone UTF-16 surrogate)")
    model, name = body.get("model"), body.get("name")
    description, public = body.get("description"), body.get("public", False)
    if description is None:      # absent or null; other falsy values (0, false, {}) are type errors below
        description = ""
    if not isinstance(model, str) or not model:
        raise bad_input("required property 'model' (a string) is missing", "model")
    if not isinstance(name, str) or not name:
        raise bad_input("required property 'name' (a string) is missing", "name")
    if not isinstance(description, str) or not isinstance(public, bool):
        raise bad_input("'description' must be a string and 'public' a boolean")
    if model not in ctx.settings.model_names:
        raise no_such_model(model)
    finetune = await asyncio.to_thread(_finetune_call, ctx.store.create, account, model=model, name=name,
                                       description=description, public=public)
    return envelope(finetune.to_api())


@router.get("/accounts/{account_id}/ai/finetunes")
@router.get("/accounts/{account_id}/ai/finetunes/", include_in_schema=False)
async def list_finetunes(account_id: str, request: Request):
    ctx = request.app.state.ctx
    account = _account(request, account_id)
    return envelope([f.to_api() for f in await asyncio.to_thread(ctx.store.list, account)])


@router.get("/accounts/{account_id}/ai/finetunes/public")
async def list_public_finetunes(account_id: str, request: Request):
    ctx = request.app.state.ctx
    _account(request, account_id)
    return envelope([f.to_api() for f in await asyncio.to_thread(ctx.store.list_public)])


@router.post("/accounts/{account_id}/ai/finetunes/{finetune}/finetune-assets")
@router.post("/accounts/{account_id}/ai/finetunes/{finetune}/finetune-assets/", include_in_schema=False)
async def upload_asset(account_id: str, finetune: str, request: Request):
    ctx = request.app.state.ctx
    account = _account(request, account_id)
    try:
        form = await request.form(max_part_size=ctx.settings.max_adapter_file_bytes)
    except ApiError:           # over the body limit (gemlora.api.body_limit): already the envelope's 413
        raise
    except Exception as exc:   # malformed multipart: the client's fault, in the envelope
        raise bad_input(f"expected multipart/form-data with file_name and file ({exc})") from exc
    file_name, upload = form.get("file_name"), form.get("file")
    if not isinstance(file_name, str) or not file_name:
        raise bad_input("multipart field 'file_name' is missing", "file_name")
    if upload is None or isinstance(upload, str):
        raise bad_input("multipart field 'file' (the file's content) is missing", "file")
    try:
        _, asset = await asyncio.to_thread(_finetune_call, ctx.store.put_asset, account, finetune, file_name,
                                           upload.file)
    finally:
        await form.close()
    return envelope(asset.to_api())


@router.delete("/accounts/{account_id}/ai/finetunes/{finetune}")
async def delete_finetune(account_id: str, finetune: str, request: Request):
    ctx = request.app.state.ctx
    account = _account(request, account_id)
    removed = await asyncio.to_thread(_finetune_call, ctx.store.delete, account, finetune,
                                      in_use=ctx.engine.requests_on_adapter)
    try:
        # A request that got the adapter just before the delete finishes with it; no new one can find
        # it, and it leaves RAM and its slot when that request ends.
        ctx.engine.remove_adapter(removed.id)
    except UnknownAdapterError:
        pass                     # never used since the server started: nothing is loaded
    return envelope(removed.to_api())
