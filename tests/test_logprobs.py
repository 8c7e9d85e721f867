"""logprobs: the sampler's against a plain-torch reference of the distribution each token is drawn
from, the engine's against teacher-forced logits of the real model, and both OpenAI routes."""

from __future__ import annotations

import dataclasses
import json
import math

import httpx
import pytest
import torch

from conftest import start_uvicorn
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.engine.sampler import SamplingRow, sample
from gemlora.sampling import InvalidRequestError, SamplingParams
from gemlora.text.tokenizer import Tokenizer


# ---- the sampler ----------------------------------------------------------------------------------

def reference_log_distribution(logits: torch.Tensor, row: SamplingRow, allowed: torch.Tensor | None) -> torch.Tensor:
    """The log-probabilities a row's token is drawn from, written out plainly (float64, full vocabulary)."""
    p, x = row.params, logits.double().clone()
    if allowed is not None:
        x[~allowed] = -math.inf
    for t in set(row.prompt_ids) | set(row.output_ids):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(row.output_ids):
        x[t] -= p.frequency_penalty * row.output_ids.count(t) + p.presence_penalty
    if p.greedy:
        return torch.log_softmax(x, -1)
    x = x / p.temperature
    if p.top_k is not None:      # top-p then counts mass within the top-k, renormalised
        x = x.masked_fill(~_top(x, p.top_k), -math.inf)
    probs = torch.softmax(x, -1)
    keep = torch.zeros_like(x, dtype=torch.bool)
    mass = 0.0
    for rank, t in enumerate(torch.argsort(x, descending=True, stable=True).tolist()):
        if probs[t] == 0 or (rank > 0 and mass >= p.top_p):
            break
        keep[t] = True
        mass += probs[t].item()
    kept = probs.masked_fill(~keep, 0)
    return torch.log(kept / kept.sum())


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[torch.argsort(x, descending=True, stable=True)[:k]] = True
    return keep


CASES = [SamplingParams(temperature=0, logprobs=5),
         SamplingParams(temperature=0.7, seed=1, logprobs=3),
         SamplingParams(temperature=1.3, top_k=8, seed=2, logprobs=20),
         SamplingParams(temperature=0.9, top_p=0.6, seed=3, logprobs=4),
         SamplingParams(temperature=1.0, top_k=20, top_p=0.8, seed=4, logprobs=0),
         SamplingParams(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4,
                        seed=5, logprobs=6),
         SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=2),
         SamplingParams(temperature=1.0, top_k=1, seed=6, logprobs=3),    # alternatives outside top-k: -inf
         SamplingParams(temperature=0.5, seed=7)]                        # no logprobs asked


@pytest.mark.parametrize("masked", [False, True])
def test_each_logprob_is_the_log_of_the_distribution_its_token_was_drawn_from(masked):
    g = torch.Generator().manual_seed(0)
    vocab = 300
    logits = torch.randn(len(CASES), vocab, generator=g) * 3
    rows = [SamplingRow(p, torch.Generator().manual_seed(p.seed or 0), [1, 2, 3, 50], [7, 7, 9, 50])
            for p in CASES]
    allowed = torch.rand(len(CASES), vocab, generator=g) < 0.5 if masked else None
    masks = None
    if masked:
        words = torch.zeros(len(CASES), (vocab + 31) // 32, dtype=torch.int64)
        for i in range(len(CASES)):
            for t in allowed[i].nonzero()[:, 0].tolist():
                words[i, t // 32] |= 1 << (t % 32)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        masks = (list(range(len(CASES))), words)
    tokens, logprobs = sample(logits.clone(), rows, masks)
    for i, (p, t, lp) in enumerate(zip(CASES, tokens, logprobs)):
        if p.logprobs is None:
            assert lp is None
            continue
        want = reference_log_distribution(logits[i], rows[i], None if allowed is None else allowed[i])
        assert lp.token == t
        assert math.isfinite(lp.logprob) and lp.logprob == pytest.approx(want[t].item(), abs=1e-4)
        assert len(lp.top) == p.logprobs
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)                        # most likely first
        assert len({tok for tok, _ in lp.top}) == len(lp.top)
        for tok, v in lp.top:
            assert v == pytest.approx(want[tok].item(), abs=1e-4) or (v == -math.inf and want[tok] == -math.inf)
        if lp.top:
            assert lp.top[0][1] == pytest.approx(want.max().item(), abs=1e-4)   # the best is first
            assert lp.logprob <= lp.top[0][1] + 1e-6
        if p.greedy:
            assert lp.logprob == pytest.approx(want.max().item(), abs=1e-6)


def test_asking_for_logprobs_changes_no_token():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(CASES), 500, generator=g)
    plain = [dataclasses.replace(p, logprobs=None) for p in CASES]

    def draw(params):
        rows = [SamplingRow(p, torch.Generator().manual_seed(p.seed or 0), [1], [2]) for p in params]
        return sample(logits.clone(), rows)[0]

    assert draw(CASES) == draw(plain)


def test_logprobs_range_is_checked():
    for bad in (-1, 21, True, 2.5):
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(logprobs=bad)
        assert err.value.field == "logprobs"


# ---- the engine against teacher-forced logits -----------------------------------------------------

@pytest.mark.slow
def test_engine_logprobs_equal_teacher_forced_log_softmax(real_model, converted):
    from test_quant_model import all_logits
    tok = Tokenizer.from_dir(converted)
    engine = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), tok.stop_token_ids)
    prompt = tok.encode("The three primary colours are")
    rid = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=4))
    other = engine.add_request(tok.encode("Once upon a time"), SamplingParams(max_tokens=12, temperature=0.8, seed=3))
    got, ids = [], []
    while engine.has_work():
        for out in engine.step():
            if out.request_id == rid:
                got += out.logprobs
                ids += out.new_token_ids
            else:
                assert out.logprobs is None           # a row that did not ask gets none
    assert [lp.token for lp in got] == ids and len(ids) == 12
    want = torch.log_softmax(all_logits(real_model, prompt + ids[:-1])[len(prompt) - 1:].double(), -1)
    for pos, lp in enumerate(got):
        # decode steps read the paged cache through the decode kernels, the reference is one prefill:
        # float32 rounding between the two paths moves logits by ~1e-4, so 2e-3 on a log-probability
        assert lp.logprob == pytest.approx(want[pos, lp.token].item(), abs=2e-3)
        top = want[pos].topk(4)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=2e-3)
    assert engine.stats().kv_blocks_used == 0 and other


# ---- the OpenAI routes ----------------------------------------------------------------------------

MODEL = "@cf/google/gemma-7b-it-lora"
AUTH = {"authorization": "Bearer tok"}


@pytest.fixture(scope="module")
def server(real_model, converted, tmp_path_factory):
    from gemlora.api.app import ServerSettings, create_app
    from gemlora.api.auth import Auth
    from gemlora.engine.async_engine import AsyncEngine
    tok = Tokenizer.from_dir(converted)
    engine = AsyncEngine(LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), tok.stop_token_ids), tok).start()
    settings = ServerSettings(model_names=(MODEL,), data_dir=tmp_path_factory.mktemp("logprobs-data"))
    base, stop = start_uvicorn(create_app(engine, settings, Auth({"tok": "acct"})))
    yield base
    stop()
    engine.shutdown()


def _events(base, path, body):
    frames = []
    with httpx.stream("POST", f"{base}{path}", headers=AUTH, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                frames.append(json.loads(line[6:]))
    return frames


@pytest.mark.slow
def test_chat_logprobs_streamed_and_not(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 16,
            "temperature": 0, "logprobs": True, "top_logprobs": 3}
    out = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, json=body, timeout=60).json()
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert content and len(content) <= out["usage"]["completion_tokens"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == choice["message"]["content"]
    for c in content:
        assert c["logprob"] <= 0 and len(c["top_logprobs"]) == 3
        tops = [t["logprob"] for t in c["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert c["logprob"] == pytest.approx(tops[0], abs=1e-6)       # greedy: the chosen token is the best
        assert c["top_logprobs"][0]["token"] == c["token"]
    frames = _events(server, "/v1/chat/completions", body)
    streamed = [c for f in frames for ch in f["choices"] for c in (ch.get("logprobs") or {}).get("content", [])]
    # The same tokens, in chunks. Their logprobs agree within float32 rounding, not bit for bit: the server
    # speculates (gemlora.engine.speculation), the two runs of the request may draft differently (the
    # drafts follow the measured step times), and this dense float32 model's GEMM sums in an order that
    # depends on how many rows a step has (tests/test_prefix_cache.py; tests/test_speculation.py shows the
    # quantized kernels' logprobs bit for bit equal with and without speculation).
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    for s, c in zip(streamed, content):
        assert [t["token"] for t in s["top_logprobs"]] == [t["token"] for t in c["top_logprobs"]]
        assert s["logprob"] == pytest.approx(c["logprob"], abs=1e-4)
        assert [t["logprob"] for t in s["top_logprobs"]] == pytest.approx([t["logprob"] for t in c["top_logprobs"]],
                                                                          abs=1e-4)
    text = "".join(ch["delta"].get("content", "") for f in frames for ch in f["choices"])
    assert text == choice["message"]["content"]
    plain = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={**body, "logprobs": False, "top_logprobs": None}).json()
    assert "logprobs" not in plain["choices"][0] or plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"] == choice["message"]       # asking changes no token


@pytest.mark.slow
def test_completions_logprobs_streamed_and_not(server):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.8, "seed": 11,
            "logprobs": 2, "ignore_eos": True}
    out = httpx.post(f"{server}/v1/completions", headers=AUTH, json=body, timeout=60).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) <= 2 and list(top.values()) == sorted(top.values(), reverse=True)
    frames = _events(server, "/v1/completions", body)
    streamed = {k: [x for f in frames for ch in f["choices"] if ch["logprobs"] for x in ch["logprobs"][k]]
                for k in lp}
    # Tokens and offsets bit for bit; logprobs within float32 rounding, for the reason the chat test above
    # gives (the two runs may draft differently, and this dense model's GEMM sums depend on the step's rows).
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-4)
    for s, c in zip(streamed["top_logprobs"], lp["top_logprobs"]):
        assert list(s) == list(c) and list(s.values()) == pytest.approx(list(c.values()), abs=1e-4)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2, "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprobs_options_are_a_400_naming_them(path, body, param):
    from gemlora.api.errors import ApiError
    from gemlora.api.openai_schemas import parse_chat_completion, parse_completion
    parse = parse_chat_completion if "chat" in path else parse_completion
    with pytest.raises(ApiError) as err:
        parse(json.dumps({"model": MODEL, **body}).encode())
    assert err.value.status == 400 and err.value.param == param, err.value


def test_a_draw_of_exactly_zero_never_picks_a_zero_probability_token(monkeypatch):
    """torch.rand can return 0.0: searchsorted(side=left) then picked index 0 even at probability 0 (token 0
    is <pad> in Gemma, and under a grammar's mask an error state)."""
    import torch

    from gemlora.engine import sampler
    from gemlora.engine.sampler import SamplingRow, sample
    from gemlora.sampling import SamplingParams
    logits = torch.full((1, 8), float("-inf"))
    logits[0, 3], logits[0, 5] = 0.0, 1.0
    monkeypatch.setattr(sampler.torch, "rand", lambda *a, **k: torch.tensor(0.0))
    row = SamplingRow(SamplingParams(temperature=1.0), torch.Generator().manual_seed(0), [1], [])
    tokens, _ = sample(logits.clone(), [row])
    assert tokens == [3]                                        # the first token with any probability
