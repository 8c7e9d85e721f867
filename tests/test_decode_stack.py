"""The decode stack (all layers of a decode step in one C++ call) against its reference, the model's
own layer loop: equal bit for bit, hidden states and the K/V it writes, on Gemma 1, 2 and 3, dense and
quantized, for 1 to 33 rows, with and without adapters (mixed ranks and targets, rows without one);
and the steps it must leave to the loop (prefill) still take it."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny_checkpoint
from gemlora.lora.adapter import LoRAAdapter, LoRAWeights, _dims
from gemlora.lora.batch import LoRABatch
from gemlora.lora.slots import LoRASlots
from gemlora.cache.kv_cache import allocate_kv_cache, block_bytes
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.model.attention import AttentionMetadata
from gemlora.model.gemma import StepContext
from gemlora.model.loader import load_model
from gemlora.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("kernels")
BS = 4


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"stack-{request.param}")
    make_tiny_checkpoint(request.param, path)
    return path


def decode_step(model, lens: list[int], use_stack: bool, seed: int = 0, lora: LoRABatch | None = None):
    """Prefills rows of the given lengths with the layer loop, then runs one decode step for all of them
    with the stack or the loop (with `lora`, the step's adapters). Returns (hidden states, K/V caches)."""
    g = torch.Generator().manual_seed(seed)
    tables, n = [], 0
    for length in lens:
        need = -(-(length + 1) // BS)
        tables.append(list(range(n, n + need)))
        n += need
    kv = allocate_kv_cache(model.cfg, n, BS, torch.float32, "cpu")
    ids = [torch.randint(2, model.cfg.vocab_size, (length + 1,), generator=g).tolist() for length in lens]
    window = model.cfg.sliding_window
    model.use_decode_stack = False
    for table, toks, length in zip(tables, ids, lens):          # the prompts, one by one, with the loop
        meta = AttentionMetadata.build([length], [length], [table], BS, window, torch.device("cpu"))
        model(torch.tensor(toks[:length]), torch.arange(length), StepContext(meta, kv))
    model.use_decode_stack = use_stack
    meta = AttentionMetadata.build([1] * len(lens), [length + 1 for length in lens], tables, BS, window,
                                   torch.device("cpu"))
    hidden = model(torch.tensor([t[-1] for t in ids]), torch.tensor(lens), StepContext(meta, kv, lora))
    model.use_decode_stack = True
    return hidden, kv


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_the_stack_equals_the_layer_loop_bit_for_bit(checkpoint, quantization):
    model = load_model(checkpoint, quantization=quantization)
    assert model.decode_stack() is not None
    rng = random.Random(1)
    for rows in (1, 2, 5, 33):
        lens = [rng.randint(1, 40) for _ in range(rows)]          # some cross the sliding window of 8
        want, kv_want = decode_step(model, lens, use_stack=False)
        got, kv_got = decode_step(model, lens, use_stack=True)
        assert torch.equal(got, want), (rows, (got - want).abs().max())
        for (k1, v1), (k2, v2) in zip(kv_got, kv_want):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)


def random_adapter(cfg, rank: int, modules: list[str], seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            in_f, out_f = _dims(cfg, m)
            weights[layer, m] = LoRAWeights(torch.randn(rank, in_f, generator=g) * 0.3,
                                            torch.randn(out_f, rank, generator=g) * 0.3)
    return LoRAAdapter(None, {}, weights, rank, 0)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_the_stack_with_adapters_equals_the_layer_loop_bit_for_bit(checkpoint, quantization):
    model = load_model(checkpoint, quantization=quantization)
    slots = LoRASlots(model.lora_targets(), max_loras=4, max_rank=8, dtype=torch.float32, device="cpu")
    slots.activate({"all-8": random_adapter(model.cfg, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"], 1),
                    "qv-3": random_adapter(model.cfg, 3, ["q_proj", "v_proj"], 2),
                    "mlp-5": random_adapter(model.cfg, 5, ["up_proj", "down_proj"], 3)})
    rng = random.Random(2)
    for rows in (1, 3, 9):
        lens = [rng.randint(1, 40) for _ in range(rows)]
        row_slots = [rng.choice([-1, 0, 1, 2]) for _ in range(rows)]
        batch = LoRABatch.build(row_slots, [rng.choice([0.5, 1.0, 2.0]) for _ in range(rows)], slots,
                                torch.device("cpu"))
        if batch is None:
            continue
        assert model.decode_stack().applies(torch.zeros(1, dtype=torch.float32), *_plan(model, lens), batch)
        want, kv_want = decode_step(model, lens, use_stack=False, lora=batch)
        got, kv_got = decode_step(model, lens, use_stack=True, lora=batch)
        plain, _ = decode_step(model, lens, use_stack=True)
        assert torch.equal(got, want), (rows, (got - want).abs().max())
        for (k1, v1), (k2, v2) in zip(kv_got, kv_want):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
        with_adapter = torch.tensor(row_slots) >= 0
        assert not torch.equal(got[with_adapter], plain[with_adapter])     # the adapters took effect
        assert torch.equal(got[~with_adapter], plain[~with_adapter])       # and only on their own rows


def _plan(model, lens):
    """(attention plan, KV caches) of a decode step of rows with these lengths (for `applies`)."""
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(len(lens))]
    meta = AttentionMetadata.build([1] * len(lens), [n + 1 for n in lens], tables, BS, model.cfg.sliding_window,
                                   torch.device("cpu"))
    return meta, allocate_kv_cache(model.cfg, 1, BS, torch.float32, "cpu")


def test_the_stack_serves_decode_steps_and_leaves_the_rest_to_the_loop(checkpoint):
    model = load_model(checkpoint, quantization="int8")
    calls = []
    stack = model.decode_stack()
    original = type(stack).__call__

    def counted(self, *a):
        calls.append(a[0].shape[0])
        return original(self, *a)

    type(stack).__call__ = counted
    try:
        gb = 64 * block_bytes(model.cfg, BS, torch.float32) / 2**30

        def generate(prompts, max_tokens=5, **kw):
            engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=gb, block_size=BS, **kw), frozenset())
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            ids = [engine.add_request(p, params) for p in prompts]
            outs = {i: [] for i in ids}
            while engine.has_work():
                for o in engine.step():
                    outs[o.request_id] += o.new_token_ids
            return [outs[i] for i in ids]

        prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
        outs = generate(prompts, num_speculative_tokens=0)
        plain_calls = list(calls)
        # a prompt that repeats itself, so prompt lookup drafts: its verify steps are decode steps too
        repeats = [[5, 6, 7, 8] * 4]
        drafted = generate(repeats, max_tokens=24)
        spec_calls = calls[len(plain_calls):]
        model.use_decode_stack = False
        want = generate(prompts, num_speculative_tokens=0)
        want_drafted = generate(repeats, max_tokens=24, num_speculative_tokens=0)
    finally:
        type(stack).__call__ = original
        model.use_decode_stack = True
    assert plain_calls == [2, 2, 2, 2]           # the prefill step took the loop; the four decode steps the stack
    assert outs == want
    assert max(spec_calls) > 1 and drafted == want_drafted       # verify rows: one request, several rows
