"""AsyncEngine on the embedded model: streamed text, stop strings, and callers that walk away."""

from __future__ import annotations

import asyncio
import time

import pytest

from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine
from gemlora.engine.engine import LLMEngine
from gemlora.request import FinishReason
from gemlora.sampling import InvalidRequestError, SamplingParams
from gemlora.text.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(real_model, converted):
    tok = Tokenizer.from_dir(converted)
    eng = AsyncEngine(LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), tok.stop_token_ids), tok)
    eng.start()
    yield eng
    eng.shutdown()


async def collect(engine, ids, params):
    chunks = [c async for c in engine.generate(ids, params)]
    return "".join(c.text for c in chunks), chunks


async def test_stream_text_equals_decode_of_tokens(engine):
    ids = engine.tokenizer.encode("Once upon a time")
    text, chunks = await collect(engine, ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 24 and chunks[-1].completion_tokens == 24 and chunks[-1].prompt_tokens == len(ids)
    assert chunks[-1].finished and chunks[-1].finish_reason is FinishReason.LENGTH
    assert text == engine.tokenizer.decode(tokens) and "little girl" in text


async def test_stop_string_truncates_and_frees(engine):
    ids = engine.tokenizer.encode("Once upon a time")
    full, _ = await collect(engine, ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    word = "girl"
    assert word in full
    text, chunks = await collect(engine, ids, SamplingParams(max_tokens=24, temperature=0, stop=(word,)))
    assert text == full[:full.index(word)] and chunks[-1].finish_reason is FinishReason.STOP
    deadline = time.monotonic() + 30          # the abort reaches the engine thread at its next step
    while engine.engine.blocks.num_used and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.engine.blocks.num_used == 0


async def test_cancelled_callers_free_their_blocks_and_others_finish(engine):
    ids = engine.tokenizer.encode("The quick brown fox")
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=7, ignore_eos=True)

    async def walk_away():
        async for chunk in engine.generate(ids, params):
            if chunk.completion_tokens >= 3:
                break   # leaving the loop closes the generator: the request is aborted

    results = await asyncio.gather(*[walk_away() for _ in range(4)], collect(engine, ids, params))
    assert len([t for c in results[-1][1] for t in c.token_ids]) == 40
    for _ in range(50):
        if engine.engine.blocks.num_used == 0 and not engine.engine.has_work():
            break
        await asyncio.sleep(0.05)
    assert engine.engine.blocks.num_used == 0 and not engine.engine.has_work()


async def test_bad_input_raises_before_running(engine):
    with pytest.raises(InvalidRequestError):
        await collect(engine, [], SamplingParams())
    text, _ = await collect(engine, engine.tokenizer.encode("Hello"), SamplingParams(max_tokens=3, temperature=0))
    assert text
