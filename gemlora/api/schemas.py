"""Request bodies -> one GenerateRequest: the shared pieces, and the Workers AI dialect.

Owns `GenerateRequest`, what both dialects share (JSON decoding, the strict field types, JSON type
names, reading the crossed bound back from a range error), and parsing and validating the body of
Workers AI's `ai/run` (the `@cf/google/gemma-7b-it-lora` input schema: a `oneOf` of a prompt branch
and a messages branch), with the wording of its validation errors: Workers AI's
`AiError: Bad input: ...` texts naming the field as a JSON pointer (`'/top_k' must be <= 50`).
Every error is an `ApiError` 5006 / 400. The OpenAI dialect lives in gemlora.api.openai_schemas,
which builds on the shared pieces here; this module must not know anything OpenAI-specific.

Types are checked by pydantic v2 models (strict: no silent "5" -> 5) built from the options' one
declaration (gemlora.api.fields); numeric ranges by `SamplingParams` and `check_lora_scale`
(gemlora.sampling), so the ranges live in one place.

Knows nothing of the engine, the KV cache, adapters' weights or HTTP framework objects: bytes in,
a frozen dataclass out. Whether a finetune exists, and the context window, are checked later.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from gemlora.api.errors import bad_input
from gemlora.api.fields import RUN, SAMPLING, STRICT, Text, names, options_model, refused
from gemlora.api.tools import ToolFieldError, ToolRequest, check_history, message_tool_fields, parse_tool_choice, parse_tools
from gemlora.sampling import InvalidRequestError, SamplingParams, check_lora_scale
from gemlora.structured.output_format import OutputFormat, OutputFormatError, from_guided_json, from_response_format

MESSAGE_ROLES = ("system", "user", "assistant", "model", "tool")


@dataclass(frozen=True)
class GenerateRequest:
    """One validated generation request, whichever dialect it came in.

    Exactly one of `prompt` / `messages` is set. `raw` only ever applies to `prompt` (it is always
    False with `messages`, which are always templated). Not slotted: callers copy it with
    `GenerateRequest(**{**req.__dict__, ...})` or `dataclasses.replace`.
    """

    prompt: str | None
    messages: tuple[dict, ...] | None    # ({"role": str, "content": str}, ...)
    raw: bool
    stream: bool
    params: SamplingParams
    lora: str | None                     # finetune id or name
    lora_scale: float = 1.0
    include_usage: bool = True           # OpenAI stream_options.include_usage; Workers AI always sends usage
    reject_if_busy: bool = False         # Workers AI options.rejectIfBusy: 3040 / 429 instead of queueing
    ignored_fields: tuple[str, ...] = ()  # top-level keys neither dialect knows: logged, never silently dropped
    output_format: OutputFormat | None = None   # JSON mode / a JSON schema the output must follow
    tools: ToolRequest | None = None    # tools offered (or a history of calls): only with messages

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt / messages must be set")


# --------------------------------------------------------------------------------------------------
# Shared helpers: JSON, JSON type names, range errors

def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_object(body: bytes | str) -> dict | None:
    """The body as a JSON object, or None. NaN / Infinity literals (which Python accepts) are not JSON."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


# an escaped surrogate, or one encoded raw (json.loads decodes bytes with "surrogatepass")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _lone_surrogate(value: Any, body: bytes | str | None = None, fields: Collection[str] | None = None) -> tuple | None:
    """The location of a string holding a lone UTF-16 surrogate, or None. JSON allows the escape
    `"\\udfff"`, but no text can be encoded from it (the tokenizer and SQLite both refuse). Given the raw
    `body`, a body with no surrogate escape at all is not walked; given `fields`, only those top-level
    fields are (the others are ignored anyway). The walk allocates per container, never per scalar."""
    if body is not None:
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        if b"\x00" not in raw[:4] and not _SURROGATE_ESCAPE.search(raw):     # UTF-8 (not 16/32) without one
            return None
    if fields is not None and isinstance(value, dict):
        for key in value:                 # an unknown field's name is echoed in the ignored-fields warning
            if _has_surrogate(key):
                return (key,)
        value = {k: v for k, v in value.items() if k in fields}
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:                          # iterative: the body may nest as deep as json.loads allows
        path, item = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return path
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in pairs:
            if isinstance(key, str) and _has_surrogate(key):
                return path + (key,)
            if isinstance(child, str):
                if _has_surrogate(child):
                    return path + (key,)
            elif isinstance(child, (dict, list)):
                stack.append((path + (key,), child))
    return None


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_JSON_TYPES = {"string_type": "string", "int_type": "integer", "int_from_float": "integer", "float_type": "number",
               "bool_type": "boolean", "list_type": "array", "model_type": "object",
               "model_attributes_type": "object", "dict_type": "object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# SamplingParams / check_lora_scale word range errors "NAME must be in [LO, HI], got V" ("(LO, HI]"
# when LO itself is excluded). The bound that was crossed is read back from that text.
_RANGE = re.compile(r"must be in ([\[(])([^,\]]+), ([^\]]+)\], got ")


def _crossed_bound(exc: InvalidRequestError, value: Any) -> str | None:
    match = _RANGE.search(str(exc))
    if match is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    lo_open, lo, hi = match.group(1) == "(", match.group(2), match.group(3)
    try:
        if value > float(hi) or value != value:
            return f"<= {hi}"
    except ValueError:
        return None
    return f"> {lo}" if lo_open else f">= {lo}"


def _rest(exc: InvalidRequestError) -> str:
    message = str(exc)
    if exc.field and message.startswith(exc.field + " "):
        return message[len(exc.field) + 1:]
    return message



# --------------------------------------------------------------------------------------------------
# Workers AI: the two oneOf branches of the gemma-7b-it-lora input schema

MAX_MESSAGES = 1024          # turns in one request, on both APIs (neither publishes a limit; a bound must exist)


class _RunMessage(BaseModel):
    model_config = STRICT
    role: str
    content: Text | None = None           # maxLength max_length (the seed schema's 4096); only an assistant
                                          # turn that made tool calls may leave it out (checked after)

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in MESSAGE_ROLES:
            raise PydanticCustomError("role", "must be one of " + ", ".join(f"'{r}'" for r in MESSAGE_ROLES))
        return role


class _RunBase(BaseModel):
    model_config = STRICT


# The typed options (gemlora.api.fields). `lora` is accepted on both branches: the published schemas list
# it on the prompt branch only, but Cloudflare's LoRA docs send messages + lora and Workers AI serves them
# (spec §2.2). Ranges are SamplingParams' business.
_RunCommon = options_model(RUN, _RunBase)
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")      # read by gemlora.api.tools, on both dialects


class _RunPrompt(_RunCommon):
    prompt: Text = Field(min_length=1)


class _RunMessages(_RunCommon):
    # `raw` is accepted here too (newer schemas list it) but ignored: messages are always templated,
    # as Workers AI's own SDK does. Cloudflare's LoRA examples send messages with "raw": "true".
    messages: list[_RunMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


_RUN_FIELDS = names(RUN) | {"prompt", "messages"}


def output_format(data: dict) -> OutputFormat | None:
    """`response_format` or `guided_json` (not both) -> OutputFormat; OutputFormatError for a bad one."""
    fmt = from_response_format(data.get("response_format"))
    guided = from_guided_json(data.get("guided_json"))
    if fmt is not None and guided is not None:
        raise OutputFormatError("give response_format or guided_json, not both", "guided_json")
    return fmt or guided

_ONEOF_NONE = ("Error: oneOf at '/' not met, 0 matches: required properties at '/' are 'prompt', "
               "required properties at '/' are 'messages'")
_ONEOF_BOTH = ("Error: oneOf at '/' not met, 2 matches: 'prompt' and 'messages' cannot be given together, "
               "give one of them")


def parse_run_body(body: bytes, *, max_length: int | None = 4096) -> GenerateRequest:
    """Workers AI `POST .../ai/run/{model}` body -> GenerateRequest, or ApiError 5006.

    The body is JSON whatever the content type (the docs' `curl -d` examples send it as
    form-urlencoded). `max_length` caps the prompt and every message's content, in characters
    (None: no cap).
    """
    data = _json_object(body)
    if data is None:
        raise bad_input("the body is not a JSON object")
    where = _lone_surrogate(data, body, _RUN_FIELDS)
    if where is not None:
        raise bad_input(f"'{_pointer(where)}' is not valid Unicode text (it holds a lone UTF-16 surrogate)",
                        _pointer(where))
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if not has_prompt and not has_messages:
        raise bad_input(_ONEOF_NONE)
    if has_prompt and has_messages:
        # Stricter than JSON Schema's oneOf, which would take the one branch that validates if the
        # other happens not to: two inputs are a client bug, so say so.
        raise bad_input(_ONEOF_BOTH, "messages")
    model = _RunPrompt if has_prompt else _RunMessages
    try:
        run = model.model_validate(data, context={"max_length": max_length})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise bad_input(_workers_ai_text(err), _pointer(err["loc"])) from None
    for f in refused(RUN):
        if f.name in data and not f.accepts(data[f.name]):
            raise bad_input(f"'/{f.name}' {f.why}", f"/{f.name}")
    try:
        fmt = output_format(data)
    except OutputFormatError as exc:
        raise bad_input(f"'/{exc.field}' {exc}", f"/{exc.field}") from None

    options = {name: getattr(run, name) for name in SAMPLING if getattr(run, name) is not None}
    try:
        params = SamplingParams(stop=run.stop, **options)
        lora_scale = check_lora_scale(run.lora_scale)
    except InvalidRequestError as exc:
        value = run.lora_scale if exc.field == "lora_scale" else options.get(exc.field)
        raise bad_input(_workers_ai_range_text(exc, value), f"/{exc.field}" if exc.field else None) from None

    common = dict(stream=run.stream, params=params, lora=run.lora, lora_scale=lora_scale,
                  reject_if_busy=bool(run.options and run.options.rejectIfBusy),
                  ignored_fields=tuple(sorted(set(data) - _RUN_FIELDS)), output_format=fmt)
    if has_prompt:
        for name, off in (("tools", (None, [])), ("tool_choice", (None, "none", "auto"))):
            if name in data and data[name] not in off:
                raise bad_input(f"'/{name}' is accepted with messages only (tools need the chat template)",
                                f"/{name}")
        return GenerateRequest(prompt=run.prompt, messages=None, raw=run.raw, **common)
    try:
        messages, tools = tool_conversation(run.messages, data)
    except ToolFieldError as exc:
        if exc.missing:
            raise bad_input(_workers_ai_text({"type": "missing", "loc": exc.path}), _pointer(exc.path)) from None
        raise bad_input(f"'{_pointer(exc.path)}' {exc}", _pointer(exc.path)) from None
    return GenerateRequest(prompt=None, messages=messages, raw=False, tools=tools, **common)


def tool_conversation(messages: list, data: dict) -> tuple[tuple[dict, ...], ToolRequest | None]:
    """Validated messages (with their tool fields) and the request's tools, from either dialect's body:
    ToolFieldError for what is wrong. `content` may be absent only on an assistant turn that made calls."""
    out = []
    for i, (msg, raw) in enumerate(zip(messages, data["messages"])):
        extra = message_tool_fields(raw, i)
        if msg.content is None and not extra.get("tool_calls"):
            raise ToolFieldError("is required (only an assistant message with tool_calls may leave it out)",
                                 ("messages", i, "content"), missing=True)
        out.append({"role": msg.role, "content": msg.content or "", **extra})
    tools = None
    if any(data.get(name) is not None for name in TOOL_FIELDS):
        declared = parse_tools(data["tools"]) if data.get("tools") is not None else ()
        tools = parse_tool_choice(data.get("tool_choice"), declared, data.get("parallel_tool_calls"))
    check_history(tuple(out), tools)
    return tuple(out), tools


# --------------------------------------------------------------------------------------------------
# Workers AI error wording

def _pointer(loc: tuple) -> str:
    return "/" + "/".join(str(part) for part in loc)


def _workers_ai_text(err: dict) -> str:
    kind, loc, ctx = err["type"], err["loc"], err.get("ctx") or {}
    where = _pointer(loc)
    if kind == "missing":
        return f"required properties at '{_pointer(loc[:-1])}' are '{loc[-1]}'"
    if kind in _JSON_TYPES:
        return f"Type mismatch of '{where}', '{_json_type(err.get('input'))}' not in '{_JSON_TYPES[kind]}'"
    if kind == "string_too_short":
        return f"'{where}' must NOT have fewer than {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"'{where}' must NOT have more than {ctx['max_length']} characters"
    if kind == "too_short":
        return f"'{where}' must NOT have fewer than {ctx['min_length']} items"
    if kind == "too_long":
        return f"'{where}' must NOT have more than {ctx['max_length']} items"
    return f"'{where}' {err['msg']}"


def _workers_ai_range_text(exc: InvalidRequestError, value: Any) -> str:
    if not exc.field:
        return str(exc)
    bound = _crossed_bound(exc, value)
    return f"'/{exc.field}' must be {bound}" if bound else f"'/{exc.field}' {_rest(exc)}"
