"""OutputFormat: what a request asks its output to be (any JSON object, or JSON following a schema).

Owns reading the request fields that ask for it, in both dialects' shapes: OpenAI's and Workers AI's
`response_format` (`{"type": "text" | "json_object" | "json_schema", ...}`) and `guided_json` (a
schema, or a schema in a JSON string). Raises OutputFormatError (the field, and what is wrong) for
the API to word. Knows nothing of grammars, tokens, the engine or HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_SCHEMA_BYTES = 64 * 1024        # a schema is compiled per request: bound the work a caller can ask for


class OutputFormatError(ValueError):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class OutputFormat:
    schema: str | None          # canonical JSON of the schema; None: any JSON object (JSON mode)
    field: str                  # the request field that asked for it, for error messages
    lark: str | None = None     # instead of a schema: a Lark grammar (tool calls or text, gemlora.structured.tool_grammar)

    @property
    def json_object(self) -> bool:
        return self.schema is None and self.lark is None

    @property
    def json(self) -> bool:
        """The whole output is one JSON value (so a complete one parses)."""
        return self.lark is None


def canonical(schema: Any, field: str) -> str:
    if not isinstance(schema, dict):
        raise OutputFormatError("the JSON schema must be an object", field)
    try:
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise OutputFormatError("the JSON schema nests too deeply", field) from None
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise OutputFormatError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes", field)
    return text


def from_response_format(value: Any, field: str = "response_format") -> OutputFormat | None:
    """OpenAI's `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, Workers AI's
    `{"type": "json_schema", "json_schema": <schema>}` (either wrapper is read on both routes),
    `{"type": "json_object"}`, or `{"type": "text"}` / null (no constraint)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise OutputFormatError('must be an object with a "type" of "text", "json_object" or "json_schema"', field)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat(None, field)
    if kind != "json_schema":
        raise OutputFormatError(f'"type" must be "text", "json_object" or "json_schema", got "{kind}"', field)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise OutputFormatError('"json_schema" (an object) is required with type "json_schema"', field)
    # OpenAI's wrapper names the schema; a JSON schema itself has no "schema" keyword
    if "schema" in spec and ("name" in spec or "strict" in spec or len(spec) == 1):
        if "name" in spec and not isinstance(spec["name"], str):
            raise OutputFormatError('"json_schema.name" must be a string', field)
        if not isinstance(spec["schema"], dict):      # 5, "x", [], false: never the wrapper read as a schema
            raise OutputFormatError('"json_schema.schema" must be an object (a JSON schema)', field)
        return OutputFormat(canonical(spec["schema"], field), field)
    if "name" in spec and "schema" not in spec and set(spec) <= {"name", "strict", "description"}:
        return OutputFormat(canonical({}, field), field)     # OpenAI allows the schema to be left out
    return OutputFormat(canonical(spec, field), field)


def from_guided_json(value: Any, field: str = "guided_json") -> OutputFormat | None:
    """A schema object, or the same as a JSON string (vLLM's and Workers AI's gemma-3 field)."""
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > 4 * MAX_SCHEMA_BYTES:          # whitespace aside, it could not fit the limit
            raise OutputFormatError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes", field)
        try:
            value = json.loads(value)
        except RecursionError:                         # a 2,000-level nesting: Python's parser gives up
            raise OutputFormatError("the JSON schema nests too deeply", field) from None
        except ValueError:
            raise OutputFormatError("must be a JSON schema: an object, or a string holding one", field) from None
    return OutputFormat(canonical(value, field), field)
