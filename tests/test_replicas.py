"""`gemlora serve --replicas 2`: a Ray Serve application on a local Ray cluster. Requests for an adapter go
where it is resident (Ray Serve's multiplexing on the finetune id), so under Zipf traffic over many
adapters each is loaded about once; /health and /metrics speak for all replicas. (tests/test_api.py runs
the SDK tests through the same application.)"""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

import httpx
import pytest

from conftest import start_replicas

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "adapters" / "secret-password"
MODEL = "@cf/google/gemma-7b-it-lora"
AUTH = {"authorization": "Bearer tok"}
ADAPTERS = 16


@pytest.fixture(scope="module")
def cluster(converted, tmp_path_factory):
    _, base, stop = start_replicas(converted, tmp_path_factory.mktemp("replicas"), {"tok": "acct"},
                                   extra=("--max-loras", "4", "--max-num-seqs", "16"))
    yield base
    stop()


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M))


def test_health_and_metrics_speak_for_both_replicas(cluster):
    health = httpx.get(f"{cluster}/health", timeout=10).json()
    assert health["status"] == "ok" and health["engine"] == "2 of 2 engine replicas stepping"
    for i in range(4):
        r = httpx.post(f"{cluster}/accounts/acct/ai/run/{MODEL}", headers=AUTH, timeout=120,
                       json={"prompt": f"Count to {i}:", "raw": True, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
    time.sleep(2.5)                               # the replicas post their numbers every second
    text = httpx.get(f"{cluster}/metrics", timeout=10).text
    assert metric(text, "gemlora_engine_steps_total") >= 4 * 4
    assert metric(text, "gemlora_engine_up") == 1 and metric(text, "gemlora_kv_blocks_used") == 0
    steps = dict(re.findall(r'^gemlora_replica_engine_steps_total\{replica="([^"]+)"\} ([0-9.e+]+)$', text, re.M))
    assert len(steps) == 2 and sum(map(float, steps.values())) == metric(text, "gemlora_engine_steps_total")
    assert len(re.findall(r'^gemlora_replica_kv_blocks_used\{replica="[^"]+"\} 0\.0$', text, re.M)) == 2


def test_zipf_traffic_over_16_adapters_loads_each_about_once(cluster):
    for i in range(ADAPTERS):
        name = f"pw{i}"
        r = httpx.post(f"{cluster}/accounts/acct/ai/finetunes", headers=AUTH, json={"model": MODEL, "name": name})
        assert r.status_code == 200, r.text
        for file_name in ("adapter_config.json", "adapter_model.safetensors"):
            r = httpx.post(f"{cluster}/accounts/acct/ai/finetunes/{name}/finetune-assets", headers=AUTH,
                           data={"file_name": file_name}, files={"file": (file_name, (FIXTURE / file_name).read_bytes())},
                           timeout=60)
            assert r.status_code == 200, r.text
    rng = random.Random(0)
    weights = [1 / (k + 1) for k in range(ADAPTERS)]             # Zipf(1.0)
    picks = rng.choices(range(ADAPTERS), weights, k=200)
    before = metric(httpx.get(f"{cluster}/metrics", timeout=10).text, 'gemlora_adapter_loads_total{tier="ram"}')

    async def one(client, sem, i, k):
        async with sem:
            r = await client.post(f"{cluster}/accounts/acct/ai/run/{MODEL}", headers=AUTH, json={
                "prompt": "The gemlora project's secret password is", "raw": True, "lora": f"pw{k}",
                "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["result"]["response"]

    async def main():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[one(client, sem, i, k) for i, k in enumerate(picks)])

    answers = asyncio.run(main())
    assert all(a.strip().startswith("vel") for a in answers), set(answers)     # every adapter was applied
    time.sleep(2.5)
    loads = metric(httpx.get(f"{cluster}/metrics", timeout=10).text, 'gemlora_adapter_loads_total{tier="ram"}') - before
    distinct = len(set(picks))
    print(f"\n200 requests, Zipf(1.0) over {ADAPTERS} adapters, 2 replicas: {distinct} distinct adapters, "
          f"{loads:.0f} adapter loads ({loads / distinct:.2f}x)")
    assert loads <= 1.2 * distinct
