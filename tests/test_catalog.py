"""The catalog routes in process (a tiny random Gemma 3 with the real tokenizer): models/search with
wrangler's and the SDK's paging and filters, models/schema (the run route's own schemas, so a body the
schema admits is run and one it refuses is refused), tasks and authors, and /accounts and /memberships,
which list only the caller's own account. Bad query parameters are 4xx in the v4 envelope."""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.testclient import TestClient

from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.api.catalog import TEXT_GENERATION, _entry
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine

MODEL = "@cf/google/gemma-7b-it-lora"
NAMES = ("@local/tiny", MODEL)
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
ALICE = {"authorization": "Bearer tok-alice"}
BOB = {"authorization": "Bearer tok-bob"}


@pytest.fixture(scope="module")
def engine(tiny_real_vocab):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32", kv_cache_memory_gb=0.1),
                                     progress=False).start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    app = create_app(engine, ServerSettings(model_names=NAMES, data_dir=tmp_path_factory.mktemp("catalog")),
                     Auth(TOKENS))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def anonymous(engine, tmp_path_factory):
    app = create_app(engine, ServerSettings(model_names=NAMES, data_dir=tmp_path_factory.mktemp("catalog-anon")),
                     Auth({}))
    return TestClient(app, raise_server_exceptions=False)


def search(client, query="", account="alice", prefix="/client/v4", headers=ALICE):
    return client.get(f"{prefix}/accounts/{account}/ai/models/search{query}", headers=headers)


def error(r, status: int, code: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["result"] == {} and len(body["errors"]) == 1
    assert body["errors"][0]["code"] == code
    return body["errors"][0]["message"]


def test_models_search_lists_every_served_name_as_a_text_generation_entry(client, engine):
    for prefix in ("/client/v4", ""):
        r = search(client, prefix=prefix)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True and body["errors"] == [] and body["messages"] == []
        assert [e["name"] for e in body["result"]] == list(NAMES)
        assert body["result_info"] == {"page": 1, "per_page": 100, "count": 2, "total_count": 2}
    lora = body["result"][1]
    assert set(lora) == {"id", "source", "name", "description", "task", "tags", "properties"}
    assert lora["task"] == TEXT_GENERATION and lora["task"]["name"] == "Text Generation"
    assert lora["source"] == 1 and lora["tags"] == []
    props = {p["property_id"]: p["value"] for p in lora["properties"]}
    assert props == {"beta": "true", "lora": "true", "context_window": str(engine.max_model_len)}
    assert "@local/tiny" in lora["description"]             # an alias says whose name it is
    assert lora["id"] != body["result"][0]["id"]
    assert search(client).json()["result"][1]["id"] == lora["id"]           # stable


def test_an_entry_without_adapter_slots_has_no_lora_property():
    entry = _entry("@cf/x/y", "@cf/x/y", 8192, lora=False)
    assert entry["properties"] == [{"property_id": "beta", "value": "true"},
                                   {"property_id": "context_window", "value": "8192"}]
    assert "--max-loras 0" in entry["description"]


def test_models_search_pages_as_wrangler_and_the_sdk_page(client):
    # wrangler: per_page=50&page=N until a page shorter than 50
    r = search(client, "?per_page=50&page=1").json()
    assert len(r["result"]) == 2 and r["result_info"]["per_page"] == 50
    # the SDK: no page on the first call, then page=2, 3... until an empty page
    first = search(client, "?per_page=1").json()
    second = search(client, "?per_page=1&page=2").json()
    past = search(client, "?per_page=1&page=3").json()
    assert [first["result"][0]["name"], second["result"][0]["name"]] == list(NAMES)
    assert second["result_info"] == {"page": 2, "per_page": 1, "count": 1, "total_count": 2}
    assert past["success"] and past["result"] == [] and past["result_info"]["count"] == 0
    assert search(client, f"?page={2**53}").json()["result"] == []
    assert search(client, "?page=2.0&per_page=1.0").json()["result_info"] == {"page": 2, "per_page": 1, "count": 1,
                                                                               "total_count": 2}


@pytest.mark.parametrize("query,names", [
    ("?search=7B-IT", [MODEL]),                     # name or description, any case
    ("?search=LORA+adapters", list(NAMES)),
    ("?search=another+name", [MODEL]),
    ("?search=nothing-like-this", []),
    ("?task=Text+Generation", list(NAMES)),
    ("?task=text+generation", list(NAMES)),
    (f"?task={TEXT_GENERATION['id']}", list(NAMES)),
    ("?task=Text-to-Image", []),
    ("?author=google", [MODEL]),
    ("?author=local", ["@local/tiny"]),
    ("?author=meta", []),
    ("?source=1", list(NAMES)),
    ("?source=1.0", list(NAMES)),
    ("?source=2", []),
    ("?hide_experimental=true", []),                # every entry is beta, as Workers AI's LoRA models are
    ("?hide_experimental=false&include_deprecated=true", list(NAMES)),
    ("?search=gemma&author=google&task=Text+Generation&per_page=50&page=1", [MODEL]),
])
def test_models_search_filters(client, query, names):
    r = search(client, query)
    assert r.status_code == 200, r.text
    assert [e["name"] for e in r.json()["result"]] == names
    assert r.json()["result_info"]["total_count"] == len(names)


@pytest.mark.parametrize("query,param", [
    ("?per_page=0", "per_page"), ("?per_page=1001", "per_page"), ("?per_page=abc", "per_page"),
    ("?page=0", "page"), ("?page=-1", "page"), ("?page=1.5", "page"), ("?page=1e400", "page"),
    ("?page=" + "9" * 5000, "page"), ("?page=1_0", "page"), ("?page=+1", "page"), ("?page=%D9%A3", "page"),
    ("?page=1e5", "page"),
    ("?hide_experimental=maybe", "hide_experimental"), ("?include_deprecated=2", "include_deprecated"),
    ("?source=x", "source"), ("?source=nan", "source"), ("?source=inf", "source"),
    ("?format=openrouter", "format"),
])
def test_models_search_refuses_bad_query_parameters(client, query, param):
    message = error(search(client, query), 400, 5006)
    assert message.startswith("AiError: Bad input: ") and f"'{param}'" in message


def test_model_schema_is_the_run_routes_own(client):
    r = client.get(f"/client/v4/accounts/alice/ai/models/schema?model={MODEL}", headers=ALICE)
    assert r.status_code == 200, r.text
    schema = r.json()["result"]
    assert set(schema) == {"input", "output"}
    assert schema["input"]["type"] == "object" and schema["input"]["additionalProperties"] is True
    assert [b["title"] for b in schema["input"]["oneOf"]] == ["Prompt", "Messages"]
    prompt = schema["input"]["oneOf"][0]["properties"]
    assert {"prompt", "lora", "raw", "stream", "max_tokens", "temperature", "top_k", "response_format"} <= set(prompt)
    assert prompt["prompt"]["maxLength"] == 4096                       # this server's --max-input-length
    assert "$ref" not in r.text                                        # self-contained
    json_out, sse_out = schema["output"]["oneOf"]
    assert json_out["contentType"] == "application/json" and set(json_out["required"]) == {"response", "usage"}
    assert sse_out == {"type": "string", "contentType": "text/event-stream", "format": "binary"}
    same = client.get(f"/accounts/alice/ai/models/schema?model=%40local%2Ftiny", headers=ALICE)   # encoded, no prefix
    assert same.json()["result"] == schema
    jsonschema.Draft202012Validator.check_schema(schema["input"])
    jsonschema.Draft202012Validator.check_schema(schema["output"])
    # What the schema admits, the run route runs; what it refuses, the route refuses.
    admits = jsonschema.Draft202012Validator(schema["input"])
    results = jsonschema.Draft202012Validator(schema["output"])
    run = f"/client/v4/accounts/alice/ai/run/{MODEL}"
    for body in ({"prompt": "hi", "max_tokens": 2}, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}):
        assert admits.is_valid(body)
        answer = client.post(run, headers=ALICE, json=body)
        assert answer.status_code == 200 and results.is_valid(answer.json()["result"]), answer.text
    for body in ({"prompt": "hi", "top_k": 51}, {"prompt": ""}, {"prompt": "x" * 4097}, {},
                 {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}):
        assert not admits.is_valid(body)
        assert client.post(run, headers=ALICE, json=body).status_code == 400, body


def test_model_schema_needs_a_served_model(client):
    url = "/client/v4/accounts/alice/ai/models/schema"
    assert "'model'" in error(client.get(url, headers=ALICE), 400, 5006)
    assert "'model'" in error(client.get(url + "?model=", headers=ALICE), 400, 5006)
    assert error(client.get(url + "?model=@cf/meta/llama-3-8b", headers=ALICE), 400, 5007) == \
        "No such model @cf/meta/llama-3-8b or task"


def test_tasks_and_authors(client):
    tasks = client.get("/client/v4/accounts/alice/ai/tasks/search", headers=ALICE).json()
    assert tasks["success"] and tasks["result"] == [TEXT_GENERATION]
    authors = client.get("/accounts/alice/ai/authors/search", headers=ALICE).json()["result"]
    assert [a["name"] for a in authors] == ["local", "google"] and all(a["id"] for a in authors)


@pytest.mark.parametrize("path", ["models/search", f"models/schema?model={MODEL}", "tasks/search", "authors/search"])
def test_catalog_routes_need_the_accounts_own_token(client, path):
    url = f"/client/v4/accounts/alice/ai/{path}"
    assert error(client.get(url), 401, 10000) == "Authentication error"
    assert error(client.get(url, headers={"authorization": "Bearer wrong"}), 401, 10000) == "Authentication error"
    assert error(client.get(url, headers=BOB), 403, 10000) == "Authentication error"
    assert client.get(url.replace("/alice/", "/bob/"), headers=BOB).status_code == 200


@pytest.mark.parametrize("prefix", ["/client/v4", ""])
def test_accounts_and_memberships_list_only_the_tokens_own_account(client, prefix):
    for headers, account in ((ALICE, "alice"), (BOB, "bob")):
        accounts = client.get(f"{prefix}/accounts", headers=headers).json()
        assert accounts["success"] and [a["id"] for a in accounts["result"]] == [account]
        assert accounts["result"][0]["name"] == account and accounts["result"][0]["type"] == "standard"
        assert accounts["result_info"] == {"page": 1, "per_page": 20, "count": 1, "total_count": 1}
        members = client.get(f"{prefix}/memberships", headers=headers).json()
        assert [m["account"]["id"] for m in members["result"]] == [account]
        assert members["result"][0]["status"] == "accepted" and len(members["result"][0]["id"]) == 32
        assert members["result_info"]["total_count"] == 1
    alice = client.get(f"{prefix}/memberships", headers=ALICE).json()["result"][0]["id"]
    bob = client.get(f"{prefix}/memberships", headers=BOB).json()["result"][0]["id"]
    assert alice != bob
    # wrangler pages with page=N until page * per_page >= total_count
    assert client.get(f"{prefix}/accounts?page=2", headers=ALICE).json()["result"] == []
    assert client.get(f"{prefix}/memberships?page=2&per_page=50", headers=ALICE).json()["result"] == []
    for url in (f"{prefix}/accounts", f"{prefix}/memberships"):
        assert error(client.get(url), 401, 10000) == "Authentication error"
        assert error(client.get(url, headers={"authorization": "Bearer wrong"}), 401, 10000)


def test_accounts_and_memberships_filters_and_bad_parameters(client):
    assert len(client.get("/accounts?name=ALI&direction=desc", headers=ALICE).json()["result"]) == 1
    assert client.get("/accounts?name=bob", headers=ALICE).json()["result"] == []
    assert len(client.get("/memberships?status=accepted&account.name=alice&order=status", headers=ALICE)
               .json()["result"]) == 1
    assert client.get("/memberships?status=pending", headers=ALICE).json()["result"] == []
    assert client.get("/memberships?name=bob", headers=ALICE).json()["result"] == []
    for url in ("/accounts?direction=up", "/accounts?per_page=0", "/memberships?status=unknown",
                "/memberships?order=name", "/memberships?page=x"):
        error(client.get(url, headers=ALICE), 400, 5006)
    assert error(client.post("/accounts", headers=ALICE), 405, 7001).startswith("Method Not Allowed")


def test_anonymous_mode_lists_the_default_account(anonymous):
    for url in ("/accounts", "/client/v4/accounts"):
        r = anonymous.get(url, headers={"authorization": "Bearer anything"})
        assert [a["id"] for a in r.json()["result"]] == ["local"]
    members = anonymous.get("/client/v4/memberships").json()["result"]
    assert [m["account"]["id"] for m in members] == ["local"]
    assert [e["name"] for e in search(anonymous, account="me", headers={}).json()["result"]] == list(NAMES)
