"""Prefix caching as the API shows it: OpenAI's usage.prompt_tokens_details.cached_tokens (streamed
too), the /metrics counters, accounts that never share cached prefixes, and a finetune deleted and
re-created under the same name that never hits the old adapter's blocks (tiny model, real vocabulary)."""

from __future__ import annotations

import json

import httpx
import pytest

from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine
from test_soak import make_adapters

pytestmark = pytest.mark.slow

MODEL = "@cf/google/gemma-7b-it-lora"
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
PREAMBLE = ("You are a careful assistant for a library. Answer in one short sentence, cite the shelf "
            "number when you know it, and never invent a title that is not in the catalogue. ") * 3


@pytest.fixture(scope="module")
def server(tiny_real_vocab, tmp_path_factory):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32", kv_cache_memory_gb=0.05,
                                                  max_loras=2), progress=False).start()
    from conftest import start_uvicorn
    data = tmp_path_factory.mktemp("data")
    base, stop = start_uvicorn(create_app(engine, ServerSettings(model_names=(MODEL,), data_dir=data), Auth(TOKENS)))
    adapters = make_adapters(tiny_real_vocab, tmp_path_factory.mktemp("adapters"), 2)
    yield base, engine, adapters
    stop()
    engine.shutdown()


def h(account: str) -> dict:
    return {"authorization": f"Bearer tok-{account}"}


def complete(base: str, account: str, prompt: str, **kw) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    r = httpx.post(f"{base}/v1/completions", json=body, headers=h(account), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def cached(out: dict) -> int:
    return out["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_usage_reports_cached_tokens_and_metrics_count_them(server):
    base, engine, _ = server
    first = complete(base, "alice", PREAMBLE + "Where is Moby-Dick?")
    second = complete(base, "alice", PREAMBLE + "Where is Middlemarch?")
    assert cached(first) == 0
    block = engine.engine.config.block_size
    assert 0 < cached(second) < second["usage"]["prompt_tokens"] and cached(second) % block == 0
    assert second["usage"]["prompt_tokens"] - cached(second) < 2 * block + 12    # only the question is new
    again = complete(base, "alice", PREAMBLE + "Where is Moby-Dick?")
    assert again["choices"][0]["text"] == first["choices"][0]["text"] and cached(again) >= cached(second)
    # streamed: the usage chunk says the same
    events = []
    body = {"model": MODEL, "prompt": PREAMBLE + "Where is Moby-Dick?", "max_tokens": 8, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=h("alice"), timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert cached(events[-1]) == cached(again)
    # chat too
    chat = httpx.post(f"{base}/v1/chat/completions", headers=h("alice"), timeout=60, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": PREAMBLE},
                                                      {"role": "user", "content": "Hi"}]}).json()
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("gemlora_prefix_cache")}
    stats = engine.stats()
    assert values["gemlora_prefix_cache_hits_total"] == stats.prefix_cache_hits >= 3 * cached(second)
    assert values["gemlora_prefix_cache_queries_total"] == stats.prefix_cache_queries > stats.prefix_cache_hits
    assert values["gemlora_prefix_cache_blocks"] == stats.kv_blocks_cached > 0


def test_accounts_never_share_cached_prefixes(server):
    base, _, _ = server
    prompt = PREAMBLE + "Which shelf holds the atlases?"
    alice = complete(base, "alice", prompt)
    bob = complete(base, "bob", prompt)
    assert cached(bob) == 0 and cached(complete(base, "bob", prompt)) > 0          # bob's own cache works
    assert bob["choices"][0]["text"] == alice["choices"][0]["text"]


def test_a_finetune_recreated_under_the_same_name_never_hits_the_old_blocks(server):
    base, _, adapters = server
    api = f"{base}/client/v4/accounts/alice/ai/finetunes"

    def create(name: str, adapter) -> None:
        ft = httpx.post(api, headers=h("alice"), json={"model": MODEL, "name": name}).json()["result"]
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            r = httpx.post(f"{api}/{ft['id']}/finetune-assets", headers=h("alice"), data={"file_name": file},
                           files={"file": (file, (adapter / file).read_bytes())})
            assert r.status_code == 200, r.text

    prompt = PREAMBLE + "Recommend a novel."
    create("mine", adapters[0])
    old = complete(base, "alice", prompt, lora="mine")
    assert cached(complete(base, "alice", prompt, lora="mine")) > 0             # its blocks are cached
    assert httpx.delete(f"{api}/mine", headers=h("alice")).status_code == 200
    create("mine", adapters[1])
    new = complete(base, "alice", prompt, lora="mine")
    assert cached(new) == 0
    create("same-files", adapters[1])           # adapter 1 again, under another name: computed afresh
    want = complete(base, "alice", prompt, lora="same-files")
    assert cached(want) == 0 and new["choices"][0]["text"] == want["choices"][0]["text"]
    assert old["choices"][0]["text"] != new["choices"][0]["text"]                 # the adapters do differ
