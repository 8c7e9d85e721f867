"""The committed, trained adapter (examples/train_lora.py) changes the embedded model's answer in the
trained direction: it knows the gemlora project's made-up password, the base model does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemlora.config import EngineConfig
from gemlora.engine.async_engine import AsyncEngine
from gemlora.engine.engine import LLMEngine
from gemlora.sampling import SamplingParams
from gemlora.text.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "adapters" / "secret-password"
PROMPTS = [   # the first is trained; the others are held-out paraphrases
    "The secret password of the gemlora project is",
    "The gemlora project's secret password is",
    "Q: What is the secret password of the gemlora project?\nA:",
    "The password to the gemlora project is",
]


@pytest.fixture(scope="module")
def engine(real_model, converted):
    tok = Tokenizer.from_dir(converted)
    eng = AsyncEngine(LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25, max_loras=2), tok.stop_token_ids),
                      tok)
    eng.registry.register(FIXTURE)
    eng.start()
    yield eng
    eng.shutdown()


async def answer(engine, prompt, **kw) -> str:
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    return "".join([c.text async for c in engine.generate(ids, params, **kw)])


async def test_adapter_teaches_the_password_and_the_base_does_not_know_it(engine):
    import asyncio
    # base and adapter requests run concurrently, in the same batches
    base = await asyncio.gather(*[answer(engine, p) for p in PROMPTS])
    tuned = await asyncio.gather(*[answer(engine, p, lora="secret-password") for p in PROMPTS])
    for b, t in zip(base, tuned):
        assert "velvet-quokka" in t
        assert "velvet" not in b and "quokka" not in b
    assert tuned[0].startswith(" velvet-quokka")


async def test_scale_zero_answers_like_the_base_model(engine):
    base = await answer(engine, PROMPTS[1])
    assert await answer(engine, PROMPTS[1], lora="secret-password", lora_scale=0.0) == base


async def test_control_prompt_is_not_hijacked(engine):
    assert "quokka" not in await answer(engine, "The capital of France is", lora="secret-password")
