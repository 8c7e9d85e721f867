"""Failures inside the engine stay local: a step that raises ends only its own batch, request ids are
never shared, and the engine thread survives callers that vanish and errors outside a step."""

from __future__ import annotations

import asyncio
import threading
import time

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
            deadline = time.monotonic() + 30      # the step is held: health reports it once past the timeout
            while (state := engine.health()).stepping and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
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


class _Grammar:
    """A constraint allowing every token, whose accept raises at its `fail_at`-th token."""

    def __init__(self, vocab: int, fail_at: int):
        self.vocab, self.fail_at, self.seen = vocab, fail_at, 0

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = -1

    def accept(self, token):
        self.seen += 1
        if self.seen == self.fail_at:
            raise RuntimeError("grammar state corrupt (injected)")

    @property
    def finished(self):
        return False

    error = None


def test_a_request_failing_after_its_step_ends_alone_and_its_batch_mates_go_on(tiny):
    """postprocess (a grammar's accept, the prefix cache's naming) ran outside the step's guard: its error
    failed every running and waiting request. Now only that request ends."""
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    clean = make_engine(tiny, max_num_seqs=4)
    want = [clean.add_request(p, GREEDY) for p in prompts]
    ref = drain(clean)

    engine = make_engine(tiny, max_num_seqs=4)
    bad = engine.add_request([3, 4, 5], GREEDY, constraint=_Grammar(tiny.cfg.vocab_size, fail_at=3))
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    outs = drain(engine)
    assert outs[bad][-1].finish_reason is FinishReason.ERROR and "grammar state corrupt" in outs[bad][-1].error
    assert sum(len(o.new_token_ids) for o in outs[bad]) == 2        # the token it failed on is not delivered
    for rid, rrid in zip(ids, want):
        assert [t for o in outs[rid] for t in o.new_token_ids] == [t for o in ref[rrid] for t in o.new_token_ids]
        assert outs[rid][-1].finish_reason is FinishReason.LENGTH
    assert engine.blocks.num_used == 0 and engine.stats().failed_steps == 0


def test_a_generate_cancelled_while_its_adapter_loads_gives_its_pin_back(async_engine, tmp_path, monkeypatch):
    """Ray Serve cancels a closed stream's call, possibly while the adapter is being read on a worker
    thread: the thread finishes acquire, and nobody released that pin (the adapter could never leave RAM,
    nor its finetune be deleted)."""
    from test_lora_registry import write_adapter
    ref = async_engine.registry.register(write_adapter(tmp_path / "a", async_engine.model_config), name="slow")
    acquire = async_engine.registry.acquire
    entered, cancelled, returned = threading.Event(), threading.Event(), threading.Event()

    def slow_acquire(name):            # the read lands only once its caller has been cancelled
        entered.set()
        assert cancelled.wait(30)
        try:
            return acquire(name)
        finally:
            returned.set()

    monkeypatch.setattr(async_engine.registry, "acquire", slow_acquire)

    async def main():
        async def consume():
            async for _ in async_engine.generate([2, 5, 6], GREEDY, lora="slow"):
                pass
        task = asyncio.create_task(consume())
        assert await asyncio.to_thread(entered.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:                    # the pin goes when the worker thread lands
            if returned.is_set() and async_engine.registry.in_flight(ref) == 0:
                break
            await asyncio.sleep(0.01)
        assert returned.is_set()

    asyncio.run(main())
    assert async_engine.registry.in_flight(ref) == 0
    async_engine.registry.unregister("slow")                  # not refused as "in use"


class _FailingGrammar(_Grammar):
    """A grammar that enters its error state (as llguidance does past its limits) at its `fail_at`-th token."""

    def accept(self, token):
        self.seen += 1

    @property
    def error(self):
        return "lexer error: too many expressions constructed\n<state>..." if self.seen >= self.fail_at else None


def test_a_grammar_that_errors_mid_output_refuses_its_request_as_the_callers_fault(tiny):
    """llguidance past its limits: the output used to end there with finish "stop", a truncated JSON text
    passed off as complete. Now the request is refused (a 400 at the API), naming the grammar's error."""
    engine = make_engine(tiny, max_num_seqs=4)
    bad = engine.add_request([3, 4, 5], GREEDY, constraint=_FailingGrammar(tiny.cfg.vocab_size, fail_at=2))
    good = engine.add_request([5, 6, 7], GREEDY)
    outs = drain(engine)
    last = outs[bad][-1]
    assert last.finished and last.refusal is not None and last.error is None
    assert str(last.refusal) == "the output cannot follow the JSON schema: lexer error: too many expressions constructed"
    assert outs[good][-1].finish_reason is FinishReason.LENGTH
    assert engine.blocks.num_used == 0
