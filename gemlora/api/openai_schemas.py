"""OpenAI request bodies (chat completions and legacy completions) -> one GenerateRequest.

Owns parsing and validating the bodies of OpenAI's `/v1/chat/completions` and `/v1/completions`
into a `GenerateRequest` (defined in gemlora.api.schemas, with the field types, JSON decoding and
range-error helpers both dialects share), and the wording of their validation errors: OpenAI's
`Invalid 'top_k': ...` with `param` set. Every error is an `ApiError` 5006 / 400.

Must not know the Workers AI dialect (its fields, defaults or error texts), the engine, the KV
cache, adapters' weights or HTTP framework objects: bytes in, (model, GenerateRequest) out.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError, PydanticKnownError

from gemlora.api.errors import ApiError
from gemlora.api.fields import CHAT, COMPLETION, SAMPLING, STRICT, check_max_length, default, names, options_model, refused
from gemlora.api.schemas import (_JSON_TYPES, MAX_MESSAGES, MESSAGE_ROLES, GenerateRequest, _crossed_bound, _json_object,
                                 _json_type, _lone_surrogate, _rest, output_format, tool_conversation)
from gemlora.api.tools import ToolFieldError
from gemlora.structured.output_format import OutputFormatError
from gemlora.sampling import InvalidRequestError, SamplingParams, check_lora_scale

OPENAI_ROLES = MESSAGE_ROLES + ("developer",)   # OpenAI's newer name for system; sent as "system"


# --------------------------------------------------------------------------------------------------
# OpenAI: chat completions and (legacy) completions

def _openai_content(value: Any, info: ValidationInfo) -> str | None:
    # A string, or an array of text parts ({"type": "text", "text": ...}), joined by newlines; null on an
    # assistant turn that made tool calls (checked with the tool fields)
    if value is None:
        return None
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise PydanticCustomError("content", "only a string or an array of text parts "
                                                     "({\"type\": \"text\", \"text\": ...}) is supported")
            texts.append(part["text"])
        value = "\n".join(texts)
    if not isinstance(value, str):
        raise PydanticKnownError("string_type")
    return check_max_length(value, info)


class _ChatMessage(BaseModel):
    model_config = STRICT
    role: str
    content: Annotated[Any, AfterValidator(_openai_content)] = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in OPENAI_ROLES:
            raise PydanticCustomError("role", "must be one of " + ", ".join(f"'{r}'" for r in OPENAI_ROLES)
                                      + " (the legacy function messages are not supported: use tool)")
        return "system" if role == "developer" else role


class _OpenAIBase(BaseModel):
    # The typed options (gemlora.api.fields): OpenAI clients send explicit nulls for unset options, so
    # every one takes null.
    model_config = STRICT
    model: str = Field(min_length=1)


class _Chat(options_model(CHAT, _OpenAIBase)):
    messages: list[_ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class _Completion(options_model(COMPLETION, _OpenAIBase)):
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any, info: ValidationInfo) -> str:
        def token_ids(value: Any) -> bool:
            return isinstance(value, list) and bool(value) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in value)

        if isinstance(prompt, list):
            if token_ids(prompt) or (len(prompt) == 1 and token_ids(prompt[0])):
                raise PydanticCustomError("prompt", "token-id prompts are not supported; send text")
            if len(prompt) != 1:
                raise PydanticCustomError("prompt", "only one prompt per request is supported, got {n}",
                                          {"n": len(prompt)})
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise PydanticKnownError("string_type")
        if not prompt:
            raise PydanticKnownError("string_too_short", {"min_length": 1})
        return check_max_length(prompt, info)


# every top-level field either route reads (the rest are ignored, and never walked)
_KNOWN = names(CHAT) | names(COMPLETION) | {"model", "messages", "prompt"}


def parse_chat_completion(body: bytes, *, max_length: int | None = None) -> tuple[str, GenerateRequest]:
    """OpenAI `POST /v1/chat/completions` body -> (model, GenerateRequest), or ApiError 5006 with `param`."""
    req, data = _parse_openai(body, _Chat, max_length)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(5006, 400, "Invalid 'top_logprobs': logprobs must be set to true when top_logprobs is "
                                  "given.", param="top_logprobs")
    try:
        messages, tools = tool_conversation(req.messages, data)
        for i, msg in enumerate(messages):
            if msg["role"] == "tool" and "tool_call_id" not in msg:
                raise ToolFieldError("is required on a tool message", ("messages", i, "tool_call_id"), missing=True)
    except ToolFieldError as exc:
        param = _openai_param(exc.path)
        if exc.missing:
            raise ApiError(5006, 400, _openai_text({"type": "missing", "loc": exc.path}), param=param) from None
        raise ApiError(5006, 400, f"Invalid '{param}': {exc}.", param=param) from None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    req_out = _openai_request(req, data, prompt=None, messages=messages, raw=False, logprobs=logprobs)
    return req.model, replace(req_out, tools=tools)


def parse_completion(body: bytes, *, max_length: int | None = None) -> tuple[str, GenerateRequest]:
    """OpenAI `POST /v1/completions` body -> (model, GenerateRequest), or ApiError 5006 with `param`.

    A completion continues the prompt as given: it is sent raw (no chat template) unless the
    extension field `raw` is false. `prompt` is a string or an array of exactly one string.
    """
    req, data = _parse_openai(body, _Completion, max_length)
    raw = True if req.raw is None else req.raw
    return req.model, _openai_request(req, data, prompt=req.prompt, messages=None, raw=raw, logprobs=req.logprobs)


def _parse_openai(body: bytes, model: type[BaseModel], max_length: int | None):
    route = CHAT if model is _Chat else COMPLETION
    data = _json_object(body)
    if data is None:
        raise ApiError(5006, 400, "Invalid body: the request body is not a JSON object.")
    where = _lone_surrogate(data, body, _KNOWN)
    if where is not None:
        param = _openai_param(where)
        raise ApiError(5006, 400, f"Invalid '{param}': the string holds a lone UTF-16 surrogate, which is not "
                                  "valid Unicode text.", param=param)
    try:
        req = model.model_validate(data, context={"max_length": max_length})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise ApiError(5006, 400, _openai_text(err), param=_openai_param(err["loc"])) from None
    for f in refused(route):
        if not f.accepts(data.get(f.name)):
            raise ApiError(5006, 400, f"Invalid '{f.name}': {f.why}, got {json.dumps(data.get(f.name))}.",
                           param=f.name)
    return req, data


def _openai_request(req: BaseModel, data: dict, *, prompt, messages, raw, logprobs: int | None) -> GenerateRequest:
    if (req.max_tokens is not None and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens):
        raise ApiError(5006, 400, "Invalid 'max_tokens': give max_tokens or max_completion_tokens, "
                                  "not both with different values.", param="max_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value is not None and value < 0:
            # OpenAI allows -2..2; our engine only penalises (0..2), it cannot reward repetition.
            raise ApiError(5006, 400, f"Invalid '{name}': negative values are not supported by this server "
                                      f"(it accepts 0 to 2), got {value}.", param=name)
    # temperature: OpenAI's 0..2 is a subset of the engine's 0..5 (Workers AI's range); 0..5 is
    # accepted on both dialects for parity. Default 1.0, as OpenAI. top_p likewise 0..2.
    route = COMPLETION if messages is None else CHAT
    options = {"stop": req.stop, "ignore_eos": bool(req.ignore_eos), "logprobs": logprobs}
    for name in SAMPLING:
        value = max_tokens if name == "max_tokens" else getattr(req, name)
        value = default(name, route) if value is None else value
        if value is not None:
            options[name] = value
    try:
        params = SamplingParams(**options)
        lora_scale = check_lora_scale(1.0 if req.lora_scale is None else req.lora_scale)
    except InvalidRequestError as exc:
        field = exc.field
        if field == "max_tokens" and req.max_completion_tokens is not None:
            field = "max_completion_tokens"
        if field == "logprobs" and messages is not None:
            field = "top_logprobs"              # chat's logprobs is a boolean; the count is top_logprobs
        value = req.lora_scale if field == "lora_scale" else options.get(exc.field)
        raise ApiError(5006, 400, _openai_range_text(exc, field, value), param=field) from None
    try:
        fmt = output_format(data)
    except OutputFormatError as exc:
        raise ApiError(5006, 400, f"Invalid '{exc.field}': {exc}.", param=exc.field) from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    known = names(route) | set(type(req).model_fields)
    return GenerateRequest(prompt=prompt, messages=messages, raw=raw, stream=bool(req.stream), params=params,
                           lora=req.lora, lora_scale=lora_scale, include_usage=include_usage,
                           ignored_fields=tuple(sorted(set(data) - known)), output_format=fmt)


# --------------------------------------------------------------------------------------------------
# OpenAI error wording

def _article(json_type: str) -> str:
    return json_type if json_type == "null" else ("an " if json_type[0] in "aeiou" else "a ") + json_type


def _openai_param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _openai_text(err: dict) -> str:
    kind, loc, ctx = err["type"], err["loc"], err.get("ctx") or {}
    param = _openai_param(loc)
    if kind == "missing":
        return f"Missing required parameter: '{param}'."
    if kind in _JSON_TYPES:
        return (f"Invalid type for '{param}': expected {_article(_JSON_TYPES[kind])}, "
                f"but got {_article(_json_type(err.get('input')))} instead.")
    if kind == "string_too_short":
        return f"Invalid '{param}': string too short. Expected a string with minimum length {ctx['min_length']}."
    if kind == "string_too_long":
        return f"Invalid '{param}': string too long. Expected a string with maximum length {ctx['max_length']}."
    if kind == "too_short":
        return f"Invalid '{param}': expected an array with minimum length {ctx['min_length']}."
    return f"Invalid '{param}': {err['msg']}."


def _openai_range_text(exc: InvalidRequestError, param: str | None, value: Any) -> str:
    if not param:
        return f"Invalid request: {exc}."
    bound = _crossed_bound(exc, value)
    if bound:
        return f"Invalid '{param}': expected a value {bound}, but got {value} instead."
    return f"Invalid '{param}': {_rest(exc)}."
