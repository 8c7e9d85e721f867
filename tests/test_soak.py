"""A soak: 200 requests from 4 accounts (their own adapters and none, both dialects, streamed or not,
some clients leaving mid-way), run twice in one server with fewer adapter slots than adapters and a
KV cache small enough to preempt. Afterwards nothing is held (KV blocks, slot users, adapter pins),
the finetune store is as uploaded, and every greedy output equals the same request run alone. Half
the prompts share a preamble, so the prefix cache hits, evicts and is reused after preemption."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time

import httpx
import pytest
import torch

from gemlora.api.app import ServerSettings, create_app
from gemlora.api.auth import Auth
from gemlora.cache.kv_cache import block_bytes
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine
from gemlora.model.config import GemmaConfig

pytestmark = pytest.mark.slow

MODEL = "@cf/google/gemma-7b-it-lora"
ACCOUNTS = ("acct-a", "acct-b", "acct-c", "acct-d")
TOKENS = {f"tok-{a}": a for a in ACCOUNTS}
WORDS = "river stone light orange seven quiet market winter engine paper garden silver".split()
PREAMBLE = "A shared preamble that half of the prompts start with, so that the prefix cache is busy too: "


def make_adapters(base_dir, out_dir, n):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    paths = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
        pm = get_peft_model(hf, LoraConfig(r=2 + 2 * (i % 3), lora_alpha=8, target_modules=targets[i % 2]))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        path = out_dir / f"adapter-{i}"
        pm.save_pretrained(path)
        paths.append(path)
    return paths


def spec(rng: random.Random, i: int) -> dict:
    account = ACCOUNTS[i % 4]
    return {"account": account, "lora": rng.choice([None, f"ft-{account}-0", f"ft-{account}-1"]),
            "openai": rng.random() < 0.3, "stream": rng.random() < 0.5, "leave": rng.random() < 0.15,
            "prompt": rng.choice(["", PREAMBLE]) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))),
            "max_tokens": rng.randint(3, 40)}


async def send(client, base, s, *, alone=False) -> str | None:
    """The generated text; None when this client left before the end."""
    leave = s["leave"] and not alone
    h = {"authorization": f"Bearer tok-{s['account']}"}
    if s["openai"]:
        url = f"{base}/v1/completions"
        body = {"model": MODEL, "prompt": s["prompt"], "max_tokens": s["max_tokens"], "temperature": 0}
        if s["lora"]:
            body["lora"] = s["lora"]
    else:
        url = f"{base}/client/v4/accounts/{s['account']}/ai/run/{MODEL}"
        body = {"prompt": s["prompt"], "raw": True, "max_tokens": s["max_tokens"], "temperature": 0}
        if s["lora"]:
            body["lora"] = s["lora"]
    if not s["stream"]:
        timeout = httpx.Timeout(0.05 if leave else 120)
        try:
            r = await client.post(url, json=body, headers=h, timeout=timeout)
        except httpx.TimeoutException:
            return None
        assert r.status_code == 200, r.text
        data = r.json()
        return data["choices"][0]["text"] if s["openai"] else data["result"]["response"]
    text, events = [], 0
    async with client.stream("POST", url, json={**body, "stream": True}, headers=h, timeout=120) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events += 1
            if leave and events == 2:
                return None
            event = json.loads(line[6:])
            text.append(event["choices"][0]["text"] if s["openai"] else event["response"])
    return "".join(text)


def test_soak_two_rounds_of_200_mixed_requests(tiny_real_vocab, tmp_path, serving):
    cfg = GemmaConfig.from_hf(json.loads((tiny_real_vocab / "config.json").read_text()))
    kv_gb = 20 * block_bytes(cfg, 16, torch.float32) / 2**30        # 320 tokens: busy requests preempt
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32", kv_cache_memory_gb=kv_gb,
                                                  max_loras=3, max_cpu_loras=4, max_num_seqs=24),
                                     progress=False).start()
    try:
        app = create_app(engine, ServerSettings(model_names=(MODEL,), data_dir=tmp_path / "data"), Auth(TOKENS))
        base = serving(app)
        adapters = make_adapters(tiny_real_vocab, tmp_path, 8)
        uploaded = {}
        for k, account in enumerate(ACCOUNTS):
            h = {"authorization": f"Bearer tok-{account}"}
            for j in range(2):
                name = f"ft-{account}-{j}"
                api = f"{base}/client/v4/accounts/{account}/ai/finetunes"
                ft = httpx.post(api, headers=h, json={"model": MODEL, "name": name}).json()["result"]
                for file in ("adapter_config.json", "adapter_model.safetensors"):
                    data = (adapters[2 * k + j] / file).read_bytes()
                    r = httpx.post(f"{api}/{ft['id']}/finetune-assets", headers=h, data={"file_name": file},
                                   files={"file": (file, data)})
                    assert r.status_code == 200, r.text
                    uploaded[(account, name, file)] = hashlib.sha256(data).hexdigest()

        rng = random.Random(7)
        specs = [spec(rng, i) for i in range(200)]

        async def round_of(specs):
            limit = asyncio.Semaphore(32)
            async with httpx.AsyncClient() as client:
                async def one(s):
                    async with limit:
                        return await send(client, base, s)
                return await asyncio.gather(*[one(s) for s in specs])

        start = time.perf_counter()
        rounds = [asyncio.run(round_of(specs)), asyncio.run(round_of(specs))]
        elapsed = time.perf_counter() - start

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (engine.engine.has_work() or engine.stats().kv_blocks_used):
            time.sleep(0.05)
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0
        assert not any(engine.engine.blocks._refs)                                # every block free or cached
        assert not engine.engine.scheduler.adapter_users                         # no slot has a user
        assert all(engine.registry.in_flight(ref) == 0 for ref in engine.registry.refs())
        assert stats.failed_steps == 0
        print(f"\nsoak: 2 x 200 requests in {elapsed:.1f} s, {stats.preemptions} preemptions, "
              f"{stats.adapter_slot_loads} slot loads")
        print(f"prefix cache: {stats.prefix_cache_hits} of {stats.prefix_cache_queries} prompt tokens hit, "
              f"{engine.engine.blocks.evictions} evictions")
        assert stats.preemptions > 0 and stats.adapter_slot_loads > 3             # every path was exercised
        assert stats.prefix_cache_hits > 0 and engine.engine.blocks.evictions > 0

        for account in ACCOUNTS:                                                  # the store as uploaded
            h = {"authorization": f"Bearer tok-{account}"}
            listed = httpx.get(f"{base}/client/v4/accounts/{account}/ai/finetunes", headers=h).json()["result"]
            assert sorted(f["name"] for f in listed) == [f"ft-{account}-0", f"ft-{account}-1"]
            for f in listed:
                for file in ("adapter_config.json", "adapter_model.safetensors"):
                    stored = (tmp_path / "data" / "finetunes" / f["id"] / file).read_bytes()
                    assert hashlib.sha256(stored).hexdigest() == uploaded[(account, f["name"], file)]

        async def alone(specs):
            async with httpx.AsyncClient() as client:
                return [await send(client, base, s, alone=True) for s in specs]

        reference = asyncio.run(alone(specs))
        checked = 0
        for outputs in rounds:
            for s, got, want in zip(specs, outputs, reference):
                if got is not None:
                    assert got == want, s
                    checked += 1
        assert checked > 300
    finally:
        engine.shutdown()
