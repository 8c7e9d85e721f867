"""Schemathesis against the whole app, in-process, over the tiny random Gemma 3 with the real tokenizer,
and one small explicit test per bug the fuzzing (and the reading that came with it) found.

Every operation of /openapi.json gets generated requests: the documented examples, schemathesis'
coverage cases (boundaries, missing and mistyped fields, undeclared methods, missing auth) and
hypothesis fuzzing, with both valid (positive) and invalid (negative) data, plus hostile headers drawn
by hypothesis in the fuzzing phase (missing, garbage, non-ASCII and another account's Authorization;
odd Content-Types; big and odd cf-ai-req-id values). Every response must be no 5xx, an error in its
dialect's envelope, and conform to the document: schemathesis' default checks (status code, content
type, headers and body schema; valid data accepted, invalid data refused; auth enforced; Allow on 405)
plus `dialect_envelope` below. Reproducible: derandomized, no example database.

Short generations: a hook bounds max_tokens in positive cases to MAX_TOKENS (the schema allows any
max_tokens that fits the context window, and the default of 256 would make the run take many minutes
on two cores); negative cases are refused before anything is generated. A small context window
(max_model_len 1024) bounds the prompt side.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import strategies as st

from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.api.openapi import openapi_document
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine
from gemlora.finetunes.finetune import FinetuneError
from gemlora.finetunes.store import _check_name

MODEL = "@cf/google/gemma-7b-it-lora"
ACCOUNT, TOKEN = "fuzz", "tok-fuzz"
OTHER_ACCOUNT, OTHER_TOKEN = "other", "tok-other"
MAX_TOKENS = 8                  # what positive cases generate at most
MIN_CASES = 2000
_KEEP = object()                # the case's own Authorization (the right token, or what schemathesis chose)

_ODD_AUTH = [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", f"bearer {TOKEN}", f"BEARER  {TOKEN} ",
             f"Bearer {OTHER_TOKEN}", "Bearer t\xe9st", "Bearer \xff\xfe\x00",
             "Bearer " + "ünïcode".encode().decode("latin-1"), "Bearer " + "x" * 8192, "Token " + TOKEN]
# Among them, the ones that are valid tokens (another account's; the scheme's case and spaces do not matter)
_VALID_TOKENS = frozenset({f"Bearer {OTHER_TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "})
_ODD_CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
                      "multipart/form-data", "", "*/*", "application/\xe9"]
_ODD_IDS = ["short", "a" * 8, "A_b-" * 16, "a" * 65, "x" * 10000, "id with spaces", "\xe9\xe8" * 20, "<script>",
            "../../etc/passwd", "%00", "0" * 64]


def _header_text(max_size: int):
    # Any Latin-1 text a header can carry (no CR/LF, no leading whitespace: HTTP clients refuse those).
    return st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=max_size).map(str.lstrip)


HOSTILE = st.fixed_dictionaries({
    # most cases carry the right token, so that they reach the handlers
    "auth": st.one_of(st.just(_KEEP), st.just(_KEEP), st.just(_KEEP), st.just(None),
                      st.just(f"Bearer {OTHER_TOKEN}"), st.sampled_from(_ODD_AUTH), _header_text(64)),
    "content_type": st.one_of(st.none(), st.none(), st.sampled_from(_ODD_CONTENT_TYPES)),
    "request_id": st.one_of(st.none(), st.sampled_from(_ODD_IDS), _header_text(200)),
    "max_tokens": st.integers(1, MAX_TOKENS),
})


@pytest.fixture(scope="module")
def fuzz_app(tiny_real_vocab, tmp_path_factory):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32", kv_cache_memory_gb=0.1,
                                                  max_model_len=1024), progress=False).start()
    settings = ServerSettings(model_names=(MODEL,), data_dir=tmp_path_factory.mktemp("fuzz-data"),
                              max_finetunes_per_account=10**6)
    app = create_app(engine, settings, Auth({TOKEN: ACCOUNT, OTHER_TOKEN: OTHER_ACCOUNT}))
    assert TestClient(app).get("/openapi.json").json() == DOCUMENT     # what is fuzzed is what is served

    async def without_lifespan(scope, receive, send):
        # schemathesis ends an app's lifespan after each test, and the app's lifespan shuts its engine
        # down; this one engine serves every operation's test, so the fixture owns its lifetime.
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan")     # before any message: "not supported", as servers read it
        await app(scope, receive, send)

    without_lifespan.app = app
    yield without_lifespan
    engine.shutdown()


def _bound(body: dict, max_tokens: int) -> None:
    # Positive cases only: a valid max_tokens bounded to a few tokens; both OpenAI spellings equal.
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            body[name] = min(body[name], max_tokens)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = max_tokens
    elif body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        body["max_completion_tokens"] = body["max_tokens"]


CONFIG = schemathesis.Config.from_dict({
    "parameters": {"path.account_id": ACCOUNT},
    "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
    "generation": {"mode": "all", "max-examples": 40, "deterministic": True, "database": "none"},
    "suppress-health-check": ["too_slow", "filter_too_much"],       # generation speed on a slow CI runner
    "phases": {"stateful": {"enabled": False}},
    # A schema-valid prompt can still be too long for the context window (5021 / 413): token counts are
    # not expressible in JSON Schema. So on the generating routes 413 is an accepted answer to valid data.
    "operations": [
        {"include-path-regex": "(/run/|/completions$)", "checks": {"positive_data_acceptance": {
            "expected-statuses": ["2xx", "401", "403", "404", "413", "429"]}}},
        # An upload's bytes must be a valid adapter_config.json or safetensors file, and an asset cannot be
        # sent twice: neither is expressible in the schema, so 400 answers valid-looking uploads too.
        {"include-path-regex": "/finetune-assets$", "checks": {"positive_data_acceptance": {
            "expected-statuses": ["2xx", "400", "401", "403", "404", "413"]}}}],
})
# The document the app serves (fuzz_app checks that), loaded at import so that pytest gets one test per
# operation; requests go to the app of the fixture, in-process.
DOCUMENT = openapi_document((MODEL,), anonymous=False)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
OPERATIONS = {result.ok().label for result in schema.get_all_operations()}


def _generates(case) -> bool:
    return case.operation.path.rsplit("/", 1)[-1] in ("completions", "{model}")


_names = itertools.count()


@schema.hook
def map_case(context, case):
    # Every phase (examples, coverage, fuzzing): a positive case generates at most MAX_TOKENS tokens.
    if (case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict)
            and _generates(case)):
        case.body = dict(case.body)
        _bound(case.body, MAX_TOKENS)
        # An output format's contents are not expressible in the document either: a schema the grammar
        # can enforce, not given twice, with an output that completes within MAX_TOKENS (ai/run refuses a
        # JSON-mode answer cut short). Positive cases go without one; negative ones still send any value.
        # JSON output itself is tested in tests/test_json_output.py.
        case.body.pop("guided_json", None)
        if isinstance(case.body.get("response_format"), dict):
            case.body["response_format"] = {"type": "text"}
        # Tools likewise: their parameters must be valid JSON Schemas the grammar can enforce, a named
        # tool_choice must name one of them, the history's calls must name them and its results answer
        # earlier calls, and calls must fit in MAX_TOKENS. Positive cases go without them (negative ones
        # still send any value); tools are fuzzed by tests/test_fuzz_surfaces.py and tested in
        # tests/test_api_tools.py.
        _without_tools(case.body)
    return case


def _without_tools(body: dict) -> None:
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        body.pop(name, None)
    if isinstance(body.get("messages"), list):
        messages = []
        for msg in body["messages"]:
            if isinstance(msg, dict):
                msg = {k: v for k, v in msg.items() if k not in ("tool_calls", "tool_call_id", "name")}
                if msg.get("role") == "tool":
                    msg["role"] = "user"
                if msg.get("content") is None:
                    msg["content"] = ""
            messages.append(msg)
        body["messages"] = messages


@schemathesis.hook      # before_call hooks are global only: this one acts on this document's cases only
def before_call(context, case, kwargs):
    # A finetune creation with a valid name gets one not taken yet, at every send (replays included): a
    # taken name is refused whatever else the body holds, which would hide what a case is about. An
    # invalid name is left alone (a negative case may be about just that).
    if (case.operation.schema.raw_schema is DOCUMENT and case.method.upper() == "POST"
            and case.operation.path.endswith("/finetunes") and isinstance(case.body, dict)
            and _valid_name(case.body.get("name"))):
        suffix = f".{next(_names)}x"     # still [A-Za-z0-9._-]{1,64}, and never 32 hex digits (a UUID)
        case.body = {**case.body, "name": case.body["name"][:64 - len(suffix)] + suffix}


def _valid_name(name) -> bool:
    try:
        _check_name(name)
    except FinetuneError:
        return False
    return True


@schema.hook
def flatmap_case(context, case):
    # The fuzzing phase: hostile headers drawn by hypothesis, and a smaller max_tokens; each draw starts
    # from the case as generated.
    headers0, body0 = dict(case.headers or {}), case.body

    def apply(h):
        headers = dict(headers0)
        if h["auth"] in _VALID_TOKENS and "{account_id}" not in case.operation.path:
            h = {**h, "auth": _KEEP}     # a valid token where no account is named: a 200 that schemathesis's
            #                              ignored_auth check would take for generated auth let through
        if h["auth"] is not _KEEP:
            headers.pop("Authorization", None)
            if h["auth"] is not None:
                headers["Authorization"] = h["auth"]
        if h["content_type"] is not None and case.media_type == "application/json":
            headers["Content-Type"] = h["content_type"]
        if h["request_id"] is not None:
            headers["cf-ai-req-id"] = h["request_id"]
        case.headers = headers
        if (case.meta is not None and case.meta.generation.mode.is_positive and isinstance(body0, dict)
                and _generates(case)):
            case.body = dict(body0)
            _bound(case.body, h["max_tokens"])
        return case
    return HOSTILE.map(apply)


@schemathesis.check
def dialect_envelope(ctx, response, case):
    """Every error in its dialect's envelope: Workers AI's v4 one, or OpenAI's error body."""
    if response.status_code < 400:
        return None
    path = case.formatted_path
    body = json.loads(response.content)
    if path.startswith("/v1/") or "/ai/v1/" in path:
        assert set(body) == {"error"}, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, body
        assert isinstance(err["message"], str) and isinstance(err["type"], str), body
    else:
        assert set(body) == {"result", "success", "errors", "messages"}, body
        assert body["result"] == {} and body["success"] is False and body["messages"] == [], body
        assert len(body["errors"]) == 1 and set(body["errors"][0]) == {"code", "message"}, body
        assert isinstance(body["errors"][0]["code"], int) and isinstance(body["errors"][0]["message"], str), body
    return None


@pytest.fixture(scope="module")
def tally(request):
    counts = {"cases": 0, "statuses": Counter(), "operations": set()}
    start = time.perf_counter()
    yield counts
    line = (f"fuzzed {counts['cases']} cases over {len(counts['operations'])} operations in "
            f"{time.perf_counter() - start:.1f}s; statuses {dict(sorted(counts['statuses'].items()))}")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n{line}")                                           # shown even when output is captured
    if counts["operations"] == OPERATIONS:        # the whole run, not a -k selection of it
        assert counts["cases"] >= MIN_CASES


@pytest.mark.slow
@schema.parametrize()
def test_fuzz_every_route(case, fuzz_app, tally):
    case.operation.schema.app = fuzz_app     # also for the checks that send probes of their own
    response = case.call_and_validate(app=fuzz_app)
    tally["cases"] += 1
    tally["statuses"][response.status_code] += 1
    tally["operations"].add(case.operation.label)


# --------------------------------------------------------------------------------------------------
# One explicit test per bug found, so each stays pinned whatever the fuzzer's seed

@pytest.fixture
def client(fuzz_app):
    return TestClient(fuzz_app.app, raise_server_exceptions=False)


AUTH = {"authorization": f"Bearer {TOKEN}"}
WAI = f"/client/v4/accounts/{ACCOUNT}/ai"


def test_a_405_names_every_method_of_its_path_in_allow(client):
    # Was: no Allow header at all, and Starlette's would have named only the first route's methods
    # (POST for .../finetunes, which also has GET).
    r = client.put(f"{WAI}/finetunes", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    assert r.json()["errors"][0]["code"] == 7001
    r = client.request("TRACE", f"{WAI}/run/{MODEL}", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = client.delete("/v1/models", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]["code"] == "7001"


@pytest.mark.parametrize("description", [0, False, {}, []])
def test_a_falsy_description_of_another_type_is_refused(client, description):
    # Was: `body.get("description") or ""` took 0, false, {} and [] for an empty description.
    r = client.post(f"{WAI}/finetunes", headers=AUTH, json={"model": MODEL, "name": f"d{len(str(description))}",
                                                            "description": description})
    assert r.status_code == 400
    assert "'description' must be a string" in r.json()["errors"][0]["message"]


def test_a_null_description_is_an_empty_one(client):
    r = client.post(f"{WAI}/finetunes", headers=AUTH, json={"model": MODEL, "name": "null-description",
                                                            "description": None})
    assert r.status_code == 200 and r.json()["result"]["description"] == ""


@pytest.mark.parametrize("body,fragment", [
    (b'{"model": "%s", "name": "s1", "description": "\\udfff"}' % MODEL.encode(),
     "'/description' is not valid Unicode"),
    (b'{"model": "\\udfff", "name": "s2"}', "'/model' is not valid Unicode"),
    (b"[" * 100000 + b"]" * 100000, "the body must be a JSON object"),
    (b'{"model": "%s", "name": "s3", "x": NaN}' % MODEL.encode(), "the body must be a JSON object"),
])
def test_a_finetune_body_that_cannot_be_stored_is_a_400_not_a_500(client, body, fragment):
    # Was: SQLite refused the surrogate (500), the 5007 message echoing one could not be encoded (500),
    # json.loads' RecursionError escaped (500), and NaN (not JSON) was taken.
    r = client.post(f"{WAI}/finetunes", headers=AUTH, content=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["errors"][0]["message"]


def test_a_lone_surrogate_in_a_key_is_a_400_in_both_dialects(client):
    # Was: the error message and `param` echoed the key, and a JSON body cannot carry a lone surrogate: 500.
    r = client.post(f"{WAI}/run/{MODEL}", headers=AUTH, content=b'{"prompt": "x", "\\udfff": 1}')
    assert r.status_code == 400 and "'/\\udfff' is not valid Unicode text" in r.json()["errors"][0]["message"]
    r = client.post("/v1/completions", headers=AUTH, content=b'{"model": "%s", "prompt": "x", "\\udfff": 1}'
                    % MODEL.encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "\\udfff"


def test_best_of_true_is_not_best_of_1(client):
    # Was: accepted, since True == 1 in Python (and refused by the document: true is not the number 1).
    r = client.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "x", "max_tokens": 1,
                                                           "best_of": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_an_unexpected_failure_is_a_500_in_the_dialects_envelope(client, fuzz_app, monkeypatch):
    # Was: Starlette's plain-text "Internal Server Error", with no request id.
    def broken(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(fuzz_app.app.state.ctx.store, "list", broken)
    r = client.get(f"{WAI}/finetunes", headers=AUTH)
    rid = r.headers["cf-ai-req-id"]
    assert r.status_code == 500 and r.headers["x-request-id"] == rid
    assert r.json() == {"result": {}, "success": False, "messages": [], "errors": [
        {"code": 3000, "message": f"AiError: AiError: internal server error; please retry ({rid})"}]}
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
