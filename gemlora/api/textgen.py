"""TextGeneration: what both HTTP dialects share between a parsed request and the engine.

Resolves the request's finetune for the calling account (its own or a public one) into a
registered adapter, builds the Gemma prompt (chat turns, or `raw` as is), tokenizes, applies the
context-window rule (prompt tokens + max_tokens, Workers AI's 5021), compiles the output format
(JSON mode or a schema) into the request's grammar, and streams the engine's chunks. Raises ApiError for everything the caller got wrong. Knows no HTTP objects and no KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import AsyncIterator

from gemlora.api.errors import (ApiError, bad_input, budget_too_small, capacity_exceeded, context_window,
                                finetune_missing_files, finetune_not_found)
from gemlora.api.output_reader import OutputReader
from gemlora.api.schemas import GenerateRequest
from gemlora.engine.async_engine import AsyncEngine, EngineDeadError, GenerationChunk
from gemlora.finetunes.finetune import Finetune, FinetuneError
from gemlora.finetunes.store import FinetuneStore
from gemlora.lora.adapter import AdapterError
from gemlora.lora.registry import UnknownAdapterError
from gemlora.sampling import InvalidRequestError
from gemlora.structured.json_grammars import JsonGrammars
from gemlora.structured.output_format import OutputFormatError
from gemlora.structured.tool_grammar import tool_output_format
from gemlora.text.chat import format_chat, format_prompt
from gemlora.text.tool_prompt import tool_prompt

log = logging.getLogger("gemlora.api")


def engine_failure(exc: Exception) -> ApiError:
    """An engine failure (never the caller's fault): 503 while the engine loop is down (see /health),
    500 for a failed step. The SDKs retry both, which suits a transient failure."""
    if isinstance(exc, EngineDeadError):
        return ApiError(3000, 503, "AiError: AiError: the model is unavailable; please retry later")
    return ApiError(3000, 500, "AiError: AiError: internal error while generating; please retry")


async def finetune_for(store: FinetuneStore, account: str, lora: str) -> Finetune:
    """The account's ready finetune (or a public one) named or numbered `lora`, or the API's error."""
    try:
        finetune = await asyncio.to_thread(store.get, account, lora)
    except FinetuneError as exc:
        if exc.code == 3037:
            raise finetune_not_found(lora) from exc
        raise ApiError(exc.code, exc.status, f"AiError: AiError: {exc.message}") from exc
    if not finetune.ready:
        if finetune.error:
            raise ApiError(3039, 400, f"AiError: AiError: Finetune {lora} cannot be used: {finetune.error}",
                           param="lora")
        raise finetune_missing_files()
    return finetune


class TextGeneration:
    def __init__(self, engine: AsyncEngine, store: FinetuneStore, tool_format: str | None = None):
        self.engine = engine
        self.store = store
        tokenizer = engine.tokenizer
        self.outputs = OutputReader(tokenizer, tool_format)
        self.tool_format = self.outputs.tool_format
        self.grammars = JsonGrammars(tokenizer.to_json, engine.model_config.vocab_size,
                                     sorted(engine.engine.stop_token_ids))

    async def adapter_for(self, account: str, lora: str | None) -> str | None:
        """The registry id of the account's finetune named or numbered `lora`."""
        if lora is None:
            return None
        finetune = await finetune_for(self.store, account, lora)
        try:
            await asyncio.to_thread(self.engine.registry.ensure, finetune.path, finetune.id)
        except AdapterError as exc:
            raise bad_input(f"finetune {lora} cannot be used: {exc}", "lora") from exc
        return finetune.id

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        try:
            if req.messages is None:
                text = format_prompt(req.prompt, raw=req.raw)
            elif req.tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in req.messages):
                tools = req.tools.tools if req.tools is not None else ()
                declare = req.tools is not None and req.tools.choice != "none"
                text = tool_prompt(req.messages, tools, self.tool_format, declare)
            else:
                text = format_chat(req.messages)
        except ValueError as exc:      # ToolFormatError too: a history value the format cannot write
            raise bad_input(str(exc), "messages") from exc
        # Workers AI's rule (5021): prompt + max_tokens must fit. The engine itself only needs the prompt
        # to fit, and ends a generation at the window (finish "length"), for callers that want that.
        limit = self.engine.max_model_len
        # A long text that cannot fit whatever its tokens is refused before tokenizing it, which costs more
        # than linear time (x2: a normalizer may shorten the text); a short one is counted exactly
        at_least = len(text) // (2 * self.engine.tokenizer.max_token_chars)
        if len(text) > 65536 and at_least + req.params.max_tokens > limit:
            raise context_window(at_least + req.params.max_tokens, limit)
        ids = self.engine.tokenizer.encode(text)
        if len(ids) + req.params.max_tokens > limit:
            raise context_window(len(ids) + req.params.max_tokens, limit)
        return ids

    def output_format(self, req: GenerateRequest):
        """What the output must be: the request's JSON format, or its tool calls' grammar (which may include it)."""
        if req.tools is None:
            return req.output_format
        t = req.tools
        return tool_output_format(self.tool_format, t.offered, t.choice, t.parallel, req.output_format)

    def _constraint(self, fmt, account: str):
        constraint = self.grammars.constraint(fmt, account)
        return constraint, constraint.shortest()

    async def stream(self, account: str, req: GenerateRequest, request_id: str) -> AsyncIterator[GenerationChunk]:
        """Validates everything first (raising ApiError), then yields the engine's chunks. `request_id`
        is for the log only: the engine makes its own key for every request."""
        if req.ignored_fields:
            log.warning("request %s: ignored unknown fields %s", request_id, ", ".join(req.ignored_fields))
        if req.reject_if_busy and self.engine.stats().waiting:
            raise capacity_exceeded()
        adapter_id = await self.adapter_for(account, req.lora)
        ids = await asyncio.to_thread(self.prompt_ids, req)      # templating and tokenizing: off the loop
        constraint = None
        try:
            fmt = self.output_format(req)
        except OutputFormatError as exc:
            raise bad_input(f"'/{exc.field}' {exc}", exc.field) from exc
        if fmt is not None:
            try:      # salted by account, as the prefix cache: no tenant learns another's schemas by timing
                constraint, needed = await asyncio.to_thread(self._constraint, fmt, account)
            except OutputFormatError as exc:
                raise bad_input(f"'/{exc.field}' {exc}", exc.field) from exc
            # steering keeps the output finishable within max_tokens (GrammarConstraint): refused only when
            # even the shortest valid output cannot fit (prompt + max_tokens fits the window: checked above)
            if needed is not None and needed > req.params.max_tokens:
                raise budget_too_small(needed, fmt.field)
        # Salted by account: tenants never share cached prefixes (nor learn of each other's through timing)
        params = req.params
        if req.tools is not None and self.tool_format.stop:     # the model must not write a tool's answer itself
            params = replace(params, stop=tuple(dict.fromkeys(params.stop + self.tool_format.stop)))
        gen = self.engine.generate(ids, params, lora=adapter_id, lora_scale=req.lora_scale, cache_salt=account,
                                   constraint=constraint)
        try:
            first = await gen.__anext__()
        except InvalidRequestError as exc:
            raise bad_input(str(exc), exc.field) from exc
        except UnknownAdapterError as exc:      # deleted between lookup and use
            raise finetune_not_found(req.lora) from exc
        except AdapterError as exc:             # its files no longer load (re-read after leaving RAM)
            raise bad_input(f"finetune {req.lora} cannot be used: {exc}", "lora") from exc
        return chained(first, gen)


async def chained(first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()     # a client that went away aborts the request in the engine at once
