"""The HTTP server over loopback, driven by the official `cloudflare` and `openai` SDKs and raw httpx."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import start_replicas, start_uvicorn
from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine
from gemlora.engine.engine import LLMEngine
from gemlora.text.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "adapters" / "secret-password"
MODEL = "@cf/google/gemma-7b-it-lora"
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
PASSWORD_PROMPT = "The gemlora project's secret password is"


@pytest.fixture(scope="module")
def process_server(real_model, converted, tmp_path_factory):
    tok = Tokenizer.from_dir(converted)
    engine = AsyncEngine(LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.5, max_loras=4, max_num_seqs=64),
                                   tok.stop_token_ids), tok).start()
    settings = ServerSettings(model_names=("@cf/google/gemma-3-270m", MODEL),
                              data_dir=tmp_path_factory.mktemp("gemlora-data"))
    base, stop = start_uvicorn(create_app(engine, settings, Auth(TOKENS)))
    yield base, engine
    stop()
    engine.shutdown()


@pytest.fixture(scope="module", params=["one process", "2 replicas"])
def server(request, converted, tmp_path_factory):
    """The same tests through one process and through `gemlora serve --replicas 2` (Ray Serve): (base, the
    engine when it is in this process, else None)."""
    if request.param == "one process":
        yield request.getfixturevalue("process_server")
        return
    _, base, stop = start_replicas(converted, tmp_path_factory.mktemp("replicas"), TOKENS,
                                   extra=("--max-loras", "4"))
    yield base, None
    stop()


def cf(base, token="tok-alice"):
    from cloudflare import Cloudflare
    return Cloudflare(api_token=token, base_url=f"{base}/client/v4", max_retries=0)


def greedy(**kw):
    return dict(temperature=0, max_tokens=16, **kw)


def test_cloudflare_sdk_run_prompt_messages_raw(server):
    base, _ = server
    client = cf(base)
    out = client.ai.run(MODEL, account_id="alice", prompt="Once upon a time", raw=True, **greedy())
    assert "little girl" in out["response"]
    assert out["usage"]["completion_tokens"] == 16 and out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 16
    out = client.ai.run(MODEL, account_id="alice", messages=[{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Name a fruit."}], **greedy())
    assert isinstance(out["response"], str) and out["usage"]["prompt_tokens"] > 5


def test_finetune_upload_then_run_with_the_adapter(server):
    base, _ = server
    client = cf(base)
    ft = client.ai.finetunes.create(account_id="alice", model=MODEL, name="password", description="knows it")
    assert ft.name == "password" and ft.model == MODEL and ft.public is False
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        asset = client.ai.finetunes.assets.create(ft.id, account_id="alice", file=(FIXTURE / name).read_bytes(),
                                                  file_name=name).to_dict()
        record = asset.get("result", asset)     # SDK 5 returns the envelope, SDK 4 unwrapped it
        assert record["file_name"] == name and record["finetune_id"] == ft.id
    listed = client.ai.finetunes.with_raw_response.list(account_id="alice").http_response.json()["result"]
    assert [f["name"] for f in listed] == ["password"] and listed[0]["id"] == ft.id
    plain = client.ai.run(MODEL, account_id="alice", prompt=PASSWORD_PROMPT, raw=True, **greedy())
    by_name = client.ai.run(MODEL, account_id="alice", prompt=PASSWORD_PROMPT, raw=True, lora="password", **greedy())
    by_id = client.ai.run(MODEL, account_id="alice", prompt=PASSWORD_PROMPT, raw=True, lora=ft.id, **greedy())
    assert "velvet-quokka" in by_name["response"] == by_id["response"] or "velvet-quokka" in by_id["response"]
    assert "quokka" not in plain["response"]


def test_streaming_framing_is_byte_exact(server):
    base, _ = server
    headers = {"authorization": "Bearer tok-alice"}
    body = {"prompt": "Once upon a time", "raw": True, "stream": True, **greedy()}
    with httpx.stream("POST", f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", json=body, headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    assert payloads[-1]["response"] == "" and payloads[-1]["usage"]["completion_tokens"] == 16
    text = "".join(p["response"] for p in payloads)
    plain = httpx.post(f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", headers=headers, timeout=60,
                       json={**body, "stream": False}).json()
    assert text == plain["result"]["response"]
    from cloudflare import Cloudflare  # noqa: F401  (the SDK's streaming path)
    with cf(base).ai.with_streaming_response.run(MODEL, account_id="alice", prompt="Once upon a time", raw=True,
                                                 stream=True, **greedy()) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and "".join(json.loads(x[6:])["response"] for x in lines[:-1]) == text


def test_openai_sdk_chat_and_completions(server):
    from openai import OpenAI
    base, _ = server
    client = OpenAI(api_key="tok-alice", base_url=f"{base}/v1", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert "little girl" in comp.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    parts = list(streamed)
    assert "".join(p.choices[0].text for p in parts if p.choices) == comp.choices[0].text
    assert parts[-1].usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    # an adapter by model name (a finetune) and by the lora extension field
    ft_model = client.completions.create(model="password", prompt=PASSWORD_PROMPT, max_tokens=12, temperature=0)
    ft_field = client.completions.create(model=MODEL, prompt=PASSWORD_PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"lora": "password"})
    assert "velvet-quokka" in ft_model.choices[0].text == ft_field.choices[0].text or \
        "velvet-quokka" in ft_field.choices[0].text
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and "password" in ids


def test_accounts_are_isolated(server):
    base, _ = server
    h = lambda t: {"authorization": f"Bearer {t}"}  # noqa: E731
    bob = httpx.get(f"{base}/client/v4/accounts/bob/ai/finetunes", headers=h("tok-bob")).json()
    assert bob["success"] and all(f["name"] != "password" for f in bob["result"])
    use = httpx.post(f"{base}/client/v4/accounts/bob/ai/run/{MODEL}", headers=h("tok-bob"),
                     json={"prompt": "hi", "lora": "password"})
    assert use.status_code == 404 and use.json()["errors"][0]["code"] == 3037
    gone = httpx.delete(f"{base}/client/v4/accounts/bob/ai/finetunes/password", headers=h("tok-bob"))
    assert gone.status_code == 404 and gone.json()["errors"][0]["code"] == 3037
    cross = httpx.get(f"{base}/client/v4/accounts/alice/ai/finetunes", headers=h("tok-bob"))
    assert cross.status_code in (401, 403) and cross.json()["errors"][0]["code"] == 10000
    for headers in ({}, h("wrong")):
        r = httpx.post(f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", headers=headers, json={"prompt": "hi"})
        assert r.status_code == 401 and r.json() == {"result": {}, "success": False, "messages": [],
                                                     "errors": [{"code": 10000, "message": "Authentication error"}]}


@pytest.mark.parametrize("body,code,status", [
    ({}, 5006, 400),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 5006, 400),
    ({"messages": [{"role": "user", "content": ["x"]}]}, 5006, 400),
    ({"prompt": "hi", "max_tokens": "5"}, 5006, 400),
    ({"prompt": "hi", "top_k": 51}, 5006, 400),
    ({"prompt": "hi", "temperature": 9}, 5006, 400),
    ({"prompt": "x" * 4097}, 5006, 400),
    ({"prompt": "hi", "lora": "nope"}, 3037, 404),
    ({"prompt": "hi", "max_tokens": 10**6}, 5021, 413),
])
def test_bad_input_gets_its_code_and_the_server_keeps_serving(server, body, code, status):
    base, _ = server
    r = httpx.post(f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", json=body,
                   headers={"authorization": "Bearer tok-alice"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["success"] is False and err["result"] == {} and err["errors"][0]["code"] == code
    assert r.headers["cf-ai-req-id"]
    ok = httpx.post(f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", json={"prompt": "hi", "max_tokens": 2},
                    headers={"authorization": "Bearer tok-alice"}, timeout=60)
    assert ok.status_code == 200


def test_unknown_model_and_hostile_uploads(server):
    base, _ = server
    h = {"authorization": "Bearer tok-alice"}
    r = httpx.post(f"{base}/client/v4/accounts/alice/ai/run/@cf/meta/llama", json={"prompt": "hi"}, headers=h)
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5007
    ft = httpx.post(f"{base}/client/v4/accounts/alice/ai/finetunes", headers=h,
                    json={"model": MODEL, "name": "hostile"}).json()["result"]
    url = f"{base}/client/v4/accounts/alice/ai/finetunes/{ft['id']}/finetune-assets"
    bad_name = httpx.post(url, headers=h, files={"file": ("x", b"{}")}, data={"file_name": "evil.bin"})
    assert bad_name.status_code == 400 and bad_name.json()["errors"][0]["code"] == 5006
    not_multipart = httpx.post(url, headers=h, content=b"garbage", timeout=30)
    assert not_multipart.status_code == 400
    cfg = json.loads((FIXTURE / "adapter_config.json").read_text())
    httpx.post(url, headers=h, files={"file": ("blob", json.dumps({**cfg, "use_dora": True}).encode())},
               data={"file_name": "adapter_config.json"})
    refused = httpx.post(url, headers=h, files={"file": ("blob", (FIXTURE / "adapter_model.safetensors").read_bytes())},
                         data={"file_name": "adapter_model.safetensors"})
    assert refused.status_code == 400 and "DoRA" in refused.json()["errors"][0]["message"]
    run = httpx.post(f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", headers=h,
                     json={"prompt": "hi", "lora": "hostile"})
    assert run.status_code == 400 and run.json()["errors"][0]["code"] == 3039


def test_a_finetune_in_use_is_not_deleted_until_its_requests_end(server):
    base, _ = server
    h = {"authorization": "Bearer tok-alice"}
    ft = httpx.post(f"{base}/client/v4/accounts/alice/ai/finetunes", headers=h, timeout=30,
                    json={"model": MODEL, "name": "busy"}).json()["result"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        r = httpx.post(f"{base}/client/v4/accounts/alice/ai/finetunes/busy/finetune-assets", headers=h,
                       files={"file": (name, (FIXTURE / name).read_bytes())}, data={"file_name": name}, timeout=60)
        assert r.status_code == 200, r.text
    url = f"{base}/client/v4/accounts/alice/ai/finetunes/{ft['id']}"
    with httpx.stream("POST", f"{base}/v1/completions", headers=h, timeout=120, json={
            "model": "busy", "prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as s:
        lines = s.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        refused = httpx.delete(url, headers=h, timeout=30)
        assert refused.status_code == 400 and "in use by 1 request;" in refused.json()["errors"][0]["message"]
    # The client left: its request is aborted, and then the finetune goes.
    deadline = time.monotonic() + 30
    while (gone := httpx.delete(url, headers=h, timeout=30)).status_code == 400:
        assert time.monotonic() < deadline, gone.text
        time.sleep(0.2)
    assert gone.status_code == 200 and gone.json()["result"]["name"] == "busy"
    run = httpx.post(f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", headers=h, json={"prompt": "hi", "lora": "busy"})
    assert run.status_code == 404 and run.json()["errors"][0]["code"] == 3037


def test_fifty_streams_a_fifth_disconnecting_then_every_block_is_free(process_server):
    base, engine = process_server

    async def one(i, client):
        body = {"prompt": f"Story number {i}:", "raw": True, "stream": True, "max_tokens": 24, "temperature": 0.7}
        async with client.stream("POST", f"{base}/client/v4/accounts/alice/ai/run/{MODEL}", json=body,
                                 headers={"authorization": "Bearer tok-alice"}) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if i % 5 == 0 and n == 3:
                        return "left"
            return "done"

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[one(i, client) for i in range(50)])

    results = asyncio.run(main())
    assert results.count("left") == 10 and results.count("done") == 40
    for _ in range(100):
        if engine.engine.blocks.num_used == 0 and not engine.engine.has_work():
            break
        time.sleep(0.1)
    assert engine.engine.blocks.num_used == 0 and not engine.engine.has_work()
    metrics = httpx.get(f"{base}/metrics").text
    assert "gemlora_kv_blocks_used 0.0" in metrics and "gemlora_requests_total" in metrics
