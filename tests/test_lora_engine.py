"""Mixed-adapter batches in the engine against peft running each adapter alone (tiny Gemma 3)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny_checkpoint
from gemlora.cache.kv_cache import block_bytes
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.lora.registry import AdapterRegistry
from gemlora.model.loader import load_model
from gemlora.sampling import SamplingParams

ATOL = 1e-4
ADAPTERS = {   # name -> LoraConfig kwargs: different ranks, rsLoRA, patterns, a regex target
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2, 3, 5]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"],
                     rank_pattern={"o_proj": 6}, alpha_pattern={"down_proj": 16}),
    "regex": dict(r=6, lora_alpha=3, target_modules=r".*layers\.(0|2|3)\..*\.(k_proj|up_proj)"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path_factory.mktemp("tiny-lora-base")
    make_tiny_checkpoint("gemma3", base_dir)
    model = load_model(base_dir)
    registry = AdapterRegistry(model.cfg)
    peft_models = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        pm = get_peft_model(hf, LoraConfig(**kw))
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.normal_(0, 0.3)
        path = tmp_path_factory.mktemp(f"adapter-{name}")
        pm.save_pretrained(path)
        registry.register(path, name=name)
        peft_models[name] = pm.eval()
    base_hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return model, registry, peft_models, base_hf


def make_engine(model, **kw):
    gb = 512 * block_bytes(model.cfg, 4, model.dtype) / 2**30
    return LLMEngine(model, EngineConfig(kv_cache_memory_gb=gb, block_size=4, **kw), frozenset())


def first_logits(engine: LLMEngine) -> dict[str, torch.Tensor]:
    """Runs one step by hand (everything prefilled at once) and returns each request's logits."""
    batch = engine.scheduler.schedule()
    logits, rows = engine.runner.run(batch)
    sampled = [None] * len(batch.requests)
    for j, r in enumerate(rows):
        sampled[r] = [int(logits[j].argmax())]
    engine.scheduler.postprocess(batch, sampled)
    return {batch.requests[r].request_id: logits[j] for j, r in enumerate(rows)}


def peft_logits(pm, ids):
    with torch.no_grad():
        return pm(torch.tensor([ids])).logits[0, -1].float()


def test_mixed_batch_matches_peft_per_row(setup):
    model, registry, peft_models, base_hf = setup
    engine = make_engine(model, max_loras=4)
    rng = random.Random(0)
    rows = []   # (request id, adapter name or None, prompt)
    for name in [None, *ADAPTERS, None, *ADAPTERS]:
        ids = [rng.randrange(2, 512) for _ in range(rng.randint(3, 17))]
        kw = {}
        if name:
            ref, adapter = registry.acquire(name)
            kw = dict(adapter_id=ref.id, adapter=adapter)
        rid = engine.add_request(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), **kw)
        rows.append((rid, name, ids))
    got = first_logits(engine)
    assert len(got) == len(rows)
    for rid, name, ids in rows:
        ref = peft_logits(peft_models[name], ids) if name else peft_logits(base_hf, ids)
        torch.testing.assert_close(got[rid], ref, atol=ATOL, rtol=0)
    # and the greedy continuations, decoded in the same mixed batch, equal peft's alone
    outs: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    for rid, name, ids in rows:
        pm = peft_models[name] if name else base_hf
        with torch.no_grad():
            ref = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        first = int(got[rid].argmax())
        assert [first] + outs[rid] == ref[0, len(ids):].tolist(), name


def test_scale_zero_is_exactly_the_base_model(setup):
    model, registry, _, _ = setup
    engine = make_engine(model, max_loras=2)
    ids = [5, 9, 77, 300, 12]
    ref, adapter = registry.acquire("rslora")
    base = engine.add_request(ids, SamplingParams(max_tokens=4, temperature=0))
    zero = engine.add_request(ids, SamplingParams(max_tokens=4, temperature=0),
                              adapter_id=ref.id, adapter=adapter, lora_scale=0.0)
    half = engine.add_request(ids, SamplingParams(max_tokens=4, temperature=0),
                              adapter_id=ref.id, adapter=adapter, lora_scale=0.5)
    got = first_logits(engine)
    assert torch.equal(got[base], got[zero])
    assert not torch.allclose(got[base], got[half], atol=1e-3)


def test_more_adapters_than_slots_wait_and_all_finish(setup):
    model, registry, peft_models, _ = setup
    engine = make_engine(model, max_loras=2)
    want = {}
    for k in range(3):
        for name in ADAPTERS:
            ref, adapter = registry.acquire(name)
            rid = engine.add_request([3 + k, 4, 5], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                                     adapter_id=ref.id, adapter=adapter)
            want[rid] = (name, [3 + k, 4, 5])
    outs: dict[str, list] = {}
    max_distinct = 0
    while engine.has_work():
        running = {r.adapter_id for r in engine.scheduler.running}
        max_distinct = max(max_distinct, len(running))
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert set(outs) == set(want)
    assert all(sum(len(o.new_token_ids) for o in outs[r]) == 5 for r in want)
    assert max_distinct <= 2 and not engine.scheduler.adapter_users and engine.lora_slots.resident <= 2
    # whichever slot an adapter landed in, and after how much waiting, its output is peft's
    for rid, (name, ids) in want.items():
        with torch.no_grad():
            ref = peft_models[name].generate(input_ids=torch.tensor([ids]), max_new_tokens=5, min_new_tokens=5,
                                             do_sample=False)
        assert [t for o in outs[rid] for t in o.new_token_ids] == ref[0, 3:].tolist(), name


def test_a_slot_copy_that_fails_half_way_is_never_served(setup):
    model, registry, peft_models, _ = setup
    engine = make_engine(model, max_loras=1)
    ref, adapter = registry.acquire("rslora")

    class HalfCopied:          # its fourth module cannot be copied, as an OOM mid-copy would fail
        rank = adapter.rank
        weights = dict(list(adapter.weights.items())[:3] + [((0, "no_such_module"), None)])

    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    broken = engine.add_request([3, 4, 5], params, adapter_id=ref.id, adapter=HalfCopied())
    outs = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs[broken][-1].error and engine.lora_slots.slot_of(ref.id) is None
    good = engine.add_request([3, 4, 5], params, adapter_id=ref.id, adapter=adapter)   # same adapter id
    got = []
    while engine.has_work():
        got += [t for o in engine.step() for t in o.new_token_ids]
    with torch.no_grad():
        want = peft_models["rslora"].generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=3,
                                              min_new_tokens=3, do_sample=False)[0, 3:].tolist()
    assert got == want and good


def test_a_cold_adapter_gets_a_slot_within_a_bound_under_steady_hot_load(setup):
    model, registry, peft_models, _ = setup
    aging, max_tokens = 8, 4
    engine = make_engine(model, max_loras=2, adapter_aging_steps=aging)
    hot = [registry.acquire(n) for n in ("plain", "rslora")]
    cold_ref, cold = registry.acquire("regex")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    cold_id, submitted, finished_at, tokens = None, 3, None, []
    for step in range(300):
        for ref, adapter in hot:        # steady load: both hot adapters get a new request every step
            engine.add_request([3, 4, 5], params, adapter_id=ref.id, adapter=adapter)
        if step == submitted:
            cold_id = engine.add_request([7, 8, 9], params, adapter_id=cold_ref.id, adapter=cold)
        assert len(engine.scheduler.adapter_users) <= 2
        for o in engine.step():
            if o.request_id == cold_id:
                tokens += o.new_token_ids
                finished_at = step if o.finished else None
        if finished_at is not None:
            break
    # waits out the aging, then the hot requests already running (<= max_tokens steps each), then runs
    assert finished_at is not None and finished_at - submitted <= aging + 2 * max_tokens + 3, finished_at
    with torch.no_grad():
        want = peft_models["regex"].generate(input_ids=torch.tensor([[7, 8, 9]]), max_new_tokens=max_tokens,
                                             min_new_tokens=max_tokens, do_sample=False)[0, 3:].tolist()
    assert tokens == want
