"""Tool calling at the API: the request's tools, tool choice and tool-call history, and the calls made,
in both dialects' shapes.

Owns `ToolRequest` (the declared tools, `tool_choice` as none / auto / required / one named tool, and
`parallel_tool_calls`), reading `tools` in both shapes Workers AI accepts (`{name, description,
parameters}` and OpenAI's `{type: "function", function: {...}}`), `tool_choice`, the tool fields of
messages (an assistant turn's `tool_calls` in either shape, a tool message's `tool_call_id` / `name`),
and the checks on them: names (OpenAI's `^[a-zA-Z0-9_-]{1,64}$`, no duplicates), parameters (a JSON
Schema of an object, checked against the 2020-12 meta-schema), calls in the history naming declared
tools with object arguments, and results answering an earlier call. Every problem is a `ToolFieldError`
with the field's path, for each dialect to word. Also reading the model's calls back out of its text
(each checked against its tool's schema, given a server-made id) and writing them as each dialect
does, and `ToolStream`, which splits a stream into text to send now and calls to send when complete.

Knows nothing of HTTP objects, the engine, tokens or grammars; the prompt format is gemlora.text's.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jsonschema

from gemlora.text.tool_format import ToolCall, ToolFormatError, ToolSpec

MAX_TOOLS = 128                         # OpenAI's limit on tools per request
MAX_TOOL_CALLS = 128                    # calls in one assistant turn of the history
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
CHOICES = ("none", "auto", "required")


class ToolFieldError(ValueError):
    """A tool field the server refuses: `path` locates it in the body (("tools", 0, "function", "name"))."""

    def __init__(self, message: str, path: tuple, missing: bool = False):
        super().__init__(message)
        self.path = path
        self.missing = missing          # a required field is absent (each dialect has its own words for it)


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[ToolSpec, ...]
    choice: str = "auto"                # "none", "auto", "required" or "named"
    name: str | None = None             # the tool, when choice is "named"
    parallel: bool = True               # parallel_tool_calls: more than one call in a turn

    @property
    def offered(self) -> tuple[ToolSpec, ...]:
        """The tools the model may call now."""
        if self.choice == "none":
            return ()
        if self.choice == "named":
            return tuple(t for t in self.tools if t.name == self.name)
        return self.tools


def parse_tools(value: Any) -> tuple[ToolSpec, ...]:
    if not isinstance(value, list):
        raise ToolFieldError("must be an array of tools", ("tools",))
    if len(value) > MAX_TOOLS:
        raise ToolFieldError(f"must have at most {MAX_TOOLS} tools, got {len(value)}", ("tools",))
    tools, seen = [], set()
    for i, item in enumerate(value):
        path: tuple = ("tools", i)
        if not isinstance(item, dict):
            raise ToolFieldError("must be an object", path)
        if "function" in item or "type" in item:          # OpenAI's shape (Workers AI takes it too)
            if item.get("type") != "function":
                raise ToolFieldError('"type" must be "function"', path + ("type",))
            item, path = item.get("function"), path + ("function",)
            if not isinstance(item, dict):
                raise ToolFieldError("must be an object with name, description and parameters", path)
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolFieldError("must be a string of 1 to 64 letters, digits, underscores or dashes",
                                 path + ("name",))
        if name in seen:
            raise ToolFieldError(f"names the tool {name!r} twice", path + ("name",))
        seen.add(name)
        description = item.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise ToolFieldError("must be a string", path + ("description",))
        parameters = item.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        _check_parameters(parameters, path + ("parameters",))
        tools.append(ToolSpec(name, description, parameters))
    return tuple(tools)


def _check_parameters(schema: Any, path: tuple) -> None:
    if not isinstance(schema, dict):
        raise ToolFieldError("must be a JSON Schema object", path)
    if schema.get("type", "object") != "object":
        raise ToolFieldError('must describe an object (its "type" must be "object"): arguments are named', path)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ToolFieldError(f"is not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}",
                             path) from None
    except RecursionError:
        raise ToolFieldError("nests too deeply", path) from None


def parse_tool_choice(value: Any, tools: tuple[ToolSpec, ...], parallel: Any = None) -> ToolRequest:
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolFieldError("must be a boolean", ("parallel_tool_calls",))
    parallel = True if parallel is None else parallel
    if value is None:
        return ToolRequest(tools, "auto" if tools else "none", parallel=parallel)
    if isinstance(value, str):
        if value not in CHOICES:
            raise ToolFieldError('must be "none", "auto", "required" or {"type": "function", "function": '
                                 '{"name": ...}}', ("tool_choice",))
        if value == "required" and not tools:
            raise ToolFieldError('is "required" but no tools are given', ("tool_choice",))
        return ToolRequest(tools, value, parallel=parallel)
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise ToolFieldError('must be "none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}}', ("tool_choice",))
    if name not in {t.name for t in tools}:
        raise ToolFieldError(f"names the tool {name!r}, which is not among the tools given",
                             ("tool_choice", "function", "name"))
    return ToolRequest(tools, "named", name, parallel)


def message_tool_fields(msg: dict, i: int) -> dict:
    """The tool fields of message `i` of the body, checked: {"tool_calls": (ToolCall, ...)} for an assistant
    turn that made calls, {"tool_call_id", "name"} for a tool result; {} otherwise."""
    role, out = msg.get("role"), {}
    calls = msg.get("tool_calls")
    if calls is not None and calls != []:
        if role != "assistant":
            raise ToolFieldError("only assistant messages carry tool calls", ("messages", i, "tool_calls"))
        if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
            raise ToolFieldError(f"must be an array of at most {MAX_TOOL_CALLS} tool calls",
                                 ("messages", i, "tool_calls"))
        out["tool_calls"] = tuple(_history_call(call, ("messages", i, "tool_calls", j)) for j, call in enumerate(calls))
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if msg.get(key) is not None:
                if not isinstance(msg[key], str) or not msg[key] or len(msg[key]) > 256:
                    raise ToolFieldError("must be a non-empty string of at most 256 characters", ("messages", i, key))
                out[key] = msg[key]
    return out


def _history_call(call: Any, path: tuple) -> ToolCall:
    if not isinstance(call, dict):
        raise ToolFieldError("must be an object", path)
    call_id = call.get("id", "")
    if call_id is None:
        call_id = ""
    if not isinstance(call_id, str) or len(call_id) > 256:
        raise ToolFieldError("must be a string of at most 256 characters", path + ("id",))
    if "function" in call:                               # OpenAI's {id, type, function: {name, arguments}}
        body, where = call["function"], path + ("function",)
        if not isinstance(body, dict):
            raise ToolFieldError("must be an object with name and arguments", where)
    else:                                                # Workers AI's {name, arguments}
        body, where = call, path
    name, arguments = body.get("name"), body.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ToolFieldError("must be the name of a tool", where + ("name",))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            raise ToolFieldError("must be a JSON object (or a string holding one)", where + ("arguments",)) from None
    if not isinstance(arguments, dict):
        raise ToolFieldError("must be a JSON object (or a string holding one)", where + ("arguments",))
    return ToolCall(name, arguments, call_id)


def check_history(messages: tuple[dict, ...], tools: ToolRequest | None) -> None:
    """Calls in the history name declared tools (when tools are given); a result's tool_call_id answers an
    earlier call."""
    declared = None if tools is None or not tools.tools else {t.name for t in tools.tools}
    ids: set[str] = set()
    for i, msg in enumerate(messages):
        for j, call in enumerate(msg.get("tool_calls") or ()):
            if declared is not None and call.name not in declared:
                raise ToolFieldError(f"calls the tool {call.name!r}, which is not among the tools given",
                                     ("messages", i, "tool_calls", j, "function", "name"))
            if call.id:
                ids.add(call.id)
        if msg.get("tool_call_id") is not None and msg["tool_call_id"] not in ids:
            raise ToolFieldError(f"answers the tool call {msg['tool_call_id']!r}, which no earlier assistant "
                                 "message made", ("messages", i, "tool_call_id"))


# ---- the model's calls ------------------------------------------------------------------------------

def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def read_calls(fmt, text: str, tools: ToolRequest) -> tuple[str, list[ToolCall]]:
    """(content, calls) of an output: the calls, each naming an offered tool with arguments valid against
    its schema and with a new id; ([text], []) when the output is text. ToolFormatError when an output that
    had to be calls is not (only a stop string can cut one short: the grammar wrote it)."""
    if tools.choice == "none":
        return text, []
    try:
        content, calls = fmt.parse(text)
    except ToolFormatError:
        content, calls = text, []
    offered = {t.name: t for t in tools.offered}
    if calls and all(c.name in offered and _valid(c.arguments, offered[c.name].parameters) for c in calls):
        return content, [ToolCall(c.name, c.arguments, new_call_id()) for c in calls]
    if tools.choice in ("required", "named"):
        raise ToolFormatError("the output is not a complete call of the tools offered")
    return text, []


def _valid(arguments, schema) -> bool:
    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError:
        return False
    return True


def openai_calls(calls: list[ToolCall]) -> list[dict]:
    return [{"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]


def workers_ai_calls(calls: list[ToolCall]) -> list[dict]:
    return [{"name": c.name, "arguments": dict(c.arguments)} for c in calls]


class ToolStream:
    """Splits a streamed output into text to send at once and calls to send when complete. With calls
    required the whole output is held; with `auto` the first visible character decides (a call starts
    with one of the format's `opens`, '{' or '[' for gemma-json, '<' for FunctionGemma; text, which the
    grammar lets start with none of them, streams as it comes)."""

    def __init__(self, tools: ToolRequest, opens: str):
        self.tools = tools
        self.opens = opens
        self.held: list[str] | None = [] if tools.choice in ("required", "named") else None
        self._decided = tools.choice != "auto"
        self._pending = ""                 # leading whitespace, before the output shows what it is

    def push(self, text: str) -> str:
        if not self._decided:
            start = text.lstrip()
            if not start:
                self._pending += text
                return ""
            self._decided, text, self._pending = True, self._pending + text, ""
            if start[0] in self.opens:
                self.held = []
        if self.held is not None:
            self.held.append(text)
            return ""
        return text

    def finish(self, fmt) -> tuple[str, list[ToolCall]]:
        """(text still to send, calls) at the end of the output."""
        if self.held is None:
            return self._pending, []
        return read_calls(fmt, "".join(self.held), self.tools)


# ---- the fields' JSON Schemas (the OpenAPI document's, declared beside the code that reads them) ---------

_FUNCTION = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "pattern": _NAME.pattern},
                            "description": {"type": ["string", "null"]},
                            "parameters": {"type": "object", "description": "A JSON Schema of an object (the "
                                           "arguments); default: no arguments."}}}
TOOLS_SCHEMA = {
    "type": "array", "maxItems": MAX_TOOLS,
    "items": {"anyOf": [_FUNCTION, {"type": "object", "required": ["type", "function"],
                                    "properties": {"type": {"const": "function"}, "function": _FUNCTION}}]},
    "description": "Tools the model may call, as `{name, description, parameters}` or OpenAI's `{type: \"function\", "
                   "function: {...}}`; names unique. Written into the prompt in the model's tool format (Google's "
                   "Gemma JSON format, or FunctionGemma's tokens where the tokenizer has them); calls are "
                   "enforced by a grammar: each names an offered tool and its arguments validate against its "
                   "`parameters`."}
TOOL_CHOICE_SCHEMA = {
    "anyOf": [{"enum": [None, *CHOICES]},
              {"type": "object", "required": ["type", "function"],
               "properties": {"type": {"const": "function"},
                              "function": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}}}}}],
    "description": "`auto` (the default with tools): text or calls, a call once begun completed validly; "
                   "`required`: only calls; a named function: only calls of it; `none`: text (the tools are not "
                   "offered, the history is still shown)."}
PARALLEL_SCHEMA = {"type": ["boolean", "null"], "default": True,
                   "description": "Let one answer hold several calls (default true)."}
_ARGUMENTS = {"anyOf": [{"type": "object"}, {"type": "string"}],
              "description": "An object, or a string holding one (OpenAI's)."}
HISTORY_CALL_SCHEMA = {
    "anyOf": [{"type": "object", "required": ["name"],
               "properties": {"id": {"type": "string"}, "name": {"type": "string", "minLength": 1},
                              "arguments": _ARGUMENTS}},
              {"type": "object", "required": ["function"],
               "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                              "function": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string", "minLength": 1},
                                                          "arguments": _ARGUMENTS}}}}]}
MESSAGE_TOOL_FIELDS = {
    "tool_calls": {"type": "array", "maxItems": MAX_TOOL_CALLS, "items": HISTORY_CALL_SCHEMA,
                   "description": "On an assistant turn: the calls it made (then `content` may be left out)."},
    "tool_call_id": {"type": "string", "minLength": 1, "maxLength": 256,
                     "description": "On a tool message: the call it answers (required on the OpenAI route)."},
    "name": {"type": "string", "minLength": 1, "maxLength": 256, "description": "On a tool message: the tool."},
}
WORKERS_AI_CALL_SCHEMA = {"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                          "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}}}
OPENAI_CALL_SCHEMA = {"type": "object", "required": ["id", "type", "function"], "additionalProperties": False,
                      "properties": {"id": {"type": "string", "pattern": "^call_"}, "type": {"const": "function"},
                                     "function": {"type": "object", "required": ["name", "arguments"],
                                                  "properties": {"name": {"type": "string"},
                                                                 "arguments": {"type": "string", "description":
                                                                               "A JSON object, as text."}}}}}
