"""/openapi.json: a valid OpenAPI 3.1 document of both dialects, whose examples are real.

The document is validated against the OpenAPI 3.1 meta-schema; every example (request bodies,
responses, server-sent event streams, parameters) against its own schema; every request example is
sent to a server (the tiny random Gemma 3 with the real tokenizer) and must get the status of the
response example of the same name, and error examples must be what the server answers, word for
word (the request id aside). The examples no request can provoke on a healthy server (auth, engine
failures, limits) are compared with what the code builds for them.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openapi_spec_validator
import pytest
from fastapi.testclient import TestClient
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.api.errors import capacity_exceeded, finetune_missing_files
from gemlora.api.openapi import OPENAI_PREFIXES, WORKERS_AI_PREFIXES, openapi_document
from gemlora.api.textgen import engine_failure
from gemlora.api.workers_ai import api_error_of
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine, EngineDeadError, EngineError
from gemlora.finetunes.finetune import too_large

MODEL = "@cf/google/gemma-7b-it-lora"
ACCOUNT, TOKEN = "me", "secret-token"       # the examples' account
AUTH = {"authorization": f"Bearer {TOKEN}"}
DOC_URI = "urn:gemlora:openapi"
_RID = re.compile(r" \([0-9a-f]{32}\)$")     # the request id AiError messages end with


def document() -> dict:
    return openapi_document((MODEL,), anonymous=False)


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def validator(doc: dict, pointer: str):
    """A JSON Schema 2020-12 validator (OpenAPI 3.1's dialect) of the schema at `pointer` in `doc`."""
    registry = Registry().with_resource(DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": f"{DOC_URI}#{pointer}"}, registry=registry,
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def events(stream: str) -> list[dict]:
    """A text/event-stream body as the events schemathesis validates: {"data": ..., "event": "message"}."""
    assert stream.endswith("data: [DONE]\n\n"), stream
    out = []
    for block in stream.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        out.append({"data": block[len("data: "):], "event": "message"})
    return out


def check_body(doc: dict, pointer: str, media: str, value) -> None:
    """`value` (a body, as sent or received) against the schema at `pointer`; an event stream event by event,
    each event's JSON data against its contentSchema too (which plain JSON Schema only annotates)."""
    if media != "text/event-stream":
        validator(doc, pointer).validate(value)
        return
    event_schema = _resolve(doc, pointer)["$ref"].removeprefix("#")
    content = validator(doc, event_schema + "/properties/data/anyOf/1/contentSchema")
    for event in events(value):
        validator(doc, pointer).validate(event)
        if event["data"] != "[DONE]":
            content.validate(json.loads(event["data"]))


def _resolve(doc: dict, pointer: str):
    node = doc
    for part in pointer.lstrip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")] if isinstance(node, dict) else node[int(part)]
    return node


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op, f"/paths/{_escape(path)}/{method}"


def response_examples(op: dict, base: str):
    for status, response in op["responses"].items():
        for media, media_object in response.get("content", {}).items():
            for name, example in media_object.get("examples", {}).items():
                pointer = f"{base}/responses/{status}/content/{_escape(media)}/schema"
                yield status, media, name, example["value"], pointer


def test_the_document_is_valid_openapi_3_1():
    doc = document()
    assert doc["openapi"].startswith("3.1")
    openapi_spec_validator.validate(doc)        # the 3.1 meta-schema, $refs resolved
    ids = [op["operationId"] for _, _, op, _ in operations(doc)]
    assert len(ids) == len(set(ids)) == 37
    assert json.loads(json.dumps(doc)) == doc   # plain JSON data


def test_every_example_matches_its_own_schema():
    doc = document()
    seen = 0
    for _, _, op, base in operations(doc):
        for media, media_object in op.get("requestBody", {}).get("content", {}).items():
            for example in media_object["examples"].values():
                check_body(doc, f"{base}/requestBody/content/{_escape(media)}/schema", media, example["value"])
                seen += 1
        for status, media, name, value, pointer in response_examples(op, base):
            check_body(doc, pointer, media, value)
            seen += 1
    for name, parameter in doc["components"]["parameters"].items():
        if "example" in parameter:
            validator(doc, f"/components/parameters/{name}/schema").validate(parameter["example"])
            seen += 1
    assert seen >= 200


def test_the_schemas_refuse_what_the_server_refuses():
    doc = document()
    run = validator(doc, "/components/schemas/RunRequest")
    for body in ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, {"prompt": ""}, {},
                 {"prompt": "hi", "top_k": 51}, {"prompt": "hi", "max_tokens": None},
                 {"prompt": "hi", "stream": "true"},
                 {"prompt": "hi", "guided_json": 3}, {"prompt": "hi", "tools": [{"type": "function"}]},
                 {"prompt": "x" * 4097}, {"messages": [{"role": "function", "content": "x"}]},
                 {"messages": [{"role": "user"}]}):
        assert not run.is_valid(body), body
    assert run.is_valid({"prompt": "hi", "raw": "true", "stop": ["a"], "options": {"rejectIfBusy": True}, "tags": 1})
    chat = validator(doc, "/components/schemas/ChatCompletionRequest")
    user = [{"role": "user", "content": "hi"}]
    assert not chat.is_valid({"model": "password", "lora": "other", "messages": user})   # two adapters
    assert chat.is_valid({"model": MODEL, "lora": "other", "messages": user})
    assert chat.is_valid({"model": "password", "lora": None, "messages": user, "temperature": None})
    assert not chat.is_valid({"model": MODEL, "messages": user, "best_of": True})
    create = validator(doc, "/components/schemas/CreateFinetuneRequest")
    for name in ("a b", "cf-x", "CF-x", "3dd75f75-ef0e-4d1d-9d0a-4e5c0a6e0a11", "3dd75f75ef0e4d1d9d0a4e5c0a6e0a11",
                 "x" * 65, ""):
        assert not create.is_valid({"model": MODEL, "name": name}), name
    assert create.is_valid({"model": MODEL, "name": "pw.1", "description": None, "public": True})


def test_the_examples_no_request_provokes_are_what_the_code_builds():
    doc = document()
    run = doc["paths"]["/accounts/{account_id}/ai/run/{model}"]["post"]["responses"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    upload = doc["paths"]["/accounts/{account_id}/ai/finetunes/{finetune}/finetune-assets"]["post"]["responses"]

    def example(responses, status, name):
        return responses[status]["content"]["application/json"]["examples"][name]["value"]

    assert example(run, "500", "failed-step") == engine_failure(EngineError("boom")).workers_ai_body()
    assert example(run, "503", "engine-down") == engine_failure(EngineDeadError("gone")).workers_ai_body()
    assert example(chat, "500", "failed-step") == engine_failure(EngineError("boom")).openai_body()
    assert example(chat, "503", "engine-down") == engine_failure(EngineDeadError("gone")).openai_body()
    assert example(run, "429", "busy") == capacity_exceeded().workers_ai_body("0" * 32)
    assert _normal(example(run, "400", "not-ready")) == _normal(finetune_missing_files().workers_ai_body("0" * 32))
    limit = too_large("adapter_model.safetensors is larger than the limit of 314572800 bytes (300 MiB)")
    assert example(upload, "413", "too-large") == api_error_of(limit).workers_ai_body("0" * 32)


def _normal(body):
    """An error body with the request id cut from its messages."""
    if isinstance(body, dict) and "errors" in body:
        return {**body, "errors": [{**e, "message": _RID.sub("", e["message"])} for e in body["errors"]]}
    return body


# --------------------------------------------------------------------------------------------------
# Against a server

@pytest.fixture(scope="module")
def served(tiny_real_vocab, tmp_path_factory):
    # max_model_len as the embedded model's with the default KV budget, so that the 5021 texts match.
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32", kv_cache_memory_gb=0.1,
                                                  max_model_len=29120), progress=False).start()
    app = create_app(engine, ServerSettings(model_names=(MODEL,), data_dir=tmp_path_factory.mktemp("openapi-data")),
                     Auth({TOKEN: ACCOUNT, "other-token": "other"}))
    yield TestClient(app, raise_server_exceptions=False), engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tiny_adapter_weights(tiny_real_vocab, tmp_path_factory) -> bytes:
    """adapter_model.safetensors of the examples' adapter config (rank 8, alpha 16, seven projections),
    made by peft for the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemlora.api.openapi import ADAPTER_CONFIG_EXAMPLE
    config = json.loads(ADAPTER_CONFIG_EXAMPLE)
    model = AutoModelForCausalLM.from_pretrained(tiny_real_vocab)
    peft_model = get_peft_model(model, LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                                  target_modules=config["target_modules"], task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("tiny-adapter")
    peft_model.save_pretrained(out)
    return (out / "adapter_model.safetensors").read_bytes()


def test_the_served_document_is_this_one(served):
    client, _ = served
    assert client.get("/openapi.json").json() == document()
    assert client.get("/docs").status_code == 200          # FastAPI's Swagger UI, over this document


def _send(client, method, url, media=None, value=None, headers=AUTH):
    if media == "multipart/form-data":
        return client.request(method, url, headers=headers, data={"file_name": value["file_name"]},
                              files={"file": ("file", value["file"].encode())})
    if media is not None:
        return client.request(method, url, headers={**headers, "content-type": media}, content=json.dumps(value))
    return client.request(method, url, headers=headers)


def _check_answer(doc, op, base, r, name):
    """The status of the response example `name`, its media type and schema, and for an error its body."""
    matches = [(status, media, value, pointer) for status, media, n, value, pointer in response_examples(op, base)
               if n == name]
    assert len({m[0] for m in matches}) == 1, f"{base}: example {name!r} needs one response example"
    status = matches[0][0]
    assert str(r.status_code) == status, (base, name, r.text)
    media = r.headers["content-type"].split(";")[0]
    assert media in op["responses"][status]["content"], (base, name, media)
    pointer = f"{base}/responses/{status}/content/{_escape(media)}/schema"
    body = r.text if media in ("text/event-stream", "text/plain") else r.json()
    check_body(doc, pointer, media, body)
    rid = r.headers["cf-ai-req-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and r.headers["x-request-id"] == rid
    if r.status_code >= 400 and ("errors" in body or "error" in body):      # an error envelope, word for word
        expected = next(value for s, m, value, p in matches if m == media)
        assert _normal(body) == _normal(expected), (base, name)


def _examples_of(doc, op, base, client, method, url):
    for media, media_object in op["requestBody"]["content"].items():
        for name, example in media_object["examples"].items():
            _check_answer(doc, op, base, _send(client, method, url, media, example["value"]), name)


USER = [{"role": "user", "content": "hi"}]
# The requests behind the 400 response examples: bodies the document refuses (request examples are all
# valid bodies), sent to check that the server refuses them with exactly those answers.
REFUSED = {
    "/run/{model}": {"bad-top-k": {"prompt": "hi", "top_k": 51},
                     "both-inputs": {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
                     "json-mode": {"prompt": "hi", "response_format": {"type": "xml"}}},
    "/finetunes": {"bad-name": {"model": MODEL, "name": "a b"}},
    "/finetunes/{finetune}/finetune-assets": {"bad-file-name": {"file_name": "model.bin", "file": "x"}},
    "/v1/chat/completions": {"bad-top-k": {"model": MODEL, "messages": USER, "top_k": 51},
                             "n": {"model": MODEL, "messages": USER, "n": 2}},
    "/v1/completions": {"bad-top-k": {"model": MODEL, "prompt": "hi", "top_k": 51},
                        "n": {"model": MODEL, "prompt": "hi", "n": 2}},
}


def _refused(doc, op, base, client, method, url, key):
    for media in op["requestBody"]["content"]:
        for name, value in REFUSED[key].items():
            assert not validator(doc, f"{base}/requestBody/content/{_escape(media)}/schema").is_valid(value), name
            _check_answer(doc, op, base, _send(client, method, url, media, value), name)


def test_every_request_example_gets_its_documented_answer(served, tiny_adapter_weights):
    client, _ = served
    doc = document()
    paths = doc["paths"]
    for prefix in WORKERS_AI_PREFIXES:      # each mount from a fresh `password`, which the last step deletes
        base = f"{prefix}/accounts/{ACCOUNT}/ai"
        tpl = f"{prefix}/accounts/{{account_id}}/ai"

        def at(path, method):
            return paths[tpl + path][method], f"/paths/{_escape(tpl + path)}/{method}"

        op, ptr = at("/finetunes", "post")
        _examples_of(doc, op, ptr, client, "POST", f"{base}/finetunes")
        _refused(doc, op, ptr, client, "POST", f"{base}/finetunes", "/finetunes")
        op, ptr = at("/finetunes/{finetune}/finetune-assets", "post")
        _examples_of(doc, op, ptr, client, "POST", f"{base}/finetunes/password/finetune-assets")
        _refused(doc, op, ptr, client, "POST", f"{base}/finetunes/password/finetune-assets",
                 "/finetunes/{finetune}/finetune-assets")
        weights = client.post(f"{base}/finetunes/password/finetune-assets", headers=AUTH,
                              data={"file_name": "adapter_model.safetensors"},
                              files={"file": ("file", tiny_adapter_weights)})
        assert weights.status_code == 200, weights.text    # `password` is ready: the lora example can run
        op, ptr = at("/run/{model}", "post")
        _examples_of(doc, op, ptr, client, "POST", f"{base}/run/{MODEL}")
        _refused(doc, op, ptr, client, "POST", f"{base}/run/{MODEL}", "/run/{model}")
        unknown = _send(client, "POST", f"{base}/run/@cf/meta/llama-3-8b-instruct", "application/json",
                        {"prompt": "hi"})
        _check_answer(doc, op, ptr, unknown, "unknown-model")
        for path, name in (("/finetunes", "list"), ("/finetunes/public", "none")):
            op, ptr = at(path, "get")
            _check_answer(doc, op, ptr, _send(client, "GET", base + path), name)
        for path, query, name in (("/models/search", "?per_page=50", "models"), ("/models/search", "?per_page=0",
                                                                                     "bad-query"),
                                  ("/models/schema", f"?model={MODEL}", "schema"),
                                  ("/models/schema", "?model=@cf/meta/llama-3-8b-instruct", "unknown-model"),
                                  ("/tasks/search", "", "tasks"), ("/authors/search", "", "authors")):
            op, ptr = at(path, "get")
            _check_answer(doc, op, ptr, _send(client, "GET", base + path + query), name)
        for path, name in (("/accounts", "accounts"), ("/memberships", "memberships")):
            op, ptr = paths[prefix + path]["get"], f"/paths/{_escape(prefix + path)}/get"
            _check_answer(doc, op, ptr, _send(client, "GET", prefix + path), name)
            _check_answer(doc, op, ptr, _send(client, "GET", prefix + path + "?per_page=0"), "bad-query")
        op, ptr = at("/finetunes/{finetune}", "delete")
        _check_answer(doc, op, ptr, _send(client, "DELETE", f"{base}/finetunes/password"), "delete")
        _check_answer(doc, op, ptr, _send(client, "DELETE", f"{base}/finetunes/nope"), "unknown-finetune")
    for prefix in OPENAI_PREFIXES:
        base = prefix.replace("{account_id}", ACCOUNT)
        for path, method in (("/v1/chat/completions", "post"), ("/v1/completions", "post")):
            op, ptr = paths[prefix + path][method], f"/paths/{_escape(prefix + path)}/{method}"
            _examples_of(doc, op, ptr, client, method.upper(), base + path)
            _refused(doc, op, ptr, client, method.upper(), base + path, path)
        op, ptr = paths[prefix + "/v1/models"]["get"], f"/paths/{_escape(prefix + '/v1/models')}/get"
        r = _send(client, "GET", base + "/v1/models")
        _check_answer(doc, op, ptr, r, "models")
    for path, name in (("/health", "ok"), ("/metrics", "metrics")):
        _check_answer(doc, paths[path]["get"], f"/paths/{_escape(path)}/get", client.get(path), name)


def test_the_auth_examples_are_what_every_route_answers(served):
    client, _ = served
    doc = document()
    checked = 0
    for path, method, op, base in operations(doc):
        if op.get("security") == []:
            continue
        url = path.replace("{account_id}", ACCOUNT).replace("{model}", MODEL).replace("{finetune}", "password")
        _check_answer(doc, op, base, _send(client, method.upper(), url, headers={}), "no-token")
        if "403" in op["responses"]:
            _check_answer(doc, op, base, _send(client, method.upper(), url,
                                               headers={"authorization": "Bearer other-token"}), "other-account")
        checked += 1
    assert checked == 35


def test_health_answers_503_as_documented_once_the_engine_is_down(tiny_real_vocab, tmp_path):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32", kv_cache_memory_gb=0.1),
                                     progress=False).start()
    client = TestClient(create_app(engine, ServerSettings(model_names=(MODEL,), data_dir=tmp_path), Auth({})))
    engine.shutdown()
    doc = document()
    r = client.get("/health")
    op = doc["paths"]["/health"]["get"]
    _check_answer(doc, op, "/paths/~1health/get", r, "down")
    example = op["responses"]["503"]["content"]["application/json"]["examples"]["down"]["value"]
    assert (r.json()["status"], r.json()["engine"]) == (example["status"], example["engine"])
