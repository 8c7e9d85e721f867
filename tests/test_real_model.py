"""The embedded google/gemma-3-270m against transformers loading the same GGUF: greedy continuations
of 32 tokens must be identical, for a request alone and inside a batch of 16 different requests."""

from __future__ import annotations

import pytest
import torch

from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.sampling import SamplingParams
from gemlora.text.chat import format_prompt
from gemlora.text.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

TEXTS = [
    ("The capital of France is", True), ("Once upon a time", True), ("def fibonacci(n):", True),
    ("Why is the sky blue?", False), ("List three fruits.", False), ("The quick brown fox", True),
    ("In 1492, Columbus", True), ("Water boils at", True), ("Explain photosynthesis simply.", False),
    ("import numpy as np\n", True), ("The best way to learn a language is", True), ("Translate 'hello' to French.", False),
    ("My favourite season is", True), ("Write a haiku about rain.", False), ("The largest planet is", True),
    ("To be or not to be,", True),
]
NEW = 32


@pytest.fixture(scope="module")
def prompts(converted):
    tok = Tokenizer.from_dir(converted)
    return [tok.encode(format_prompt(t, raw=raw)) for t, raw in TEXTS]


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW,
                                    do_sample=False, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    return [got[i] for i in ids]


def test_single_requests_match_transformers(real_model, prompts, reference):
    engine = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), frozenset())
    for ids, ref in zip(prompts[:4], reference[:4]):
        assert greedy(engine, [ids]) == [ref]


def test_batch_of_sixteen_matches_transformers(real_model, prompts, reference):
    engine = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), frozenset())
    assert greedy(engine, prompts) == reference
