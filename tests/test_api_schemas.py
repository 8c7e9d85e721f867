"""Workers AI run bodies (ai/run) -> GenerateRequest: both oneOf branches, every option, and Workers AI's error
texts naming the field. Pure, fast, no engine and no HTTP. (OpenAI's bodies: test_openai_schemas.py; the
envelopes: test_api_errors.py.)"""

from __future__ import annotations

import dataclasses
import json

import pytest

from gemlora.api.errors import ApiError
from gemlora.api.schemas import GenerateRequest, parse_run_body
from gemlora.sampling import SamplingParams

USER = [{"role": "user", "content": "hi"}]


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def run_error(obj, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_run_body(obj if isinstance(obj, bytes) else body(obj), **kw)
    err = info.value
    assert (err.code, err.status) == (5006, 400)
    assert err.message.startswith("AiError: Bad input: ")
    return err


def run_message(obj, **kw) -> str:
    return run_error(obj, **kw).message.removeprefix("AiError: Bad input: ")


# --------------------------------------------------------------------------------------------------
# Workers AI run bodies: the valid branches


def test_prompt_branch_with_defaults():
    req = parse_run_body(body({"prompt": "Tell me a joke"}))
    assert req == GenerateRequest(prompt="Tell me a joke", messages=None, raw=False, stream=False,
                                  params=SamplingParams(max_tokens=256, temperature=0.6), lora=None)
    assert req.lora_scale == 1.0 and req.include_usage is True
    assert req.params.top_p == 1.0 and req.params.top_k is None and req.params.seed is None


def test_messages_branch_with_defaults_and_every_role():
    msgs = [{"role": r, "content": f"c-{r}"} for r in ("system", "user", "assistant", "model", "user")]
    req = parse_run_body(body({"messages": msgs}))
    assert req.prompt is None and req.messages == tuple(msgs)
    assert req.raw is False and req.stream is False and req.lora is None
    assert req.params.max_tokens == 256 and req.params.temperature == 0.6


def test_every_option_is_carried_into_sampling_params():
    req = parse_run_body(body({"prompt": "p", "raw": True, "stream": True, "max_tokens": 7, "temperature": 0,
                               "top_p": 0.5, "top_k": 3, "seed": 42, "repetition_penalty": 1.2,
                               "frequency_penalty": 0.5, "presence_penalty": 2, "lora": "my-ft", "lora_scale": 0.5}))
    assert req.raw is True and req.stream is True and req.lora == "my-ft" and req.lora_scale == 0.5
    assert req.params == SamplingParams(max_tokens=7, temperature=0, top_p=0.5, top_k=3, seed=42,
                                        repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=2)


def test_message_items_keep_only_role_and_content_and_unknown_keys_pass():
    # Unknown top-level keys still pass, as on Workers AI (no additionalProperties: false), but they are
    # reported (and logged by the server), never dropped in silence.
    req = parse_run_body(body({"messages": [{"role": "user", "content": "hi", "name": "x"}],
                               "options": {"rejectIfBusy": True}, "response_format": {"type": "text"},
                               "tags": ["a"], "zzz": 1}))
    assert req.messages == ({"role": "user", "content": "hi"},)
    assert req.reject_if_busy is True and req.ignored_fields == ("tags", "zzz")


@pytest.mark.parametrize("field,value", [("response_format", {"type": "xml"}), ("guided_json", "{not json"),
                                         ("guided_json", ["a"]), ("response_format", {"type": "json_schema"}),
                                         ("tools", [{"type": "function"}]), ("functions", [{"name": "f"}])])
def test_output_changing_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(ApiError) as err:
        parse_run_body(body({"prompt": "hi", field: value}))
    assert err.value.code == 5006 and f"'/{field}'" in err.value.message


def test_stop_strings_on_ai_run():
    assert parse_run_body(body({"prompt": "hi", "stop": "\n\n"})).params.stop == ("\n\n",)
    assert parse_run_body(body({"prompt": "hi", "stop": ["a", "b"]})).params.stop == ("a", "b")
    for bad in ("", [""], ["a", 1], None, 3, ["x"] * 17):
        with pytest.raises(ApiError, match="/stop"):
            parse_run_body(body({"prompt": "hi", "stop": bad}))


@pytest.mark.parametrize("extra", [{"prompt": "hi"}, {"messages": USER}])
def test_lora_is_accepted_on_both_branches(extra):
    req = parse_run_body(body({**extra, "lora": "3dd75f75-ef0e-4d1d-9d0a-4e5c0a6e0a11"}))
    assert req.lora == "3dd75f75-ef0e-4d1d-9d0a-4e5c0a6e0a11"


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("false", False)])
def test_raw_accepts_booleans_and_the_docs_strings(value, expected):
    assert parse_run_body(body({"prompt": "hi", "raw": value})).raw is expected


def test_raw_is_ignored_with_messages():
    # Cloudflare's LoRA docs send messages + "raw": "true" + lora: messages are templated anyway.
    req = parse_run_body(body({"messages": USER, "raw": "true", "lora": "ft"}))
    assert req.raw is False and req.messages == tuple(USER)


def test_raw_other_strings_are_type_errors():
    assert run_message({"prompt": "hi", "raw": "yes"}) == "Type mismatch of '/raw', 'string' not in 'boolean'"
    assert run_message({"prompt": "hi", "raw": 1}) == "Type mismatch of '/raw', 'integer' not in 'boolean'"


def test_body_is_json_whatever_it_looks_like():
    # What `curl -d` sends (form-urlencoded content type); the body is parsed as JSON, never form-decoded.
    raw = b'{"prompt":"a+b%20c&d=e","max_tokens":3}'
    req = parse_run_body(raw)
    assert req.prompt == "a+b%20c&d=e" and req.params.max_tokens == 3


def test_integral_floats_are_integers():
    # JSON has one number type: 5.0 is an integer to JSON Schema and to JavaScript.
    req = parse_run_body(body({"prompt": "hi", "max_tokens": 5.0, "top_k": 3.0, "seed": 7.0}))
    assert req.params.max_tokens == 5 and isinstance(req.params.max_tokens, int)
    assert req.params.top_k == 3 and req.params.seed == 7


# --------------------------------------------------------------------------------------------------
# Workers AI run bodies: errors


@pytest.mark.parametrize("raw", [b"", b"not json", b"prompt=hi", b"[1, 2]", b'"hi"', b"null", b"3",
                                 b"\xff\xfe", b'{"prompt": "hi"', b'{"prompt": "hi", "temperature": NaN}'])
def test_not_a_json_object(raw):
    err = run_error(raw)
    assert err.message == "AiError: Bad input: the body is not a JSON object"


def test_neither_prompt_nor_messages():
    assert run_message({"max_tokens": 5}) == ("Error: oneOf at '/' not met, 0 matches: required properties at '/' "
                                              "are 'prompt', required properties at '/' are 'messages'")
    assert run_message({}).startswith("Error: oneOf at '/' not met, 0 matches")


def test_both_prompt_and_messages():
    msg = run_message({"prompt": "hi", "messages": USER})
    assert msg.startswith("Error: oneOf at '/' not met, 2 matches")
    assert "'prompt'" in msg and "'messages'" in msg


@pytest.mark.parametrize("obj,message,param", [
    ({"messages": [{"role": "user", "content": ["x"]}]},
     "Type mismatch of '/messages/0/content', 'array' not in 'string'", "/messages/0/content"),
    ({"prompt": "hi", "max_tokens": "5"}, "Type mismatch of '/max_tokens', 'string' not in 'integer'", "/max_tokens"),
    ({"prompt": "hi", "max_tokens": 5.5}, "Type mismatch of '/max_tokens', 'number' not in 'integer'", "/max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "Type mismatch of '/temperature', 'string' not in 'number'",
     "/temperature"),
    ({"prompt": "hi", "temperature": True}, "Type mismatch of '/temperature', 'boolean' not in 'number'",
     "/temperature"),
    ({"prompt": "hi", "top_k": None}, "Type mismatch of '/top_k', 'null' not in 'integer'", "/top_k"),
    ({"prompt": "hi", "stream": "true"}, "Type mismatch of '/stream', 'string' not in 'boolean'", "/stream"),
    ({"prompt": 5}, "Type mismatch of '/prompt', 'integer' not in 'string'", "/prompt"),
    ({"prompt": None}, "Type mismatch of '/prompt', 'null' not in 'string'", "/prompt"),
    ({"prompt": "hi", "lora": 3}, "Type mismatch of '/lora', 'integer' not in 'string'", "/lora"),
    ({"prompt": "hi", "lora": ""}, "'/lora' must NOT have fewer than 1 characters", "/lora"),
    ({"messages": "hi"}, "Type mismatch of '/messages', 'string' not in 'array'", "/messages"),
    ({"messages": ["hi"]}, "Type mismatch of '/messages/0', 'string' not in 'object'", "/messages/0"),
    ({"messages": []}, "'/messages' must NOT have fewer than 1 items", "/messages"),
    ({"messages": [{"role": "user"}]}, "required properties at '/messages/0' are 'content'", "/messages/0/content"),
    ({"messages": [{"content": "x"}]}, "required properties at '/messages/0' are 'role'", "/messages/0/role"),
    ({"messages": [{"role": 1, "content": "x"}]}, "Type mismatch of '/messages/0/role', 'integer' not in 'string'",
     "/messages/0/role"),
])
def test_type_errors_name_the_field(obj, message, param):
    err = run_error(obj)
    assert err.message == f"AiError: Bad input: {message}" and err.param == param


@pytest.mark.parametrize("role", ["function", "bot", "User", ""])
def test_bad_role(role):
    msgs = [{"role": "user", "content": "a"}, {"role": role, "content": "b"}]
    err = run_error({"messages": msgs})
    assert err.param == "/messages/1/role"
    assert err.message == ("AiError: Bad input: '/messages/1/role' must be one of "
                           "'system', 'user', 'assistant', 'model', 'tool'")


@pytest.mark.parametrize("field,ok,bad,message", [
    ("temperature", [0, 0.6, 5], [5.01, -0.1], None),
    ("top_p", [0, 1, 2], [2.01, -0.01], None),
    ("top_k", [1, 50], [0, 51], None),
    ("seed", [1, 9_999_999_999], [0, 10_000_000_000, -5], None),
    ("repetition_penalty", [0.01, 1, 2], [0, 2.01, -1], None),
    ("frequency_penalty", [0, 2], [-0.01, 2.01], None),
    ("presence_penalty", [0, 2], [-0.01, 2.01], None),
    ("lora_scale", [0, 1, 10], [-0.1, 10.5], None),
    ("max_tokens", [1, 256, 100_000], [0, -1], None),
])
def test_ranges_and_their_boundaries(field, ok, bad, message):
    for value in ok:
        req = parse_run_body(body({"prompt": "hi", field: value}))
        got = req.lora_scale if field == "lora_scale" else getattr(req.params, field)
        assert got == value
    for value in bad:
        err = run_error({"prompt": "hi", field: value})
        assert err.param == f"/{field}" and f"'/{field}' must" in err.message, err.message


@pytest.mark.parametrize("obj,message", [
    ({"prompt": "hi", "top_k": 51}, "'/top_k' must be <= 50"),
    ({"prompt": "hi", "top_k": 0}, "'/top_k' must be >= 1"),
    ({"prompt": "hi", "temperature": 5.01}, "'/temperature' must be <= 5"),
    ({"prompt": "hi", "seed": 0}, "'/seed' must be >= 1"),
    ({"prompt": "hi", "repetition_penalty": 0}, "'/repetition_penalty' must be > 0"),
    ({"prompt": "hi", "lora_scale": 11}, "'/lora_scale' must be <= 10"),
    ({"messages": USER, "top_p": 3}, "'/top_p' must be <= 2"),
])
def test_range_messages_are_workers_ai_style(obj, message):
    assert run_message(obj) == message


def test_overflowing_numbers_are_out_of_range():
    # 1e400 parses as infinity (JSON has no such literal, so NaN / Infinity are not JSON at all).
    assert run_message(b'{"prompt": "hi", "temperature": 1e400}') == "'/temperature' must be <= 5"
    assert run_message(b'{"prompt": "hi", "top_k": 1e400}') == "Type mismatch of '/top_k', 'number' not in 'integer'"
    assert run_message(b'{"prompt": "hi", "top_k": 1e20}') == "'/top_k' must be <= 50"


def test_prompt_length():
    assert parse_run_body(body({"prompt": "x" * 4096})).prompt == "x" * 4096
    err = run_error({"prompt": "x" * 4097})
    assert err.message == "AiError: Bad input: '/prompt' must NOT have more than 4096 characters"
    assert err.param == "/prompt"
    assert run_message({"prompt": ""}) == "'/prompt' must NOT have fewer than 1 characters"


def test_message_content_length():
    ok = [{"role": "user", "content": "x" * 4096}]
    assert parse_run_body(body({"messages": ok})).messages[0]["content"] == "x" * 4096
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * 4097}]
    err = run_error({"messages": bad})
    assert err.message == "AiError: Bad input: '/messages/1/content' must NOT have more than 4096 characters"


def test_max_length_is_a_setting():
    assert parse_run_body(body({"prompt": "x" * 5000}), max_length=None).prompt == "x" * 5000
    assert parse_run_body(body({"prompt": "x" * 10}), max_length=10)
    assert run_message({"prompt": "x" * 11}, max_length=10) == "'/prompt' must NOT have more than 10 characters"
    msgs = [{"role": "user", "content": "x" * 11}]
    assert "'/messages/0/content' must NOT have more than 10" in run_message({"messages": msgs}, max_length=10)


def test_generate_request_needs_exactly_one_input():
    with pytest.raises(ValueError):
        GenerateRequest(prompt=None, messages=None, raw=False, stream=False, params=SamplingParams(), lora=None)
    req = parse_run_body(body({"prompt": "hi"}))
    assert GenerateRequest(**{**req.__dict__, "lora": "x"}).lora == "x"
    assert dataclasses.replace(req, stream=True).stream is True
