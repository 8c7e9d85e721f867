"""AdapterRegistry (ids, names, RAM LRU, pins, removal) and LoRASlots (slot reuse, failed loads)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_hf_config, tiny_lora_tensors
from gemlora.lora.adapter import AdapterError
from gemlora.lora.registry import AdapterInUseError, AdapterRegistry, UnknownAdapterError
from gemlora.lora.slots import LoRASlots
from gemlora.model.config import GemmaConfig


@pytest.fixture(scope="module")
def cfg():
    return GemmaConfig.from_hf(tiny_hf_config("gemma3").to_dict())


def write_adapter(path, cfg, seed=0, rank=2):
    path.mkdir()
    save_file(tiny_lora_tensors(cfg, rank, seed), path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"], "bias": "none"}))
    return path


def test_names_ids_and_refusals(cfg, tmp_path):
    reg = AdapterRegistry(cfg)
    a = reg.register(write_adapter(tmp_path / "a", cfg), name="alpha")
    assert reg.resolve("alpha") == a == reg.resolve(a.id) and a.id != "alpha"
    with pytest.raises(AdapterError, match="already registered"):
        reg.register(write_adapter(tmp_path / "a2", cfg), name="alpha")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError):
        reg.register(bad, name="bad")
    assert [r.name for r in reg.refs()] == ["alpha"]
    with pytest.raises(UnknownAdapterError):
        reg.resolve("bad")


def test_lru_keeps_pinned_adapters_and_reloads_others(cfg, tmp_path):
    reg = AdapterRegistry(cfg, max_cpu_loras=2)
    refs = [reg.register(write_adapter(tmp_path / f"a{i}", cfg, seed=i)) for i in range(4)]
    assert reg.num_loaded == 2 and reg.loads == 4
    pinned, weights = reg.acquire(refs[0].name)           # evicted earlier: reloaded from disk
    assert reg.loads == 5
    for r in refs[1:]:
        reg.acquire(r.id)
        reg.release(r)
    assert reg.acquire(refs[0].id)[1] is weights          # never dropped while in flight
    reg.release(pinned)
    reg.release(pinned)
    assert reg.in_flight(pinned) == 0


def test_unregister_waits_for_in_flight_requests(cfg, tmp_path):
    reg = AdapterRegistry(cfg)
    ref = reg.register(write_adapter(tmp_path / "a", cfg))
    reg.acquire("a")
    with pytest.raises(AdapterInUseError):
        reg.unregister("a")
    reg.release(ref)
    assert reg.unregister(ref.id) == ref
    with pytest.raises(UnknownAdapterError):
        reg.acquire("a")


def slots_for(cfg, n):
    targets = {f"layers.{i}.self_attn.qkv_proj": (cfg.hidden_size, (cfg.q_size, cfg.kv_size, cfg.kv_size))
               for i in range(cfg.num_layers)}
    return LoRASlots(targets, n, 4, torch.float32, "cpu")


def test_slots_reuse_lru_and_never_evict_the_steps_own_adapters(cfg, tmp_path):
    reg = AdapterRegistry(cfg)
    w = {n: reg.acquire(reg.register(write_adapter(tmp_path / n, cfg, seed=i), name=n).id)[1]
         for i, n in enumerate("xyzu")}
    slots = slots_for(cfg, 2)
    assert slots.activate({"x": w["x"], "y": w["y"]}) == {"x": 0, "y": 1} and slots.loads == 2
    assert slots.activate({"y": w["y"], "x": w["x"]}) == {"x": 0, "y": 1} and slots.loads == 2   # resident
    assert slots.activate({"z": w["z"], "y": w["y"]}) == {"z": 0, "y": 1}    # x least recently used
    assert slots.activate({"u": w["u"]}, keep={"z"}) == {"u": 1}             # z is running elsewhere: kept
    assert slots.slot_of("z") == 0 and slots.slot_of("y") is None and slots.loads == 4
    key = "layers.0.self_attn.qkv_proj"
    a = w["u"].weights[(0, "q_proj")].A
    assert torch.equal(slots.A[key][1, 0, :a.shape[0]], a)
    with pytest.raises(RuntimeError, match="3 adapters in one step"):
        slots.activate({n: w[n] for n in "xyz"})


def test_a_slot_load_that_fails_half_way_leaves_an_empty_slot(cfg, tmp_path):
    reg = AdapterRegistry(cfg)
    good = reg.acquire(reg.register(write_adapter(tmp_path / "g", cfg), name="g").id)[1]
    slots = slots_for(cfg, 1)

    class Broken:              # its third tensor cannot be copied, as an OOM or a shape bug would fail
        rank = good.rank
        weights = dict(list(good.weights.items())[:2] + [((2, "q_proj"), None)])

    with pytest.raises(AttributeError):
        slots.activate({"g": Broken()})
    assert slots.slot_of("g") is None and slots.resident == 0          # never "resident" over partial weights
    assert all(not filled for parts in slots.filled.values() for filled in parts)
    assert all(not t.any() for t in slots.A.values()) and all(not t.any() for t in slots.B.values())
    assert slots.activate({"g": good}) == {"g": 0} and slots.loads == 1  # the next request loads it for real
    slots.forget("g")
    assert slots.resident == 0 and slots.slot_of("g") is None


def test_unregister_when_idle_waits_for_the_last_request_and_tells_the_engine(cfg, tmp_path):
    reg = AdapterRegistry(cfg)
    gone = []
    reg.on_unregister = gone.append
    ref = reg.register(write_adapter(tmp_path / "a", cfg))
    reg.acquire("a")
    reg.unregister("a", when_idle=True)           # in flight: hidden at once, dropped at the release
    with pytest.raises(UnknownAdapterError):
        reg.acquire("a")
    assert gone == [] and reg.num_loaded == 1
    reg.release(ref)
    assert gone == [ref.id] and reg.num_loaded == 0
    other = reg.register(write_adapter(tmp_path / "b", cfg))
    reg.unregister(other.id, when_idle=True)      # idle: dropped at once
    assert gone == [ref.id, other.id]


def test_concurrent_first_requests_read_an_adapter_once(cfg, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    path = write_adapter(tmp_path / "a", cfg)
    reg = AdapterRegistry(cfg, max_cpu_loras=1)
    with ThreadPoolExecutor(8) as pool:                          # eight requests' first sight of it
        refs = list(pool.map(lambda _: reg.ensure(path, "fid"), range(8)))
    assert len({r.id for r in refs}) == 1 and reg.loads == 1
    reg.register(write_adapter(tmp_path / "b", cfg), name="b")  # pushes "fid" out of RAM (max_cpu_loras 1)
    loads = reg.loads
    with ThreadPoolExecutor(8) as pool:                          # eight requests for it, back from disk once
        pinned = list(pool.map(lambda _: reg.acquire("fid"), range(8)))
    assert reg.loads == loads + 1 and len({id(a) for _, a in pinned}) == 1
    for ref, _ in pinned:
        reg.release(ref)
