"""Prompt-lookup speculative decoding: the n-gram index against a brute-force search, the speculator's
choice of drafts, and the engine giving the same tokens (greedy, seeded sampling, penalties, logprobs,
stops, budgets, adapters, prefix caching, preemption) with speculation on as with it off."""

from __future__ import annotations

import random

import pytest

from conftest import make_tiny_checkpoint, save_random_peft
from gemlora.cache.kv_cache import block_bytes
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.engine.prompt_lookup import PromptLookup
from gemlora.engine.speculation import PRIOR, STRETCH, DraftState, StepCost, Speculator, kept_tokens
from gemlora.lora.registry import AdapterRegistry
from gemlora.model.loader import load_model
from gemlora.request import FinishReason, Request
from gemlora.sampling import SamplingParams

# ---------------------------------------------------------------- the n-gram index


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition: the longest suffix n-gram (max_n down to min_n) that occurs earlier, ending
    before the last token; the k tokens after its latest such occurrence."""
    end = len(tokens)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        suffix = tokens[end - n:]
        for e in range(end - 1, n - 1, -1):
            if tokens[e - n:e] == suffix:
                return tokens[e:e + k]
    return []


@pytest.mark.parametrize("min_n,max_n", [(1, 1), (2, 4), (3, 3), (1, 5)])
def test_lookup_matches_a_brute_force_search_as_the_sequence_grows(min_n, max_n):
    rng = random.Random(min_n * 10 + max_n)
    for trial in range(20):
        vocab = rng.choice([3, 5, 20])            # small vocabularies repeat n-grams often
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
        output: list[int] = []
        lookup = PromptLookup(min_n, max_n)
        for _ in range(40):
            lookup.extend(prompt, output)
            k = rng.randrange(0, 6)
            assert lookup.propose(k) == brute_force(prompt + output, k, min_n, max_n)
            output.append(rng.randrange(vocab))


def test_lookup_follows_a_copied_passage():
    passage = list(range(100, 140))
    lookup = PromptLookup(2, 4)
    prompt = [1, 2] + passage + [7, 8]
    lookup.extend(prompt, passage[:3])
    assert lookup.propose(5) == passage[3:8]
    lookup.extend(prompt, passage[:3] + [999])        # the copy diverged: nothing ends with (x, 999)
    assert lookup.propose(5) == []
    with pytest.raises(ValueError):
        PromptLookup(3, 2)


def test_kept_tokens_stop_at_the_first_difference():
    assert kept_tokens([5], []) == [5]
    assert kept_tokens([1, 2, 3, 9], [1, 2, 3]) == [1, 2, 3, 9]     # all kept, plus the bonus token
    assert kept_tokens([1, 7, 3, 9], [1, 2, 3]) == [1, 7]           # 2 rejected: 7 is drawn in its place
    assert kept_tokens([4, 2, 3, 9], [1, 2, 3]) == [4]


# ---------------------------------------------------------------- the speculator's choice


def decoding_request(rid: str, tokens: list[int], max_tokens: int = 100) -> Request:
    req = Request(rid, tokens[:1], SamplingParams(max_tokens=max_tokens, temperature=0), frozenset(), 10_000)
    req.output_ids = tokens[1:]
    return req


def test_step_cost_reads_the_slope_of_step_time_on_rows():
    cost = StepCost()
    assert cost.ratio() == pytest.approx(0.3)         # nothing measured: the default
    for i in range(60):
        rows = 1 + i % 9
        cost.observe(rows, 0.010 + 0.002 * rows)
    assert cost.ratio() == pytest.approx(0.2)
    flat = StepCost()
    for _ in range(60):
        flat.observe(8, 0.02)                        # no spread of rows: no slope to read
    assert flat.ratio() == pytest.approx(0.3)


def test_drafts_grow_with_the_acceptance_rate_and_stop_at_the_request_end():
    copy = list(range(10, 40))
    spec = Speculator(max_draft=8)
    good = decoding_request("good", [1] + copy + [2] + copy[:5])
    drafts = spec.drafts([good], rows=1, budget=100)
    first = len(drafts["good"])
    assert drafts["good"] == copy[5:5 + first] and 1 <= first < 8     # the prior alone: a short draft
    for _ in range(10):
        spec.record(good, 4, 4)
    assert len(spec.drafts([good], rows=1, budget=100)["good"]) == 8  # a good record: the longest
    assert len(spec.drafts([good], rows=1, budget=3)["good"]) == 3    # ... within the step's budget
    ending = decoding_request("ending", [1] + copy + [2] + copy[:5], max_tokens=len(copy) + 9)
    ending.draft_state = DraftState(PromptLookup(2, 4), good.draft_state.alpha)     # the same good record
    assert len(spec.drafts([ending], rows=1, budget=100)["ending"]) == 2   # 3 tokens left: 2 drafts + 1
    bad = decoding_request("bad", [1] + copy + [2] + copy[:5])
    spec.drafts([bad], rows=1, budget=100)
    for _ in range(6):
        spec.record(bad, 2, 0)
    assert spec.drafts([bad], rows=1, budget=100) == {}
    alpha = bad.draft_state.alpha
    spec.drafts([bad], rows=1, budget=100)
    assert alpha < bad.draft_state.alpha < PRIOR                      # it drifts back to try again


def test_drafts_stretch_a_shared_step_by_a_bounded_factor():
    """With other requests in the step, drafts may lengthen it by STRETCH at most (predicted: 1 + r rows)."""
    copy = list(range(10, 40))
    spec = Speculator(max_draft=8)
    spec.cost.ratio = lambda: 0.1
    reqs = [decoding_request(f"r{i}", [1] + copy + [2] + copy[:5]) for i in range(2)]
    spec.drafts(reqs, rows=2, budget=100)
    for req in reqs:
        for _ in range(10):
            spec.record(req, 4, 4)             # drafts kept every time: only the bound holds them back
    drafts = spec.drafts(reqs, rows=2, budget=100)
    added = sum(map(len, drafts.values()))
    assert (1 + 0.1 * (2 + added)) <= STRETCH * (1 + 0.1 * 2) < (1 + 0.1 * (2 + added + 1))
    assert len(spec.drafts(reqs[:1], rows=1, budget=100)["r0"]) == 8       # alone, it holds back no one


def test_a_large_batch_drafts_nothing():
    copy = list(range(10, 40))
    spec = Speculator(max_draft=8)
    reqs = [decoding_request(f"r{i}", [1] + copy + [2] + copy[:5]) for i in range(32)]
    assert spec.drafts(reqs[:1], rows=1, budget=100)
    assert spec.drafts(reqs, rows=32, budget=100) == {}


# ---------------------------------------------------------------- the engine, on and off

BS = 4


@pytest.fixture(scope="module", params=["none", "int8"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-spec")
    make_tiny_checkpoint("gemma3", path)
    return load_model(path, quantization=request.param)


def engine_for(model, spec: bool, num_blocks: int = 512, **kw) -> LLMEngine:
    gb = num_blocks * block_bytes(model.cfg, BS, model.dtype) / 2**30
    engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=gb, block_size=BS,
                                           num_speculative_tokens=8 if spec else 0, **kw), frozenset({3}))
    # What drafts cost is not under test here: rows priced low make every batch draft whenever it can.
    engine.speculator.cost.ratio = lambda: 0.02
    return engine


def generate(engine: LLMEngine, jobs: list[tuple[list[int], SamplingParams, dict]]):
    ids = [engine.add_request(p, params, **kw) for p, params, kw in jobs]
    got = {i: ([], [], None) for i in ids}
    while engine.has_work():
        for o in engine.step():
            toks, lps, _ = got[o.request_id]
            toks += o.new_token_ids
            lps += o.logprobs or []
            got[o.request_id] = (toks, lps, o.finish_reason)
    return [got[i] for i in ids]


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase, so that the lookup finds drafts from the first step."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(10, 500) for _ in range(rng.randrange(4, 9))]
        out.append([2] + phrase * rng.randrange(2, 4) + phrase[:2])
    return out


def same_with_and_without(model, jobs, logprob_tol: float | None = None, **kw):
    off = generate(engine_for(model, False, **kw), jobs)
    engine = engine_for(model, True, **kw)
    on = generate(engine, jobs)
    for (t_off, lp_off, r_off), (t_on, lp_on, r_on) in zip(off, on):
        assert t_on == t_off and r_on == r_off
        assert [lp.token for lp in lp_on] == [lp.token for lp in lp_off]
        for a, b in zip(lp_on, lp_off):
            if logprob_tol is None:
                assert a == b
            else:
                assert a.logprob == pytest.approx(b.logprob, abs=logprob_tol)
    return engine


def drafted(engines: list[LLMEngine]) -> None:
    """The test exercised speculation: drafts were verified, and some kept, and some rejected."""
    drafts = sum(e.stats().spec_draft_tokens for e in engines)
    kept = sum(e.stats().spec_accepted_tokens for e in engines)
    assert 0 < kept < drafts, (kept, drafts)


def logprob_tolerance(model) -> float | None:
    # The quantized kernels give a row the same bits whatever the batch, so verify rows equal decode rows
    # exactly; torch's dense GEMM sums in an order that depends on the rows it gets (tests/test_prefix_cache.py),
    # so a dense model's logprobs agree within float32 rounding through the layers, and its tokens exactly.
    return None if model.lm_head.quantized is not None else 1e-4


def test_greedy_and_seeded_sampling_give_the_same_tokens(tiny):
    prompts = repetitive_prompts(6)
    jobs = [(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2), {}) for p in prompts[:3]]
    # the tiny random model's logits are flat: a low temperature keeps its output repetitive enough to
    # draft, while some draws still differ from the greedy token
    sampled = [(p, SamplingParams(max_tokens=40, temperature=0.02, seed=11 + i, ignore_eos=True, logprobs=1), {})
               for i, p in enumerate(prompts[3:])]
    drafted([same_with_and_without(tiny, [job], logprob_tolerance(tiny)) for job in jobs])   # each alone
    drafted([same_with_and_without(tiny, [job], logprob_tolerance(tiny)) for job in sampled])
    drafted([same_with_and_without(tiny, jobs + sampled, logprob_tolerance(tiny))])           # together


def test_penalties_top_k_and_top_p_see_the_drafts_before_them(tiny):
    prompts = repetitive_prompts(3, seed=1)
    jobs = [(prompts[0], SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3, ignore_eos=True), {}),
            (prompts[1], SamplingParams(max_tokens=30, temperature=0.02, top_k=5, top_p=0.8, seed=3,
                                        frequency_penalty=0.5, presence_penalty=0.2, ignore_eos=True), {}),
            (prompts[2], SamplingParams(max_tokens=30, temperature=0, top_k=1, ignore_eos=True), {})]
    drafted([same_with_and_without(tiny, [job]) for job in jobs])


def test_stop_tokens_and_budgets_end_requests_where_plain_decoding_does(tiny):
    prompts = repetitive_prompts(8, seed=2)
    off = generate(engine_for(tiny, False), [(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), {})
                                             for p in prompts])
    # a stop token the greedy output reaches after a few tokens, so that drafts run past it
    jobs = []
    for p, (toks, _, _) in zip(prompts, off):
        stop = toks[min(6, len(toks) - 1)]
        jobs.append((p, SamplingParams(max_tokens=40, temperature=0, extra_stop_token_ids=(stop,), ignore_eos=True), {}))
        jobs.append((p, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), {}))
    engine = engine_for(tiny, True)
    for job in jobs:
        want = generate(engine_for(tiny, False), [job])
        assert generate(engine, [job]) == want
    assert engine.stats().spec_accepted_tokens > 0


def test_prefix_cache_and_preemption_keep_only_accepted_kv(tiny):
    """Rejected drafts' K/V must never reach a block the prefix cache names, nor survive a preemption:
    a tight KV budget preempts, and a second round of the same prompts hits blocks the first named."""
    prompts = repetitive_prompts(6, seed=3)
    jobs = [(p, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), {}) for p in prompts]
    engine = same_with_and_without(tiny, jobs, num_blocks=64)
    drafted([engine])
    assert engine.stats().preemptions > 0
    again = generate(engine, jobs)
    assert engine.stats().prefix_cache_hits > 0
    assert again == generate(engine_for(tiny, False, num_blocks=64, enable_prefix_caching=False), jobs)


def test_adapters_in_a_mixed_batch(tmp_path):
    make_tiny_checkpoint("gemma3", tmp_path / "base")
    model = load_model(tmp_path / "base", quantization="int8")
    registry = AdapterRegistry(model.cfg)
    refs = []
    for i in range(2):
        save_random_peft(tmp_path / "base", tmp_path / f"a{i}", 40 + i, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj", "down_proj"])
        refs.append(registry.acquire(registry.register(tmp_path / f"a{i}", name=f"a{i}").id))
    prompts = repetitive_prompts(4, seed=4)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    jobs = [(p, params, {} if i == 3 else dict(adapter_id=refs[i % 2][0].id, adapter=refs[i % 2][1]))
            for i, p in enumerate(prompts)]
    drafted([same_with_and_without(model, [job]) for job in jobs])
    drafted([same_with_and_without(model, jobs)])


@pytest.mark.slow
def test_the_embedded_model_copies_an_edit_with_drafts(real_model, converted):
    from gemlora.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(converted)
    text = ('Here is a product record in JSON:\n{"id": 4411, "name": "Stainless steel kettle", "price": 34.5, '
            '"currency": "EUR", "stock": 120, "tags": ["kitchen", "steel", "kettle"]}\n\n'
            'The same record with the stock changed to 80:\n')
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    off = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25, num_speculative_tokens=0), frozenset())
    on = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), frozenset())
    want, got = generate(off, [(tok.encode(text), params, {})]), generate(on, [(tok.encode(text), params, {})])
    assert got == want
    stats = on.stats()
    assert stats.spec_accepted_tokens >= 24 and stats.steps < off.stats().steps / 2


@pytest.mark.slow
async def test_a_stop_string_inside_a_kept_draft_ends_the_output_and_its_count_there(real_model, converted):
    """Drafts copy the record past the stop string in one step; the output and its token count end at
    the token that completed it, as without speculation."""
    from gemlora.engine.async_engine import AsyncEngine
    from gemlora.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(converted)
    ids = tok.encode('Here is a record:\n{"id": 4411, "name": "Stainless steel kettle", "price": 34.5, "currency": '
                     '"EUR", "stock": 120, "tags": ["kitchen", "steel"]}\nThe same record again:\n')
    runs = {}
    for spec in (0, 8):
        engine = AsyncEngine(LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25, num_speculative_tokens=spec),
                                       tok.stop_token_ids), tok)
        engine.start()
        try:
            chunks = [c async for c in engine.generate(ids, SamplingParams(max_tokens=64, temperature=0,
                                                                            stop=('"stock"',)))]
        finally:
            engine.shutdown()
        runs[spec] = chunks, engine.engine.stats()
    (off, _), (on, stats) = runs[0], runs[8]
    assert stats.spec_accepted_tokens > 0 and max(len(c.token_ids) for c in on) > 1
    for chunks in (off, on):
        assert chunks[-1].finish_reason is FinishReason.STOP
        assert chunks[-1].completion_tokens == sum(len(c.token_ids) for c in chunks)
    text = "".join(c.text for c in off)
    assert "".join(c.text for c in on) == text and '"currency": "EUR"' in text and '"stock"' not in text
    assert [t for c in on for t in c.token_ids] == [t for c in off for t in c.token_ids]
