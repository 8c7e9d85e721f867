"""Field: the one declaration of each option of a generation request, on every route that reads it.

Owns, for each top-level option of Workers AI's `ai/run` body and OpenAI's chat / completions bodies
(sampling, output format, tools, adapter, streaming, and the options refused unless off): its JSON
Schema, its pydantic type, its default and description per route, and for a refused option the test
and the reason. From this table come the pydantic body models of both dialects
(gemlora.api.schemas, gemlora.api.openai_schemas: `options_model`, `names`, `refused`, `default`)
and the request schemas of `/openapi.json` (gemlora.api.openapi: `properties`). Numeric ranges are
not stated here: they are `gemlora.sampling.RANGES`, which SamplingParams checks, read into the
schemas below. The inputs themselves (`prompt`, `messages`, `model`) are each dialect's structure and
live with its body.

Knows the value types (strict integers, `raw`'s strings, the text cap), nothing of routes' wording of
errors, the engine or HTTP framework objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo, create_model
from pydantic import Field as PydanticField
from pydantic_core import PydanticCustomError, PydanticKnownError

from gemlora.api.tools import PARALLEL_SCHEMA, TOOL_CHOICE_SCHEMA, TOOLS_SCHEMA
from gemlora.sampling import RANGES, SamplingParams

RUN, CHAT, COMPLETION = "run", "chat", "completion"     # Workers AI's ai/run; OpenAI's two routes
OPENAI = (CHAT, COMPLETION)
ALL = (RUN, CHAT, COMPLETION)

MAX_STOP_STRINGS = 16                # Workers AI's route (no published limit: a bound must exist)
MAX_STOP = 4                         # OpenAI's limit on stop sequences
OPENAI_TEMPERATURE = 1.0             # OpenAI's default; Workers AI's (0.6) is SamplingParams'
_ENGINE = SamplingParams()           # the engine's defaults: Workers AI's schema defaults

STRICT = ConfigDict(extra="allow", strict=True)   # unknown keys pass, as in Workers AI (and OpenAI's extras)


# --------------------------------------------------------------------------------------------------
# Value types

def _integral(value: Any) -> Any:
    # JSON has one number type: 5.0 is the integer 5 to a JSON-Schema validator (and to JavaScript),
    # so an integral float is taken as an int. 5.5, "5" and true stay type errors.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _raw_flag(value: Any) -> Any:
    # `raw` accepts true/false and also the strings "true"/"false": Cloudflare's own LoRA docs send
    # `"raw": "true"` and Workers AI answers those without a validation error. Whether Workers AI then
    # honours it is unconfirmed; the docs clearly mean raw mode, so "true" turns raw mode on.
    # Any other string is a type error.
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    return value


def check_max_length(value: str, info: ValidationInfo) -> str:
    """A text's length against the server's cap, which comes per call in the validation context."""
    limit = (info.context or {}).get("max_length")
    if limit is not None and len(value) > limit:
        raise PydanticKnownError("string_too_long", {"max_length": limit})
    return value


Int = Annotated[int, BeforeValidator(_integral)]
Raw = Annotated[bool, BeforeValidator(_raw_flag)]
Text = Annotated[str, AfterValidator(check_max_length)]      # a string of at most max_length characters
Name = Annotated[str, PydanticField(min_length=1)]


def _run_stop(value: Any, info: ValidationInfo) -> tuple[str, ...]:
    # A string or an array of strings, each non-empty; the engine ends the output before the first match.
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise PydanticCustomError("stop", "must be a non-empty string or an array of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise PydanticCustomError("stop", f"must have at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    for s in stops:
        check_max_length(s, info)
    return tuple(stops)


def _openai_stop(stop: Any) -> tuple:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise PydanticCustomError("stop", f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}")
        return tuple(stop)
    raise PydanticCustomError("stop", f"must be a string or an array of up to {MAX_STOP} strings")


class RunOptions(BaseModel):
    model_config = STRICT
    rejectIfBusy: bool = False            # noqa: N815  (Workers AI's own spelling)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


def _off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value == [] or value == {} or value == ""


# --------------------------------------------------------------------------------------------------
# Field

@dataclass(frozen=True)
class Field:
    """One option on the routes that read it. A value given is validated by `annotation` (pydantic; None:
    the option is read from the raw body by its own parser) and described by `schema` (a JSON Schema, or a
    function of the server's text cap). On OpenAI's routes every option also takes null ("not given"), as
    OpenAI's clients send. A refused option (`accepts` set) is answered 400 unless `accepts(value)`."""

    name: str
    routes: tuple[str, ...]
    schema: dict | Callable[[int | None], dict]
    annotation: Any = None
    default: Mapping[str, Any] = field(default_factory=dict)      # per route; absent: none
    description: str | None = None
    notes: Mapping[str, str] = field(default_factory=dict)        # per route, in place of `description`
    accepts: Callable[[Any], bool] | None = None
    why: str = ""
    sampling: bool = False          # a SamplingParams option of the same name
    unset: Any = None               # the parsed value when the option is not given
    takes_null: bool = False        # `annotation` reads null itself (else OpenAI's routes add null to it)
    null_on_run: bool = False       # null is "not given" on Workers AI's route too (else a type mismatch)

    def json_schema(self, route: str, max_length: int | None) -> dict:
        out = dict(self.schema(max_length) if callable(self.schema) else self.schema)
        if route in self.default:
            out["default"] = self.default[route]
        description = self.notes.get(route, self.description)
        if description:
            out["description"] = description
        return out if route == RUN and not self.null_on_run else _nullable(out)


def _nullable(schema: dict) -> dict:
    """The schema with null allowed (OpenAI clients send explicit nulls for unset options)."""
    out = dict(schema)
    if isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    elif isinstance(out.get("type"), list) and "null" not in out["type"]:
        out["type"] = [*out["type"], "null"]
    elif "enum" in out and None not in out["enum"]:
        out["enum"] = [None, *out["enum"]]
    elif "anyOf" in out and {"type": "null"} not in out["anyOf"]:
        out["anyOf"] = [{"type": "null"}, *out["anyOf"]]
    return out


def _stop_text(max_length: int | None) -> dict:
    text = {"type": "string", "minLength": 1}
    return text if max_length is None else {**text, "maxLength": max_length}


# JSON mode and JSON-schema output (gemlora.structured): both dialects take both wrappers.
RESPONSE_FORMAT = {
    "type": "object", "required": ["type"],
    "properties": {"type": {"enum": ["text", "json_object", "json_schema"]},
                   "json_schema": {"type": "object", "description": "OpenAI's `{name, schema, strict}` or, as "
                                   "Workers AI sends it, the JSON schema itself."}}}
_RESPONSE_FORMAT_NOTE = (
    "`json_object`: the output is one JSON object; `json_schema`: JSON valid against the schema (enforced token "
    "by token; a schema feature that cannot be enforced is refused with 5006). On `ai/run` without streaming, "
    "`response` is then the JSON value itself, as Workers AI's JSON mode answers. As `max_tokens` nears, the "
    "output is steered to its shortest valid ending, so an answer is valid JSON whenever any fits; a `max_tokens` "
    "below the shortest valid output is refused with 5006 naming the least that fits (the same for `guided_json` "
    "and on the OpenAI routes).")
_OFF = {"enum": [None, False, 0, "", [], {}]}
_OFF_NOTE = "Refused unless off (null, false, 0, \"\", [], {})."
_CHAT_ONLY = "A chat option: refused unless off here."
_EXTENSION = "Extension."


def _sampling(name: str, **kw) -> Field:
    """A SamplingParams option on every route: its range is RANGES', its Workers AI default the engine's."""
    values = RANGES[name]
    annotation = Int if values.integer else float
    default = {RUN: getattr(_ENGINE, name)} if getattr(_ENGINE, name) is not None else {}
    return Field(name, ALL, values.json_schema(), annotation, default={**default, **kw.pop("default", {})},
                 sampling=True, **kw)


def _refused(name: str, routes: tuple[str, ...], why: str, accepts=_off, schema: dict = _OFF,
             description: str = _OFF_NOTE) -> Field:
    return Field(name, routes, schema, description=description, accepts=accepts, why=why)


FIELDS: tuple[Field, ...] = (
    # the output's length and the sampling
    _sampling("max_tokens", default={CHAT: _ENGINE.max_tokens, COMPLETION: _ENGINE.max_tokens},
              notes={RUN: "Prompt tokens + max_tokens must fit the context window (else 5021 / 413)."}),
    Field("max_completion_tokens", OPENAI, RANGES["max_tokens"].json_schema(), Int,
          description="If max_tokens is also given, they must be equal."),
    _sampling("temperature", default={CHAT: OPENAI_TEMPERATURE, COMPLETION: OPENAI_TEMPERATURE},
              notes={RUN: "0 is greedy."}),
    _sampling("top_p", notes={}),
    _sampling("top_k", notes={CHAT: _EXTENSION, COMPLETION: _EXTENSION}),
    _sampling("seed"),
    _sampling("repetition_penalty", notes={CHAT: _EXTENSION, COMPLETION: _EXTENSION}),
    _sampling("frequency_penalty", notes={CHAT: "Negative values are refused.",
                                          COMPLETION: "Negative values are refused."}),
    _sampling("presence_penalty", notes={CHAT: "Negative values are refused.",
                                         COMPLETION: "Negative values are refused."}),
    Field("stop", (RUN,), lambda ml: {"anyOf": [_stop_text(ml), {"type": "array", "maxItems": MAX_STOP_STRINGS,
                                                                 "items": _stop_text(ml)}]},
          Annotated[Any, AfterValidator(_run_stop)], unset=(),
          description="The output ends before the first match (not included)."),
    Field("stop", OPENAI, {"anyOf": [{"type": "string", "minLength": 1},
                                     {"type": "array", "maxItems": MAX_STOP,
                                      "items": {"type": "string", "minLength": 1}}]},
          Annotated[Any, AfterValidator(_openai_stop)], unset=(), takes_null=True),
    Field("ignore_eos", OPENAI, {"type": "boolean"}, bool,
          description="Extension (as vLLM's): keep generating past end-of-sequence, up to max_tokens."),
    Field("logprobs", (CHAT,), {"type": "boolean"}, bool, description="Return each output token's log-probability."),
    Field("top_logprobs", (CHAT,), RANGES["logprobs"].json_schema(), Int,
          description="Alternatives per token; needs logprobs true."),
    Field("logprobs", (COMPLETION,), RANGES["logprobs"].json_schema(), Int,
          description="Return each output token's log-probability and this many alternatives."),
    _refused("top_logprobs", (COMPLETION,), "completions take the number of alternatives in logprobs; "
             "top_logprobs is a chat completions option", description=_CHAT_ONLY),

    # the input's form, the answer's form
    Field("raw", (RUN,), {"enum": [True, False, "true", "false"]}, Raw, default={RUN: False},
          description="With `prompt`: send it verbatim, with no chat template. The strings \"true\"/\"false\" are "
                      "accepted as Cloudflare's LoRA docs send them. With `messages`: accepted and ignored "
                      "(messages are always templated)."),
    Field("raw", (COMPLETION,), {"enum": [True, False, "true", "false"]}, Raw,
          description="Extension: false applies the chat template (default: raw)."),
    Field("stream", ALL, {"type": "boolean"}, bool, default={RUN: False},
          notes={RUN: "Answer with server-sent events."}),
    Field("stream_options", OPENAI, {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]}}},
          StreamOptions),
    Field("options", (RUN,), {"type": "object", "properties": {"rejectIfBusy": {"type": "boolean", "default": False}}},
          RunOptions, description="`rejectIfBusy`: answer 3040 / 429 instead of queueing when requests wait."),
    Field("response_format", ALL, RESPONSE_FORMAT, description=_RESPONSE_FORMAT_NOTE, null_on_run=True),
    Field("guided_json", ALL, {"anyOf": [{"type": "object"}, {"type": "string", "contentMediaType": "application/json"}]},
          null_on_run=True,
          description="A JSON schema (or a string holding one) the output must follow; `response` stays text. Not "
                      "together with `response_format`."),

    # tools (gemlora.api.tools parses them; with messages only)
    Field("tools", (RUN, CHAT), TOOLS_SCHEMA, null_on_run=True),
    Field("tool_choice", (RUN, CHAT), TOOL_CHOICE_SCHEMA),
    Field("parallel_tool_calls", (RUN, CHAT), PARALLEL_SCHEMA),
    _refused("tools", (COMPLETION,), "tools are a chat completions option", description=_CHAT_ONLY),
    _refused("tool_choice", (COMPLETION,), "tools are a chat completions option", description=_CHAT_ONLY),
    _refused("functions", (RUN,), "are Workers AI's embedded functions: code that runs inside Cloudflare's Workers "
             "runtime, which this server does not have; declare them as 'tools' and run them yourself",
             accepts=lambda v: v == [], schema={"type": "array", "maxItems": 0},
             description="Refused: Workers AI's embedded functions run code inside Cloudflare's runtime; declare "
                         "`tools` instead (only [] passes)."),
    _refused("functions", OPENAI, "the legacy functions are not supported: declare them as tools"),
    _refused("function_call", OPENAI, "the legacy functions are not supported: use tool_choice",
             accepts=lambda v: v in (None, "none", "auto"), schema={"enum": [None, "none", "auto"]}, description=""),

    # the adapter
    Field("lora", ALL, {"type": "string", "minLength": 1}, Name,
          notes={RUN: "A finetune id or name: the caller's own, another account's public one (by id), or a public "
                      "adapter.",
                 CHAT: "Extension: a finetune id or name; `model` must then be a served name.",
                 COMPLETION: "Extension: a finetune id or name; `model` must then be a served name."}),
    Field("lora_scale", ALL, RANGES["lora_scale"].json_schema(), float, default={RUN: 1.0},
          notes={RUN: "gemlora extension: 0 is the base model, 1 the adapter as trained.",
                 CHAT: _EXTENSION, COMPLETION: _EXTENSION}),

    # OpenAI's options this server cannot honour: refused rather than silently ignored when set
    _refused("n", OPENAI, "only n=1 is supported", accepts=lambda v: v is None or (v == 1 and not isinstance(v, bool)),
             schema={"enum": [None, 1]}, description="Only 1."),
    _refused("best_of", OPENAI, "only best_of=1 is supported",
             accepts=lambda v: v is None or (v == 1 and not isinstance(v, bool)), schema={"enum": [None, 1]},
             description="Only 1."),
    _refused("echo", OPENAI, "echo is not supported"),
    _refused("suffix", OPENAI, "suffix is not supported"),
    _refused("logit_bias", OPENAI, "logit_bias is not supported"),
    _refused("modalities", OPENAI, "only text output is supported", accepts=lambda v: v in (None, ["text"]),
             schema={"enum": [None, ["text"]]}, description=""),
    _refused("audio", OPENAI, "audio output is not supported"),
    _refused("prediction", OPENAI, "predicted outputs are not supported"),
    _refused("web_search_options", OPENAI, "web search is not supported"),
    _refused("reasoning_effort", OPENAI, "reasoning is not supported by this model"),
    _refused("guided_regex", OPENAI, "guided decoding is not supported by this server yet"),
    _refused("guided_choice", OPENAI, "guided decoding is not supported by this server yet"),
    _refused("guided_grammar", OPENAI, "guided decoding is not supported by this server yet"),
    # OpenAI's fields that describe the call rather than the output: accepted, with no effect on generation
    *(Field(name, OPENAI, {}, description="Accepted, no effect on generation.")
      for name in ("user", "metadata", "store", "service_tier")),
)


SAMPLING = tuple(f.name for f in FIELDS if f.sampling)      # read into SamplingParams as given


def fields_of(route: str) -> dict[str, Field]:
    """The options `route` reads, by name."""
    out: dict[str, Field] = {}
    for f in FIELDS:
        if route in f.routes:
            assert f.name not in out, f"{f.name} declared twice for {route}"
            out[f.name] = f
    return out


def names(route: str) -> frozenset[str]:
    return frozenset(fields_of(route))


def default(name: str, route: str) -> Any:
    return fields_of(route)[name].default.get(route)


def refused(route: str) -> tuple[Field, ...]:
    return tuple(f for f in fields_of(route).values() if f.accepts is not None)


def properties(route: str, max_length: int | None) -> dict[str, dict]:
    """The JSON Schemas of `route`'s options, by name: the request schemas of /openapi.json."""
    return {name: f.json_schema(route, max_length) for name, f in fields_of(route).items()}


def options_model(route: str, base: type[BaseModel]) -> type[BaseModel]:
    """A pydantic model of `route`'s typed options on top of `base`. On Workers AI's route an option's type
    excludes null (an explicit null is a type mismatch, as its JSON-Schema validation has it) and it
    defaults to its declared default or None; on OpenAI's, null is "not given" and every default None."""
    typed = {}
    for name, f in fields_of(route).items():
        if f.annotation is None or f.accepts is not None:
            continue
        if route == RUN:
            typed[name] = (f.annotation, f.default.get(RUN, f.unset))
        else:
            typed[name] = (f.annotation if f.takes_null else f.annotation | None, f.unset)
    return create_model(f"_{route.title()}Options", __base__=base, **typed)
