"""Tool-calling prompt formats: how tool declarations, the model's calls and the tools' results are
written into a Gemma prompt, and how calls are read back out of the model's text.

- "gemma-json": Gemma 1/2/3 have no tool tokens. Google's documented function-calling prompt (the
  JSON variant of ai.google.dev/gemma/docs/capabilities/function-calling) states the rule and lists
  the declarations as JSON; a call is `{"name": ..., "parameters": {...}}` (one per line when there are
  several); a result goes back in a user turn wrapped in ```tool_output``` (as Google's examples do).
- "functiongemma": FunctionGemma's control tokens, as its published formatting guide writes them:
  `<start_function_declaration>declaration:NAME{description:<escape>...<escape>,parameters:{...}}
  <end_function_declaration>` (keys sorted, schema types upper-cased), calls
  `<start_function_call>call:NAME{key:<escape>text<escape>,n:15}<end_function_call>`, results
  `<start_function_response>response:NAME{...}<end_function_response>`; `<start_function_response>` is
  an extra stop string (the model must not write a tool's answer itself).

`format_for(has_token)` picks the format from the tokenizer (FunctionGemma's where it has
`<start_function_call>`); a model may name one instead. Knows text only: nothing of HTTP, grammars,
tokens or the engine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Mapping[str, Any]
    id: str = ""              # the API's id for it (OpenAI's tool_call_id); the prompt never shows it


class ToolFormatError(ValueError):
    """Text that does not hold what the format says it should (a malformed call)."""


# ---- gemma-json -----------------------------------------------------------------------------------

GEMMA_JSON_INSTRUCTION = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the "
    "format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n\n'
    "You SHOULD NOT include any other text in the response if you call a function\n")
_FENCE = re.compile(r"^```(?:json|tool_code)?\s*\n?(.*?)\n?```$", re.S)


class GemmaJsonFormat:
    name = "gemma-json"
    stop: tuple[str, ...] = ()
    call_opens = "{["                     # the characters a call (or several) can begin with

    def declarations(self, tools: Sequence[ToolSpec]) -> str:
        listed = [{"name": t.name, "description": t.description, "parameters": dict(t.parameters)} for t in tools]
        return GEMMA_JSON_INSTRUCTION + json.dumps(listed, indent=2, ensure_ascii=False) + "\n"

    def call(self, calls: Sequence[ToolCall]) -> str:
        return "\n".join(json.dumps({"name": c.name, "parameters": dict(c.arguments)}, ensure_ascii=False)
                         for c in calls)

    def result(self, name: str, content: str) -> str:
        return f"```tool_output\n{content}\n```"

    def calls_schema(self, tools: Sequence[ToolSpec], parallel: bool = False) -> dict:
        """The JSON schema of an output that is only calls (tool_choice "required", or one named tool):
        each names a declared tool and its parameters validate against that tool's schema. One call, or
        with `parallel` also a non-empty array of them (both read back by `parse`)."""
        one = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                          "properties": {"name": {"const": t.name}, "parameters": dict(t.parameters)}}
                         for t in tools]}
        return {"anyOf": [one, {"type": "array", "minItems": 1, "items": one}]} if parallel else one

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls): the calls when the whole output is one or more call objects (one per line, or
        a JSON array of them, optionally in a ```json / ```tool_code fence), else the text as content."""
        body = text.strip()
        fenced = _FENCE.match(body)
        if fenced:
            body = fenced.group(1).strip()
        try:
            values = [json.loads(body)]
        except ValueError:
            try:
                values = [json.loads(line) for line in body.splitlines() if line.strip()]
            except ValueError:
                return text, []
        if len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        calls = [_json_call(v) for v in values]
        if not calls or any(c is None for c in calls):
            return text, []
        return "", calls


def _json_call(value: Any) -> ToolCall | None:
    if (isinstance(value, dict) and set(value) <= {"name", "parameters"} and isinstance(value.get("name"), str)
            and isinstance(value.get("parameters", {}), dict)):
        return ToolCall(value["name"], value.get("parameters", {}))
    return None


# ---- functiongemma --------------------------------------------------------------------------------

ESCAPE = "<escape>"
START_CALL, END_CALL = "<start_function_call>", "<end_function_call>"
START_DECL, END_DECL = "<start_function_declaration>", "<end_function_declaration>"
START_RESP, END_RESP = "<start_function_response>", "<end_function_response>"
CONTROL_TOKENS = (START_DECL, END_DECL, START_CALL, END_CALL, START_RESP, END_RESP, ESCAPE)   # text to read back
FUNCTIONGEMMA_INSTRUCTION = "You are a model that can do function calling with the following functions"
_CALL = re.compile(re.escape(START_CALL) + r"call:([^{]*)(\{.*?\})" + re.escape(END_CALL), re.S)


class FunctionGemmaFormat:
    name = "functiongemma"
    stop: tuple[str, ...] = (START_RESP,)
    call_opens = "<"

    def declarations(self, tools: Sequence[ToolSpec]) -> str:
        return FUNCTIONGEMMA_INSTRUCTION + self.declaration_tokens(tools)

    def declaration_tokens(self, tools: Sequence[ToolSpec]) -> str:
        """The declarations alone, without the instruction (which a developer message replaces)."""
        return "".join(f"{START_DECL}declaration:{t.name}"
                       + write_value(_schema_types_upper({"description": t.description,
                                                          "parameters": dict(t.parameters)}), sort_keys=True)
                       + END_DECL for t in tools)

    def call(self, calls: Sequence[ToolCall]) -> str:
        return "".join(f"{START_CALL}call:{c.name}{write_value(dict(c.arguments))}{END_CALL}" for c in calls)

    def result(self, name: str, content: str) -> str:
        try:
            value = json.loads(content)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            value = {"result": content}
        return f"{START_RESP}response:{name}{write_value(value)}{END_RESP}"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls): every `<start_function_call>call:NAME{...}<end_function_call>` in the text,
        and what is outside them. ToolFormatError for a call whose arguments do not parse."""
        calls = []
        for match in _CALL.finditer(text):
            value, end = read_value(match.group(2), 0)
            if end != len(match.group(2)) or not isinstance(value, dict):
                raise ToolFormatError(f"the call to {match.group(1)!r} has malformed arguments")
            calls.append(ToolCall(match.group(1), value))
        return _CALL.sub("", text).strip(), calls


def _schema_types_upper(value: Any) -> Any:
    """FunctionGemma's declarations write a schema's types as OpenAPI's upper-case names (STRING, OBJECT)."""
    if isinstance(value, dict):
        return {k: (v.upper() if k == "type" and isinstance(v, str) else _schema_types_upper(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_schema_types_upper(v) for v in value]
    return value


def write_value(value: Any, sort_keys: bool = False) -> str:
    """FunctionGemma's value syntax: strings between <escape> tokens, keys bare, no spaces."""
    if isinstance(value, str):
        if ESCAPE in value:
            raise ToolFormatError("a string cannot hold FunctionGemma's <escape> token")
        return f"{ESCAPE}{value}{ESCAPE}"
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = sorted(value.items()) if sort_keys else value.items()
        return "{" + ",".join(f"{_key(k)}:{write_value(v, sort_keys)}" for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(write_value(v, sort_keys) for v in value) + "]"
    raise ToolFormatError(f"cannot write a {type(value).__name__} in FunctionGemma's format")


def _key(key: str) -> str:
    if not key or any(c in key for c in ":{},[]") or ESCAPE in key:
        raise ToolFormatError(f"the key {key!r} cannot be written in FunctionGemma's format")
    return key


_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def read_value(text: str, i: int) -> tuple[Any, int]:
    """One value of FunctionGemma's syntax at text[i:]: (value, index after it)."""
    if text.startswith(ESCAPE, i):
        end = text.find(ESCAPE, i + len(ESCAPE))
        if end < 0:
            raise ToolFormatError("a string is not closed by <escape>")
        return text[i + len(ESCAPE):end], end + len(ESCAPE)
    if text.startswith("{", i):
        out, i = {}, i + 1
        while not text.startswith("}", i):
            colon = text.find(":", i)
            if colon < 0:
                raise ToolFormatError("an object's key has no ':'")
            key = text[i:colon]
            out[_key(key)], i = read_value(text, colon + 1)
            i = _after_item(text, i, "}")
        return out, i + 1
    if text.startswith("[", i):
        items, i = [], i + 1
        while not text.startswith("]", i):
            item, i = read_value(text, i)
            items.append(item)
            i = _after_item(text, i, "]")
        return items, i + 1
    for word, value in (("true", True), ("false", False), ("null", None)):
        if text.startswith(word, i):
            return value, i + len(word)
    number = _NUMBER.match(text, i)
    if number:
        return json.loads(number.group()), number.end()
    raise ToolFormatError(f"unexpected text at {text[i:i + 20]!r}")


def _after_item(text: str, i: int, close: str) -> int:
    if text.startswith(",", i):
        return i + 1
    if text.startswith(close, i):
        return i
    raise ToolFormatError(f"expected ',' or {close!r} at {text[i:i + 20]!r}")


# ---- choice ---------------------------------------------------------------------------------------

FORMATS = {"gemma-json": GemmaJsonFormat, "functiongemma": FunctionGemmaFormat}


def format_for(has_token: Callable[[str], bool], override: str | None = None):
    """The model's tool format: `override` when given, else FunctionGemma's where the tokenizer has its
    call token, else gemma-json."""
    if override is not None:
        if override not in FORMATS:
            raise ValueError(f"tool format must be one of {', '.join(FORMATS)}, not {override!r}")
        return FORMATS[override]()
    return FunctionGemmaFormat() if has_token(START_CALL) else GemmaJsonFormat()
