"""Hypothesis against the surfaces whose contents the OpenAPI document cannot describe, so schemathesis
(tests/test_fuzz_api.py) sends them only as opaque values: the JSON schemas of `guided_json` and
`response_format` on every route, tools (their parameters, tool_choice and a history of calls and
results), the logprobs fields, and the adapter_config.json of an upload (PEFT's regexes included). Every answer is no 5xx and an error in its dialect's envelope; where an output is
complete, `jsonschema` (the oracle) validates it against its schema; every upload is answered in bounded
time. Reproducible: derandomized, no example database. The counts are printed for the issue's note.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter

import jsonschema
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from conftest import tiny_lora_tensors
from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine

MODEL = "@cf/google/gemma-7b-it-lora"
AUTH = {"authorization": "Bearer tok"}
RUN = f"/client/v4/accounts/acct/ai/run/{MODEL}"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
TALLY: Counter = Counter()


@pytest.fixture(scope="module")
def app(tiny_real_vocab, tmp_path_factory):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32", kv_cache_memory_gb=0.1,
                                                  max_model_len=1024), progress=False).start()
    settings_ = ServerSettings(model_names=(MODEL,), data_dir=tmp_path_factory.mktemp("fuzz-surfaces"),
                               max_finetunes_per_account=10**6)
    application = create_app(engine, settings_, Auth({"tok": "acct"}))
    yield TestClient(application, raise_server_exceptions=False), engine
    engine.shutdown()
    print(f"\nfuzzed surfaces: {dict(sorted(TALLY.items()))}")


def check_envelope(path: str, r) -> dict:
    assert r.status_code < 500, (path, r.status_code, r.text[:2000])
    body = r.json()
    if r.status_code >= 400:
        if "/v1/" in path:
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        else:
            assert body["success"] is False and len(body["errors"]) == 1 and body["result"] == {}, body
    return body


# ---- JSON schemas ---------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=6),
                    st.floats(-1e3, 1e3, allow_nan=False, width=32))
PATTERNS = st.lists(st.sampled_from(["a", "b", ".", ".*", "(", ")", "*", "+", "?", "|", "\\d", "[0-9]", "{2}",
                                     "{1,3}", "^", "$", "(a{1000}){1000}", "(?=x)", "\\1", "x"]),
                    max_size=6).map("".join)
KEYWORDS = ["type", "properties", "items", "required", "enum", "const", "minimum", "maximum", "minLength",
            "maxLength", "pattern", "anyOf", "oneOf", "allOf", "not", "$ref", "$defs", "additionalProperties",
            "minItems", "maxItems", "uniqueItems", "format", "prefixItems", "exclusiveMinimum", "multipleOf"]
TYPES = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "strin"])
LEAVES = st.one_of(
    st.fixed_dictionaries({"type": TYPES}),
    st.fixed_dictionaries({"enum": st.lists(SCALARS, min_size=1, max_size=4)}),
    st.fixed_dictionaries({"const": SCALARS}),
    st.fixed_dictionaries({"type": st.just("string"), "pattern": PATTERNS}),
    st.fixed_dictionaries({"type": st.just("string")}, optional={"minLength": st.integers(0, 4),
                                                                 "maxLength": st.integers(0, 4)}),
    st.fixed_dictionaries({"type": st.just("integer")}, optional={"minimum": st.integers(-5, 5),
                                                                  "maximum": st.integers(-5, 5)}),
    st.just({}), st.just({"$ref": "#/$defs/nope"}), st.just({"format": "date-time", "type": "string"}),
)


def _extend(children):
    names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=4)
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(names, children, max_size=3)},
                              optional={"required": st.lists(names, max_size=2),
                                        "additionalProperties": st.booleans()}),
        st.fixed_dictionaries({"type": st.just("array"), "items": children},
                              optional={"minItems": st.integers(0, 3), "maxItems": st.integers(0, 3)}),
        st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"allOf": st.lists(children, min_size=1, max_size=2)}),
        st.fixed_dictionaries({"$defs": st.fixed_dictionaries({"n": children}), "$ref": st.just("#/$defs/n")}),
        st.dictionaries(st.sampled_from(KEYWORDS), st.one_of(children, SCALARS, st.lists(SCALARS, max_size=2)),
                        max_size=3),                                             # keywords with any values
    )


SCHEMAS = st.recursive(LEAVES, _extend, max_leaves=8)


@st.composite
def schema_requests(draw):
    """(path, body, the schema when the body holds one) over the four ways a schema can be sent."""
    schema = draw(SCHEMAS)
    as_string = draw(st.booleans())
    sent = json.dumps(schema) if as_string else schema
    base = {"max_tokens": draw(st.integers(1, 12)), "temperature": draw(st.sampled_from([0, 0.7]))}
    route = draw(st.sampled_from(["run-guided", "run-format", "chat-format", "completion-guided"]))
    wrapper = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    if route == "run-guided":
        return RUN, {**base, "prompt": "JSON:", "guided_json": sent}, schema
    if route == "run-format":
        return RUN, {**base, "prompt": "JSON:", "response_format": {"type": "json_schema", "json_schema": schema}}, schema
    if route == "chat-format":
        return "/v1/chat/completions", {**base, "model": MODEL, "messages": [{"role": "user", "content": "JSON"}],
                                        "response_format": wrapper}, schema
    return "/v1/completions", {**base, "model": MODEL, "prompt": "JSON:", "guided_json": sent}, schema


@pytest.mark.slow
@FUZZ
@given(case=schema_requests())
def test_fuzz_json_schemas_on_every_route(app, case):
    client, _ = app
    path, body, schema = case
    r = client.post(path, headers=AUTH, json=body)
    out = check_envelope(path, r)
    TALLY[f"json-schema {r.status_code}"] += 1
    if r.status_code != 200:
        return
    # every 200 is complete, whatever ended it (budget steering): the oracle checks it
    if path == RUN:
        value = out["result"]["response"]
        value = json.loads(value) if "guided_json" in body else value
    else:
        choice = out["choices"][0]
        value = json.loads(choice["message"]["content"] if "message" in choice else choice["text"])
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(value, schema)
    TALLY["json-schema outputs validated"] += 1


# ---- tools ----------------------------------------------------------------------------------------

TOOL_NAMES = st.one_of(st.sampled_from(["f", "get_x", "g-2"]), st.text(max_size=5))
ODD_VALUE = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2))


SIMPLE_PROPERTY = st.one_of(st.just({"type": "string"}), st.just({"type": "integer", "minimum": 0}),
                            st.just({"type": "boolean"}), st.just({"enum": ["x", "y"]}),
                            st.just({"type": "array", "items": {"type": "number"}, "maxItems": 2}))


@st.composite
def tool_requests(draw):
    """(path, body, {tool name: its parameters}) with declared tools, a tool_choice and a history: half of
    the cases well formed (the calls then validated), half hostile in each part (names odd or repeated,
    parameters any schema or not an object, calls of unknown tools, results answering no call, arguments
    that are not objects)."""
    hostile = draw(st.booleans())
    tools = []
    for i in range(draw(st.integers(0 if hostile else 1, 3))):
        if hostile:
            parameters = draw(st.one_of(SCHEMAS, ODD_VALUE, st.fixed_dictionaries(
                {"type": st.just("object"), "properties": st.dictionaries(st.sampled_from("abc"), SCHEMAS, max_size=2)},
                optional={"required": st.lists(st.sampled_from("abcd"), max_size=2)})))
            name = draw(TOOL_NAMES)
        else:
            properties = draw(st.dictionaries(st.sampled_from("abc"), SIMPLE_PROPERTY, max_size=3))
            parameters = {"type": "object", "properties": properties,
                          "required": draw(st.lists(st.sampled_from(sorted(properties) or ["a"]), unique=True,
                                                    max_size=len(properties)))}
            name = f"tool_{i}"
        function = {"name": name, "parameters": parameters}
        shapes = [function, {"type": "function", "function": function}] + ([{"type": "tool", "function": function}]
                                                                            if hostile else [])
        tools.append(draw(st.sampled_from(shapes)))
    declared = [t.get("function", t)["name"] for t in tools]
    choices = [st.none(), st.sampled_from(["none", "auto", "required"]),
               st.builds(lambda n: {"type": "function", "function": {"name": n}}, st.sampled_from(declared or ["f"]))]
    if hostile:
        choices += [st.just("sometimes"), st.builds(lambda n: {"type": "function", "function": {"name": n}}, TOOL_NAMES)]
    choice = draw(st.one_of(*choices))
    messages = [{"role": "user", "content": "Do it."}]
    if draw(st.booleans()):
        call_id = draw(st.sampled_from(["c1", "", "x" * 300] if hostile else ["c1"]))
        name = draw(st.one_of(st.sampled_from(declared or ["f"]), TOOL_NAMES) if hostile
                    else st.sampled_from(declared))
        arguments = draw(st.one_of(st.just("{}"), st.just('{"a": 1}'), st.text(max_size=4), ODD_VALUE) if hostile
                         else st.sampled_from(["{}", '{"a": "1"}']))
        messages.append({"role": "assistant", "content": draw(st.sampled_from([None, "", "ok"])),
                         "tool_calls": [{"id": call_id, "type": "function",
                                         "function": {"name": name, "arguments": arguments}}]})
        messages.append({"role": "tool", "tool_call_id": draw(st.sampled_from([call_id, "c2", None]) if hostile
                                                              else st.just(call_id)),
                         "content": draw(st.sampled_from(['{"t": 3}', "plain", "<escape>"]))})
        messages.append({"role": "user", "content": "And now?"})
    body = {"messages": messages, "max_tokens": draw(st.integers(1, 40)), "temperature": draw(st.sampled_from([0, 1.0])),
            "stream": draw(st.booleans())}
    if tools or draw(st.booleans()):
        body["tools"] = tools
    if choice is not None:
        body["tool_choice"] = choice
    if draw(st.booleans()):
        body["parallel_tool_calls"] = draw(st.one_of(st.booleans(), st.just("yes")) if hostile else st.booleans())
    parameters = {t.get("function", t)["name"]: t.get("function", t)["parameters"] for t in tools}
    if draw(st.booleans()):
        return RUN, body, parameters
    return "/v1/chat/completions", {**body, "model": MODEL}, parameters


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.mark.slow
@FUZZ
@given(case=tool_requests())
def test_fuzz_tools(app, case):
    """No 5xx; errors in the envelope; every call a 200 returns names a declared tool, with arguments that
    validate against its parameters (jsonschema)."""
    client, _ = app
    path, body, parameters = case
    r = client.post(path, headers=AUTH, json=body)
    TALLY[f"tools {r.status_code}"] += 1
    if body["stream"] and r.status_code == 200:
        events = _events(r.text)
        for event in events:
            assert "error" not in event and "errors" not in event, event
        if path == RUN:
            calls = [(c["name"], c["arguments"]) for e in events for c in e.get("tool_calls", ())]
        else:
            calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for e in events for choice in e["choices"] for c in choice["delta"].get("tool_calls", ())]
    else:
        out = check_envelope(path, r)
        if r.status_code != 200:
            return
        if path == RUN:
            calls = [(c["name"], c["arguments"]) for c in out["result"].get("tool_calls", ())]
        else:
            message = out["choices"][0]["message"]
            calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in message.get("tool_calls", ())]
            assert (out["choices"][0]["finish_reason"] == "tool_calls") == bool(calls)
    for name, arguments in calls:
        assert name in parameters, (name, parameters)
        jsonschema.validate(arguments, parameters[name])
        TALLY["tool calls validated"] += 1


# ---- logprobs -------------------------------------------------------------------------------------

ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.text(max_size=3), st.floats(allow_nan=True),
                st.lists(st.integers(), max_size=2))


@pytest.mark.slow
@FUZZ
@given(chat=st.booleans(), stream=st.booleans(), logprobs=ODD, top=ODD, n=st.integers(1, 6))
def test_fuzz_logprobs(app, chat, stream, logprobs, top, n):
    client, _ = app
    body = {"model": MODEL, "max_tokens": n, "stream": stream, "logprobs": logprobs, "top_logprobs": top}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})
    if top is None:
        body.pop("top_logprobs")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = client.post(path, headers=AUTH, content=json.dumps(body))      # NaN as Python writes it: not JSON
    TALLY[f"logprobs {r.status_code}"] += 1
    if stream and r.status_code == 200:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events and all("error" not in e for e in events), r.text[-2000:]
        return
    out = check_envelope(path, r)
    if r.status_code != 200 or not logprobs:
        return
    got = out["choices"][0]["logprobs"]
    if chat:
        assert got is not None and len(got["content"]) == out["usage"]["completion_tokens"]
        for entry in got["content"]:
            assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == (top or 0)
    else:
        assert len(got["tokens"]) == len(got["token_logprobs"]) == out["usage"]["completion_tokens"]


# ---- adapter configs ------------------------------------------------------------------------------

MODULES = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                           "lm_head", "embed_tokens", "nope", "self_attn", "mlp"])
REGEXES = st.one_of(PATTERNS, st.sampled_from(["(.*.*)*x", r".*\.(q|v)_proj", r"model\.layers\.\d+\.self_attn\.q_proj",
                                               "(a|a)*$", "[", r"(?P<x>q)(?P=x)", "q_proj" * 700]))


@st.composite
def adapter_configs(draw):
    # mostly valid at the top (the weights are a rank-2 q_proj LoRA), so that the optional keys decide
    config = {"peft_type": draw(st.sampled_from(["LORA"] * 6 + ["IA3", None])),
              "r": draw(st.one_of(*[st.just(2)] * 6, st.integers(-1, 40), ODD)),
              "lora_alpha": draw(st.one_of(*[st.integers(1, 64)] * 4, ODD)),
              "target_modules": draw(st.one_of(*[st.just(["q_proj"])] * 3, st.lists(MODULES, max_size=4), REGEXES,
                                               ODD))}
    optional = {"exclude_modules": st.one_of(st.lists(MODULES, max_size=2), REGEXES),
                "rank_pattern": st.dictionaries(REGEXES, st.integers(0, 40), max_size=3),
                "alpha_pattern": st.dictionaries(REGEXES, st.one_of(st.integers(0, 64), ODD), max_size=3),
                "layers_to_transform": st.one_of(st.lists(st.integers(-2, 8), max_size=3), st.integers(-2, 8)),
                "layers_pattern": st.one_of(st.sampled_from(["layers", "h"]), REGEXES),
                "use_dora": st.booleans(), "use_rslora": st.booleans(), "bias": st.sampled_from(["none", "all"]),
                "modules_to_save": st.lists(MODULES, max_size=1), "fan_in_fan_out": st.booleans()}
    for key, strategy in optional.items():
        if draw(st.integers(0, 4)) == 0:
            config[key] = draw(strategy)
    return config


def weights(engine) -> bytes:
    return save(tiny_lora_tensors(engine.model_config))


_names = iter(range(10**9))


@pytest.mark.slow
@FUZZ
@given(config=adapter_configs(), weights_first=st.booleans())
def test_fuzz_adapter_configs(app, config, weights_first):
    client, engine = app
    name = f"fz{next(_names)}"
    base = "/client/v4/accounts/acct/ai/finetunes"
    assert client.post(base, headers=AUTH, json={"model": MODEL, "name": name}).status_code == 200
    # json.dumps writes NaN as Python does (not JSON): the server must refuse that config too
    files = [("adapter_config.json", json.dumps(config).encode()), ("adapter_model.safetensors", weights(engine))]
    start = time.monotonic()
    for file_name, data in (files[::-1] if weights_first else files):
        r = client.post(f"{base}/{name}/finetune-assets", headers=AUTH, data={"file_name": file_name},
                        files={"file": ("f", io.BytesIO(data))})
        check_envelope(base, r)
        TALLY[f"adapter-config {file_name} {r.status_code}"] += 1
        assert time.monotonic() - start < 30, "an upload's validation did not end in bounded time"
        if r.status_code != 200:
            break
    else:
        run = client.post(RUN, headers=AUTH, json={"prompt": "Hi", "max_tokens": 2, "lora": name})
        check_envelope(RUN, run)
        TALLY[f"adapter-config run {run.status_code}"] += 1
    assert client.delete(f"{base}/{name}", headers=AUTH).status_code == 200
