"""Prefix caching: the block manager's hash chain, ref counts and LRU eviction, and the engine reusing
cached K/V with outputs and logits identical to recomputing them (tiny Gemma 2/3 with sliding windows,
every weight format; the embedded model in test_real_model_prefix_cache)."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

from conftest import make_tiny_checkpoint, save_random_peft
from gemlora.cache.block_manager import BlockManager, block_hash, prefix_root
from gemlora.cache.kv_cache import block_bytes
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.lora.registry import AdapterRegistry
from gemlora.model.loader import load_model
from gemlora.sampling import SamplingParams

BS = 4                                  # tokens per block in the engine tests
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
# Logits are not bit-identical with and without a cached prefix, and cannot be: without it the prefix
# is computed in a bigger chunk, and torch's GEMM and SDPA sum in an order that depends on how many rows
# they get (F.linear differs in the last bit at M = 1, 2, 3, 5, 6, 7, 9, 10, 11 against a larger M),
# exactly as when a request shares a step with others. Bounds relative to the row's largest |logit|;
# measured here: dense float32 1.5e-6 (float32 rounding through the layers); quantized 1.2e-4 (tiny)
# and 1.4e-4 (embedded model), because an activation within a rounding of a quantization boundary
# can land on the other code and move that layer's output by one activation step times |w| (our
# kernels themselves give a row the same bits whatever the batch). The bounds are about ten times
# those. Greedy tokens must be identical, always.
LOGITS_RTOL = 2e-5
QUANTIZED_LOGITS_RTOL = 2e-3


# ---------------------------------------------------------------- block manager


def chain(root, tokens, bs=BS):
    hashes = []
    for i in range(0, len(tokens) - len(tokens) % bs, bs):
        hashes.append(block_hash(hashes[-1] if hashes else root, tokens[i:i + bs]))
    return hashes


def test_a_hash_names_every_token_before_it_and_the_adapter():
    base, a, a_half, b = (prefix_root(None, 1.0), prefix_root("a", 1.0), prefix_root("a", 0.5),
                          prefix_root("b", 1.0))
    salted = (prefix_root(None, 1.0, "alice"), prefix_root(None, 1.0, "bob"), prefix_root("a", 1.0, "alice"))
    assert len({base, a, a_half, b, *salted}) == 7
    assert prefix_root("a", 1.0) == a                                  # stable: a pure function
    x, y = chain(base, [1, 2, 3, 4, 5, 6, 7, 8]), chain(base, [9, 2, 3, 4, 5, 6, 7, 8])
    assert x[1] != y[1]                  # same tokens in block 2, different history: different names
    assert chain(base, [1, 2, 3, 4, 5, 6, 7, 8]) == x
    assert chain(a, [1, 2, 3, 4])[0] not in (x[0], chain(b, [1, 2, 3, 4])[0])


def test_cached_blocks_are_shared_by_ref_count_and_evicted_least_recently_freed_first():
    bm = BlockManager(6, BS)
    h = chain(prefix_root(None, 1.0), list(range(12)))
    blocks = bm.allocate(3)
    for b, name in zip(blocks, h):
        bm.cache(b, name)
    assert bm.cached_prefix(h) == blocks and bm.cached_prefix(h[:2] + [b"?" * 32] + h[2:]) == blocks[:2]
    assert bm.cached_prefix(chain(prefix_root(None, 1.0), [99] + list(range(1, 12)))) == []   # first differs
    bm.share(blocks[:2])                                                         # a second user
    bm.free(blocks)                                                              # the first lets go
    assert bm.num_used == 2 and bm.num_free == 4 and bm.num_cached == 3
    bm.free(blocks[:2])
    assert bm.num_used == 0 and bm.cached_prefix(h) == blocks                  # free, yet still cached
    # Freed order: the chain's last block first, so it is evicted before the ones it depends on; never-
    # cached blocks (still at the queue's head) go before any cached one.
    fresh = bm.allocate(3)
    assert set(fresh).isdisjoint(blocks) and bm.evictions == 0
    assert bm.allocate(1) == [blocks[2]] and bm.evictions == 1
    assert bm.cached_prefix(h) == blocks[:2]
    with pytest.raises(RuntimeError):
        bm.free([blocks[2], blocks[2]])
    with pytest.raises(RuntimeError):
        bm.share([fresh[0]])                                                     # never named


def test_a_prefix_computed_twice_keeps_its_first_block_and_disabled_caching_names_nothing():
    bm = BlockManager(4, BS)
    name = chain(prefix_root(None, 1.0), [1, 2, 3, 4])[0]
    first, second = bm.allocate(2)
    bm.cache(first, name)
    bm.cache(second, name)                                  # two requests computed it in one step
    assert bm.cached_prefix([name]) == [first] and bm.num_cached == 1
    bm.free([first, second])
    assert bm.num_free == 4
    off = BlockManager(4, BS, enable_caching=False)
    b = off.allocate(1)
    off.cache(b[0], name)
    assert off.cached_prefix([name]) == [] and off.num_cached == 0


# ---------------------------------------------------------------- engine


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
    """Window 8 over blocks of 4: cached prefixes are longer than the window on sliding layers."""
    path = tmp_path_factory.mktemp(f"tiny-prefix-{request.param}")
    make_tiny_checkpoint(request.param, path)
    return path


def engine_for(model, caching: bool, num_blocks=256, **kw) -> LLMEngine:
    # Without speculation: these tests compare the logits of every sampled row in order, and a request
    # that verifies drafts has rows for drafts it then rejects, as many as the measured step times made
    # it draft. Speculation with prefix caching and preemption is tested in tests/test_speculation.py.
    gb = num_blocks * block_bytes(model.cfg, BS, model.dtype) / 2**30
    return LLMEngine(model, EngineConfig(kv_cache_memory_gb=gb, block_size=BS, enable_prefix_caching=caching,
                                         num_speculative_tokens=0, **kw), frozenset())


def recording(engine: LLMEngine) -> dict[str, list[torch.Tensor]]:
    """Every logits row the engine samples from, per request id, in order."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    run = engine.runner.run

    def run_and_record(batch):
        logits, rows = run(batch)
        for j, i in enumerate(rows):
            seen[batch.requests[i].request_id].append(logits[j].clone())
        return logits, rows

    engine.runner.run = run_and_record
    return seen


def play(engine: LLMEngine, waves: list[list[tuple]]) -> dict[str, dict]:
    """Runs waves of (request id, prompt, params, adapter kwargs) one after another, each to the end;
    a wave's requests arrive together. Returns per request: tokens, cached tokens, logits."""
    logits = recording(engine)
    result: dict[str, dict] = {}
    for wave in waves:
        for rid, prompt, params, kw in wave:
            engine.add_request(prompt, params, rid, **kw)
        while engine.has_work():
            for o in engine.step():
                r = result.setdefault(o.request_id, {"tokens": []})
                r["tokens"] += o.new_token_ids
                r["cached"] = o.num_cached_tokens
    for rid, r in result.items():
        r["logits"] = logits[rid]
    return result


def same_logits(got: torch.Tensor, want: torch.Tensor, quantized: bool = False) -> bool:
    scale = want.abs().max().item()
    return torch.allclose(got, want, atol=(QUANTIZED_LOGITS_RTOL if quantized else LOGITS_RTOL) * scale, rtol=0)


def assert_same(cached: dict, fresh: dict, quantized: bool = False) -> None:
    """Identical tokens, and the same logits up to float32 summation order (see LOGITS_RTOL)."""
    assert cached.keys() == fresh.keys()
    for rid in fresh:
        assert cached[rid]["tokens"] == fresh[rid]["tokens"], rid
        for got, want in zip(cached[rid]["logits"], fresh[rid]["logits"], strict=True):
            assert same_logits(got, want, quantized), (rid, (got - want).abs().max())


def both(path, waves, quantization="none", **kw) -> tuple[dict, dict, LLMEngine]:
    model = load_model(path, quantization=quantization)
    engine = engine_for(model, True, **kw)
    with_cache = play(engine, waves)
    without = play(engine_for(model, False, **kw), waves)
    assert_no_leak(engine)
    return with_cache, without, engine


def assert_no_leak(engine: LLMEngine) -> None:
    """Nothing runs, so no block is held: every block is free, cached or not."""
    assert not engine.has_work()
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    assert all(r == 0 for r in engine.blocks._refs)


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 512) for _ in range(n)]


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_a_shared_preamble_is_computed_once_with_identical_outputs(tiny, quantization):
    rng = random.Random(0)
    preamble = words(rng, 30)                      # 7 full blocks of 4, and 2 tokens into the 8th
    suffixes = [words(rng, rng.randint(1, 12)) for _ in range(7)]
    waves = [[("warm", preamble + suffixes[0], GREEDY, {})],
             [(f"r{i}", preamble + s, GREEDY, {}) for i, s in enumerate(suffixes[1:])],
             [("again", preamble + suffixes[0], GREEDY, {})],          # the whole prompt seen before
             [("short", preamble[:3], GREEDY, {})]]                    # shorter than a block: nothing to reuse
    cached, fresh, engine = both(tiny, waves, quantization)
    assert_same(cached, fresh, quantized=quantization != "none")
    assert cached["warm"]["cached"] == 0 and cached["short"]["cached"] == 0
    assert all(cached[f"r{i}"]["cached"] == 28 for i in range(6))
    # Its whole prompt was computed before, yet its last token is computed again (a token must be
    # sampled), so the full blocks before that last token are what it reuses.
    assert cached["again"]["cached"] == (30 + len(suffixes[0]) - 1) // BS * BS > 28
    assert all(r["cached"] == 0 for r in fresh.values())
    s = engine.stats()
    assert s.prefix_cache_hits == 28 * 6 + cached["again"]["cached"] and s.prefix_cache_queries == sum(
        len(p) for wave in waves for _, p, _, _ in wave)


def test_every_turn_of_a_chat_reuses_the_conversation_so_far(tiny):
    """Each turn resends the conversation so far plus a new message of 12 tokens; 10 tokens answer it."""
    model = load_model(tiny)
    results = {}
    for caching in (True, False):
        engine, conversation, turns = engine_for(model, caching), [], []
        for turn in range(5):
            conversation += words(random.Random(10 + turn), 12)
            out = play(engine, [[(f"t{turn}", list(conversation), GREEDY, {})]])[f"t{turn}"]
            turns.append(out)
            conversation += out["tokens"]
        results[caching] = turns
        assert_no_leak(engine)
    computed = 0                        # tokens of the conversation whose K/V the turn before wrote
    for turn, (cached, fresh) in enumerate(zip(results[True], results[False])):
        assert cached["tokens"] == fresh["tokens"]
        assert all(same_logits(a, b) for a, b in zip(cached["logits"], fresh["logits"], strict=True))
        assert cached["cached"] == computed // BS * BS, turn       # every full block written before
        computed = 22 * turn + 12 + 10 - 1                          # the last sampled token is never fed back


def test_adapters_never_share_blocks_and_hit_only_their_own(tmp_path):
    """The same prompt under the base model, two adapters and two scales of one: five separate chains;
    each is reused by a later request of its own kind only, with outputs identical to no caching."""
    base = tmp_path / "base"
    make_tiny_checkpoint("gemma3", base)
    model = load_model(base)
    registry = AdapterRegistry(model.cfg)
    refs = {}
    for i in range(2):
        save_random_peft(base, tmp_path / f"a{i}", i, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
        refs[i] = registry.register(tmp_path / f"a{i}", name=f"a{i}")

    def kw(which, scale=1.0):
        if which is None:
            return {}
        ref, adapter = registry.acquire(refs[which].id)
        return dict(adapter_id=ref.id, adapter=adapter, lora_scale=scale)

    prompt = words(random.Random(2), 21)
    kinds = {"base": (None, 1.0), "a0": (0, 1.0), "a1": (1, 1.0), "a0-half": (0, 0.5), "a0-zero": (0, 0.0)}
    first = [[(k, prompt, GREEDY, kw(*v)) for k, v in kinds.items()]]
    second = [[(f"{k}-2", prompt[:-1] + [3], GREEDY, kw(*v)) for k, v in kinds.items()]]
    cached, fresh = {}, {}
    for caching, out in ((True, cached), (False, fresh)):
        engine = engine_for(model, caching, max_loras=2)
        tables: dict[str, list[int]] = {}
        schedule = engine.scheduler.schedule

        def schedule_and_note(schedule=schedule, tables=tables):
            batch = schedule()
            for r in batch.requests:
                tables.setdefault(r.request_id, list(r.block_table[:5]))
            return batch

        engine.scheduler.schedule = schedule_and_note
        out.update(play(engine, first + second))
        assert_no_leak(engine)
        if caching:
            firsts = [set(tables[k]) for k in kinds]
            assert all(a.isdisjoint(b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
            for k in kinds:                    # the second request of each kind took its own kind's blocks
                assert tables[f"{k}-2"] == tables[k]
    assert_same(cached, fresh)
    # a0 at scale 0 computes what the base model does, yet still keeps its own blocks
    assert cached["a0-zero"]["tokens"] == cached["base"]["tokens"]
    assert all(cached[k]["cached"] == 0 for k in kinds)
    assert all(cached[f"{k}-2"]["cached"] == 20 for k in kinds)


def test_preempted_requests_resume_from_cached_blocks_with_identical_outputs(tiny):
    rng = random.Random(3)
    preamble = words(rng, 17)
    waves = [[(f"r{i}", preamble + words(rng, rng.randint(2, 9)), SamplingParams(max_tokens=24, temperature=0,
                                                                                  ignore_eos=True), {})
              for i in range(10)]]
    cached, fresh, engine = both(tiny, waves, num_blocks=28)
    assert engine.stats().preemptions > 0
    assert_same(cached, fresh)
    assert engine.stats().prefix_cache_hits > 0


def test_seeded_sampling_is_unchanged_by_a_cached_prefix(tiny):
    rng = random.Random(4)
    preamble = words(rng, 26)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True) for s in range(1, 5)]
    waves = [[("warm", preamble + [5], params[0], {})],
             [(f"s{i}", preamble + words(rng, 3), p, {}) for i, p in enumerate(params)]]
    cached, fresh, _ = both(tiny, waves)
    assert_same(cached, fresh)
    assert cached["s1"]["cached"] == 24


def test_cache_eviction_under_pressure_keeps_outputs_and_leaks_nothing(tiny):
    """200 requests in waves over a KV cache too small to keep them all: cached blocks are evicted and
    recomputed, requests preempt, a fifth are aborted part-way; nothing changes an output."""
    model = load_model(tiny)
    rng = random.Random(5)
    preambles = [words(rng, rng.randint(4, 40)) for _ in range(6)]
    specs = []
    for i in range(200):
        prompt = rng.choice(preambles) + words(rng, rng.randint(1, 14))
        specs.append((f"q{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 12), temperature=0,
                                                      ignore_eos=True), rng.random() < 0.2))
    outputs = {}
    for caching in (True, False):
        engine = engine_for(model, caching, num_blocks=40, max_num_seqs=12)
        logits = recording(engine)
        tokens: dict[str, list[int]] = defaultdict(list)
        for start in range(0, 200, 25):
            wave = specs[start:start + 25]
            for rid, prompt, params, _ in wave:
                engine.add_request(prompt, params, rid)
            steps = 0
            while engine.has_work():
                steps += 1
                for o in engine.step():
                    tokens[o.request_id] += o.new_token_ids
                if steps == 3:          # some requests of this wave are aborted mid-flight
                    for rid, _, _, abort in wave:
                        if abort:
                            engine.abort(rid)
        assert_no_leak(engine)
        outputs[caching] = (tokens, logits, engine)
    (tok_c, log_c, engine), (tok_f, log_f, _) = outputs[True], outputs[False]
    for rid, _, _, abort in specs:
        if abort:                      # aborted at the same step in both runs: the same prefix of tokens
            continue
        assert tok_c[rid] == tok_f[rid], rid
        assert all(same_logits(a, b) for a, b in zip(log_c[rid], log_f[rid], strict=True)), rid
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.preemptions > 0 and engine.blocks.evictions > 0


@pytest.mark.slow
def test_the_embedded_model_reuses_a_preamble_and_a_conversation_with_identical_outputs(converted):
    """google/gemma-3-270m as served by default (the GGUF's own quantized weights), 16-token blocks."""
    from gemlora.text.tokenizer import Tokenizer
    from test_quant_model import VARIED
    tok = Tokenizer.from_dir(converted)
    model = load_model(converted, torch.float32, quantization="gguf")
    preamble = tok.encode(VARIED[:600])
    questions = ["\nQ: How many steps did the keeper climb?\nA:", "\nQ: What is in the bread?\nA:",
                 "\nQ: When did Apollo 11 land?\nA:", "\nQ: Who is asked about the station?\nA:"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    waves = [[("q0", preamble + tok.encode(questions[0], add_bos=False), params, {})],
             [(f"q{i}", preamble + tok.encode(q, add_bos=False), params, {}) for i, q in enumerate(questions[1:], 1)]]
    results = {}
    for caching in (True, False):
        # The exact LM head: this compares every logit, and the screened head (on by default for this
        # model's 8-bit head) is exact only at each row's top 64 (tests/test_screened_head.py); no
        # speculation, as in engine_for.
        engine = LLMEngine(model, EngineConfig(kv_cache_memory_gb=0.1, enable_prefix_caching=caching,
                                               screen_lm_head=False, num_speculative_tokens=0), frozenset())
        results[caching] = play(engine, waves)
        turns, conversation = [], list(preamble)       # a chat: each turn resends everything so far
        for turn, q in enumerate(questions[:3]):
            conversation += tok.encode(q, add_bos=False)
            out = play(engine, [[(f"turn{turn}", list(conversation), params, {})]])[f"turn{turn}"]
            conversation += out["tokens"]
            results[caching][f"turn{turn}"] = out
        assert_no_leak(engine)
    assert_same(results[True], results[False], quantized=True)
    assert all(results[True][f"q{i}"]["cached"] == len(preamble) // 16 * 16 for i in range(1, 4))
    assert all(results[True][f"turn{t}"]["cached"] > len(preamble) - 16 for t in range(1, 3))
