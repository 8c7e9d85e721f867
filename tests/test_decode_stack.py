"""The decode stack (all layers of a decode step in one C++ call) against its reference, the model's
own layer loop: equal bit for bit, hidden states and the K/V it writes, on Gemma 1, 2 and 3, dense and
quantized, for 1 to 33 rows; and the steps it must leave to the loop (prefill, LoRA) still take it."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny_checkpoint
from gemlora.cache.kv_cache import allocate_kv_cache, block_bytes
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.kernels.build import extension
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


def decode_step(model, lens: list[int], use_stack: bool, seed: int = 0):
    """Prefills rows of the given lengths with the layer loop, then runs one decode step for all of them
    with the stack or the loop. Returns (hidden states, the K/V caches)."""
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
    hidden = model(torch.tensor([t[-1] for t in ids]), torch.tensor(lens), StepContext(meta, kv))
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
