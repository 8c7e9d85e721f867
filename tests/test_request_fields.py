"""One declaration per request option (gemlora.api.fields): the parsers and /openapi.json agree.

Each option of the three generation routes is declared once; the pydantic bodies and the document's
request schemas are both built from that declaration, and numeric ranges come from
gemlora.sampling.RANGES, which SamplingParams checks. Here every declared option, on every route that
reads it, is sent a spread of values (nulls, booleans, numbers at and past each range's ends, integral
floats, strings, arrays, objects): the parser must accept exactly the bodies the document's schema
accepts. The one kind of value where the two may differ is a `guided_json` string: the document types it
as a string whose content is JSON (`contentMediaType`, which JSON Schema annotates and does not check);
the parser also reads the content, and refuses a string that holds no JSON schema object.
"""

from __future__ import annotations

import json

import pytest

from gemlora.api import fields
from gemlora.api.errors import ApiError
from gemlora.api.openai_schemas import parse_chat_completion, parse_completion
from gemlora.api.schemas import parse_run_body
from gemlora.sampling import RANGES, SamplingParams
from test_openapi import MODEL, document, validator

_SCHEMA = {fields.RUN: "RunRequest", fields.CHAT: "ChatCompletionRequest", fields.COMPLETION: "CompletionRequest"}
_BASE = {fields.RUN: {"messages": [{"role": "user", "content": "hi"}]},
         fields.CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
         fields.COMPLETION: {"model": MODEL, "prompt": "hi"}}
_PARSE = {fields.RUN: parse_run_body, fields.CHAT: parse_chat_completion, fields.COMPLETION: parse_completion}


def _probes() -> list:
    values = [None, True, False, 0, 1, -1, 0.0, 0.5, 1.0, 2.5, 5.5, "x", "", "true", "false", "auto", "none",
              "required", [], ["a"], [""], ["a"] * 5, ["a"] * 17, ["text"], {}, {"type": "json_object"},
              {"type": "text"}, {"type": "json_schema", "json_schema": {"type": "object"}}, {"rejectIfBusy": True},
              {"include_usage": True}, '{"type": "object"}', "x" * 4097]
    for r in RANGES.values():                      # each range's ends, and just past them
        for end in (r.lo, r.hi):
            if end is not None:
                values += [end, end - 1, end + 1, end + 0.5, float(end)]
    return values


def _accepted(route: str, body: dict) -> tuple[bool, str]:
    try:
        _PARSE[route](json.dumps(body).encode(), max_length=4096)
    except ApiError as exc:
        return False, exc.message
    return True, ""


def _holds_schema_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("route", fields.ALL)
def test_the_parser_accepts_exactly_what_the_document_does(route):
    schema = validator(document(), f"/components/schemas/{_SCHEMA[route]}")
    probes = _probes()
    disagree, checked = [], 0
    for name in sorted(fields.names(route)):
        for value in probes:
            body = {**_BASE[route], name: value}
            documented = schema.is_valid(body)
            accepted, why = _accepted(route, body)
            checked += 1
            if documented == accepted:
                continue
            if name == "guided_json" and documented and isinstance(value, str) and not _holds_schema_object(value):
                assert "JSON schema" in why, why       # read and refused by content: the one documented gap
                continue
            disagree.append((name, value, documented, why))
    assert not disagree, disagree[:20]
    assert checked >= 30 * len(fields.names(route))


@pytest.mark.parametrize("route", fields.ALL)
def test_a_body_without_options_gets_the_declared_defaults(route):
    parsed = _PARSE[route](json.dumps(_BASE[route]).encode())
    req = parsed if route == fields.RUN else parsed[1]          # the OpenAI parsers also return the model
    engine = SamplingParams()
    for name in fields.SAMPLING:
        declared = fields.default(name, route)
        assert getattr(req.params, name) == (getattr(engine, name) if declared is None else declared), name
    properties = fields.properties(route, 4096)
    for name in fields.SAMPLING:             # the document states the same defaults, and the engine's ranges
        assert properties[name].get("default") == fields.default(name, route), name
        for key in ("minimum", "maximum", "exclusiveMinimum"):
            assert properties[name].get(key) == RANGES[name].json_schema().get(key), (name, key)


def test_every_option_a_route_reads_is_declared_once():
    for route in fields.ALL:
        declared = [f.name for f in fields.FIELDS if route in f.routes]
        assert len(declared) == len(set(declared)), route
    # the Workers AI defaults are the engine's own (one number for temperature 0.6, max_tokens 256, ...)
    engine = SamplingParams()
    for name in fields.SAMPLING:
        if getattr(engine, name) is not None:
            assert fields.default(name, fields.RUN) == getattr(engine, name)
    assert fields.default("temperature", fields.CHAT) == fields.OPENAI_TEMPERATURE != engine.temperature
