"""AdapterRegistry (ids, names, RAM LRU, pins) and SlotTable (slot reuse and waiting)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_hf_config
from gemlora.lora.adapter import AdapterError
from gemlora.lora.registry import AdapterInUseError, AdapterRegistry, UnknownAdapterError
from gemlora.lora.slot_table import SlotTable
from gemlora.model.config import GemmaConfig


@pytest.fixture(scope="module")
def cfg():
    return GemmaConfig.from_hf(tiny_hf_config("gemma3").to_dict())


def write_adapter(path, cfg, seed=0, rank=2):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for layer in range(cfg.num_layers):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        t[f"{key}.lora_A.weight"] = torch.randn(rank, cfg.hidden_size, generator=g)
        t[f"{key}.lora_B.weight"] = torch.randn(cfg.q_size, rank, generator=g)
    path.mkdir()
    save_file(t, path / "adapter_model.safetensors")
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


def test_slot_table_reuses_idle_slots_and_never_evicts_busy_ones():
    t = SlotTable(2)
    assert t.assign("x") == (0, True) and t.assign("y") == (1, True)
    assert t.assign("z") is None                     # both busy: z waits
    assert t.assign("x") == (0, False)               # resident: no load
    t.release(0), t.release(0)
    assert t.assign("z") == (0, True)                # x was idle: its slot goes to z
    t.release(1)
    assert t.assign("x") == (1, True)                # y idle, x loads there
    with pytest.raises(RuntimeError):
        SlotTable(1).release(0)
