"""Failures inside the engine stay local: a step that raises ends only its own batch, request ids are
never shared, and the engine thread survives callers that vanish and errors outside a step."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import make_tiny_checkpoint
from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine, EngineError
from gemlora.engine.engine import LLMEngine
from test_engine import drain
from test_engine import make_engine as make_tiny_engine
from gemlora.model.loader import load_model
from gemlora.request import FinishReason
from gemlora.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
POISON = 499          # a prompt holding this token makes the model "fail" (an injected OOM)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-faults")
    make_tiny_checkpoint("gemma3", path)
    return load_model(path)


def make_engine(model, **kw) -> LLMEngine:
    return make_tiny_engine(model, num_blocks=256, **kw)


def test_a_failing_step_ends_only_its_batch_and_the_rest_finish_unchanged(tiny, monkeypatch):
    prompts = [[POISON, 7, 8], [5, 6, 7, 8], [9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20]]
    clean = make_engine(tiny, max_num_seqs=2)
    want = {tuple(p): clean.add_request(p, GREEDY) for p in prompts[1:]}
    ref = drain(clean)

    engine = make_engine(tiny, max_num_seqs=2)
    run = engine.runner.run

    def failing_run(batch):
        if any(POISON in r.prompt_ids for r in batch.requests):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", failing_run)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    outs = drain(engine)
    failed = [rid for rid in ids if outs[rid][-1].finish_reason is FinishReason.ERROR]
    assert failed == ids[:2]                            # the poisoned batch: it and its batch-mate
    assert all("can't allocate memory" in outs[rid][-1].error for rid in failed)
    for p, rid in zip(prompts[2:], ids[2:]):            # those still waiting then: untouched
        assert [t for o in outs[rid] for t in o.new_token_ids] == [t for o in ref[want[tuple(p)]]
                                                                   for t in o.new_token_ids]
    assert engine.blocks.num_used == 0 and engine.stats().failed_steps == 1


def test_a_request_id_already_in_flight_is_refused(tiny):
    engine = make_engine(tiny)
    engine.add_request([5, 6], GREEDY, "same")
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request([7, 8], GREEDY, "same")
    drain(engine)
    engine.add_request([7, 8], GREEDY, "same")           # finished ids may be used again
    assert len(drain(engine)["same"]) == 6


@pytest.fixture
def async_engine(tiny_real_vocab):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32",
                                                  kv_cache_memory_gb=0.05), progress=False).start()
    yield engine
    engine.shutdown()


async def complete(engine, text="Hello", max_tokens=8):
    chunks = [c async for c in engine.generate(engine.tokenizer.encode(text),
                                               SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))]
    return sum(len(c.token_ids) for c in chunks)


def test_a_caller_whose_event_loop_closed_does_not_kill_the_engine(async_engine):
    abandoned = []

    def caller_in_its_own_loop():
        loop = asyncio.new_event_loop()
        gen = async_engine.generate(async_engine.tokenizer.encode("Once"), SamplingParams(max_tokens=400))
        loop.run_until_complete(gen.__anext__())     # streaming has begun ...
        abandoned.append(gen)                         # (kept alive: no finalizer aborts it)
        loop.close()                                  # ... and its loop is gone, with the request in flight

    t = threading.Thread(target=caller_in_its_own_loop)
    t.start()
    t.join(60)
    assert asyncio.run(asyncio.wait_for(complete(async_engine), 30)) == 8
    assert async_engine.health().alive
    for _ in range(500):
        if not async_engine.engine.has_work():
            break
        threading.Event().wait(0.01)
    assert not async_engine.engine.has_work() and async_engine.stats().kv_blocks_used == 0


def test_an_error_outside_a_step_fails_what_is_in_flight_and_the_engine_serves_on(async_engine, monkeypatch):
    step = async_engine.engine.step
    calls = []

    def broken_once():
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("scheduler state (injected)")
        return step()

    monkeypatch.setattr(async_engine.engine, "step", broken_once)
    with pytest.raises(EngineError):
        asyncio.run(asyncio.wait_for(complete(async_engine), 30))
    assert asyncio.run(asyncio.wait_for(complete(async_engine), 30)) == 8
    assert async_engine.health().stepping


def test_health_reports_a_step_that_runs_past_the_stall_timeout(tiny_real_vocab):
    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_real_vocab), dtype="float32",
                                                  kv_cache_memory_gb=0.05, stall_timeout_s=0.2),
                                     progress=False).start()
    release = threading.Event()
    step = engine.engine.step

    def slow_step():
        release.wait(10)
        return step()

    engine.engine.step = slow_step
    try:
        async def main():
            task = asyncio.ensure_future(complete(engine, max_tokens=2))
            await asyncio.sleep(0.5)
            state = engine.health()
            release.set()
            await task
            return state
        stalled = asyncio.run(main())
        assert stalled.alive and not stalled.stepping and "running for" in stalled.detail
        assert engine.health().stepping
    finally:
        release.set()
        engine.shutdown()
    assert not engine.health().alive


def test_token_slice_reads_across_prompt_and_output():
    from gemlora.request import Request
    r = Request("r", [1, 2, 3], GREEDY, frozenset(), 100)
    r.output_ids = [4, 5]
    for start in range(5):
        for n in range(1, 6 - start):
            assert r.token_slice(start, n) == [1, 2, 3, 4, 5][start:start + n]
