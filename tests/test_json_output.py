"""JSON mode and JSON-schema output: the token-mask kernel against its reference, the engine's grammar
rows in mixed batches (every output valid against its schema, free rows unchanged), and both APIs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch

from conftest import start_uvicorn
from test_quant_kernels import ISAS
from gemlora.config import EngineConfig
from gemlora.engine.engine import LLMEngine
from gemlora.kernels.token_mask import apply_token_bitmask, reference_apply_token_bitmask
from gemlora.lora.adapter import load_adapter
from gemlora.sampling import SamplingParams
from gemlora.structured.json_grammars import JsonGrammars
from gemlora.structured.output_format import OutputFormat, OutputFormatError, from_guided_json, from_response_format
from gemlora.text.tokenizer import Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "adapters" / "secret-password"

NESTED = {"type": "object", "additionalProperties": False, "required": ["name", "address"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
ARRAY_ENUM = {"type": "object", "additionalProperties": False, "required": ["colors"],
              "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 4,
                                        "items": {"enum": ["red", "green", "blue"]}}}}
NUMBERS = {"type": "object", "additionalProperties": False, "required": ["age", "score", "ok"],
           "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                          # a fractional number may run on in zeros on a base model ("0.000..."), which the
                          # grammar allows; bounded integers keep every output finite within max_tokens
                          "score": {"type": "integer", "minimum": -50, "maximum": 50},
                          "ok": {"type": "boolean"}}}
LIST_OF_OBJECTS = {"type": "array", "minItems": 1, "maxItems": 3,
                   "items": {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
                             "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                            "tag": {"type": "string", "pattern": "^[a-z]{2,6}$"}}}}
SCHEMAS = [NESTED, ARRAY_ENUM, NUMBERS, LIST_OF_OBJECTS]
PROMPTS = ["A customer record as JSON: ", "The colours of the flag, in JSON: ", "Test result (JSON): ",
           "Inventory items as a JSON list: "]


# ---- the kernel -----------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vocab", [1, 31, 32, 100, 262144])
def test_the_token_mask_kernel_equals_its_reference(vocab, isa):
    g = torch.Generator().manual_seed(vocab)
    rows = 5
    words = (vocab + 31) // 32
    mask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32, generator=g)
    mask[1] = -1                  # all allowed
    mask[2] = 0                   # nothing allowed
    mask[3, ::2] = -1             # words of each kind
    narrow = mask[:, :max(words - 1, 0)]      # a mask narrower than the vocabulary: the rest is disallowed
    for m in (mask, narrow):
        logits = torch.randn(rows, vocab, generator=g)
        want = logits.clone()
        reference_apply_token_bitmask(want, m)
        apply_token_bitmask(logits, m, isa=isa)
        assert torch.equal(logits, want)
        assert torch.isinf(logits[2]).all()


@pytest.mark.parametrize("isa", ISAS)
def test_the_token_mask_kernel_masks_only_the_rows_it_is_given(isa):
    g = torch.Generator().manual_seed(3)
    vocab, rows = 1000, [4, 0, 2]
    mask = torch.randint(-2**31, 2**31 - 1, (len(rows), (vocab + 31) // 32), dtype=torch.int32, generator=g)
    logits = torch.randn(6, vocab, generator=g)
    want = logits.clone()
    reference_apply_token_bitmask(want, mask, rows)
    apply_token_bitmask(logits, mask, rows, isa=isa)
    assert torch.equal(logits, want)
    untouched = [1, 3, 5]
    assert torch.isfinite(logits[untouched]).all()
    with pytest.raises(RuntimeError, match="outside the logits"):
        apply_token_bitmask(logits, mask, [0, 1, 6], isa=isa)


# ---- request fields -------------------------------------------------------------------------------

def test_both_response_format_wrappers_and_guided_json_read_the_same_schema():
    openai = from_response_format({"type": "json_schema", "json_schema": {"name": "n", "schema": NESTED,
                                                                         "strict": True}})
    workers = from_response_format({"type": "json_schema", "json_schema": NESTED})
    assert openai == workers == OutputFormat(json.dumps(NESTED, sort_keys=True, separators=(",", ":")),
                                             "response_format")
    assert from_guided_json(json.dumps(NESTED)).schema == from_guided_json(NESTED).schema == openai.schema
    assert from_response_format({"type": "json_object"}).json_object
    assert from_response_format({"type": "text"}) is None and from_response_format(None) is None
    for bad in ({"type": "yaml"}, {"json_schema": {}}, {"type": "json_schema"}, "json", {"type": "json_schema",
                                                                                          "json_schema": []}):
        with pytest.raises(OutputFormatError):
            from_response_format(bad)
    with pytest.raises(OutputFormatError, match="larger than"):
        from_guided_json({"type": "object", "description": "x" * 70000})


@pytest.fixture(scope="module")
def grammars(converted):
    tok = Tokenizer.from_dir(converted)
    return JsonGrammars(tok.to_json(), 262144, sorted(tok.stop_token_ids))


@pytest.mark.parametrize("schema,feature", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"not": {"type": "string"}}, "not"),
    ({"$ref": "http://example.com/schema.json"}, "example.com"),
    ({"type": "strin"}, "strin"),
])
def test_a_schema_feature_that_cannot_be_enforced_is_refused_naming_it(grammars, schema, feature):
    with pytest.raises(OutputFormatError) as err:
        grammars.constraint(from_guided_json(schema))
    assert feature in str(err.value) and err.value.field == "guided_json"


RECURSIVE_REQUIRED = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "required": ["next"],
                                                                  "properties": {"next": {"$ref": "#/$defs/node"}}}}}
UNFOLLOWABLE = [
    RECURSIVE_REQUIRED,                                                          # no finite object satisfies it
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},   # refers only to itself
    {"type": "string", "pattern": "^(a{1000}){1000}$"},                         # past the lexer's limits
]


@pytest.mark.parametrize("schema", UNFOLLOWABLE, ids=["recursive-required", "recursive-defs", "huge-regex"])
def test_a_schema_llguidance_compiles_but_cannot_follow_is_refused_before_generating(grammars, schema):
    """They compiled, and the output then ended after one token with '', '"' or '{"' and finish "stop"."""
    with pytest.raises(OutputFormatError, match="cannot be enforced") as err:
        grammars.constraint(from_guided_json(schema))
    assert "<state>" not in str(err.value)                 # llguidance's first line, not its parser dump


def test_deep_or_non_object_schemas_are_refused_as_the_field_says():
    deep = '{"type": "array", "items": ' * 2000 + "{}" + "}" * 2000
    with pytest.raises(OutputFormatError, match="nests too deeply") as err:
        from_guided_json(deep)                               # RecursionError: a 500 before
    assert err.value.field == "guided_json"
    for schema in (5, "x", [], [{"type": "object"}], False, None):
        with pytest.raises(OutputFormatError, match="json_schema.schema. must be an object"):
            from_response_format({"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})


def test_the_grammar_cache_is_bounded_in_bytes_per_account_and_in_total(converted, monkeypatch):
    """300 distinct 54 KB schemas from one account grew RSS by 479 MB. Now an account's grammars stay within
    its budget, evicting its own oldest, and the others' cached grammars survive it."""
    from gemlora.structured.json_grammars import grammar_bytes
    tok = Tokenizer.from_dir(converted)
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "description": "d" * 3000}
               for i in range(12)]
    cost = grammar_bytes(from_guided_json(schemas[0]))
    grammars = JsonGrammars(tok.to_json(), 262144, sorted(tok.stop_token_ids), cache_bytes=6 * cost,
                            salt_cache_bytes=3 * cost)
    compiled = []
    compile_ = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda fmt: compiled.append(fmt.schema) or compile_(fmt))
    for schema in schemas[:2]:
        grammars.constraint(from_guided_json(schema), salt="bob")
    for schema in schemas[2:]:                                   # alice's stream of distinct schemas
        grammars.constraint(from_guided_json(schema), salt="alice")
        assert grammars.cached_bytes("alice") <= 3 * cost and grammars.cached_bytes() <= 6 * cost
    assert grammars.cached_bytes("bob") == 2 * cost
    before = len(compiled)
    for schema in schemas[:2]:                                   # bob's are still compiled
        grammars.constraint(from_guided_json(schema), salt="bob")
    grammars.constraint(from_guided_json(schemas[-1]), salt="alice")   # and alice's newest
    assert len(compiled) == before
    grammars.constraint(from_guided_json(schemas[2]), salt="alice")    # her oldest was evicted
    assert len(compiled) == before + 1


# ---- the engine -----------------------------------------------------------------------------------

def run(engine, requests):
    """requests: (prompt ids, params, add_request kwargs) -> each one's output ids."""
    ids = [engine.add_request(p, params, **kw) for p, params, kw in requests]
    outs: dict[str, list[int]] = {i: [] for i in ids}
    reasons = {}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason.value
    return [outs[i] for i in ids], [reasons[i] for i in ids]


def text_of(tok, ids):
    return tok.decode([t for t in ids if t not in tok.stop_token_ids])


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [False, True])
def test_every_output_follows_its_schema_in_a_batch_with_free_rows(real_model, converted, grammars, adapter):
    tok = Tokenizer.from_dir(converted)
    engine = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25, max_loras=2), tok.stop_token_ids)
    lora = {}
    if adapter:
        lora = {"adapter_id": "pw", "adapter": load_adapter(FIXTURE, real_model.cfg)}
    free_prompts = [tok.encode("Once upon a time"), tok.encode("The weather today is")]
    free = [(p, SamplingParams(max_tokens=24, temperature=0.8, seed=7 + i), {}) for i, p in enumerate(free_prompts)]
    free_alone, _ = run(engine, free)
    constrained = []
    for i, (schema, prompt) in enumerate(zip(SCHEMAS, PROMPTS)):
        for params in (SamplingParams(max_tokens=160, temperature=0),
                       SamplingParams(max_tokens=160, temperature=0.9, top_p=0.95, seed=100 + i)):
            constrained.append((schema, (tok.encode(prompt), params,
                                         {"constraint": grammars.constraint(from_guided_json(schema)), **lora})))
    json_mode = grammars.constraint(from_response_format({"type": "json_object"}))
    constrained.append(({"type": "object"}, (tok.encode("Some data as JSON: "),
                                             SamplingParams(max_tokens=160, temperature=0), {"constraint": json_mode})))
    outs, reasons = run(engine, free + [req for _, req in constrained])
    assert outs[:len(free)] == free_alone          # free rows: the same tokens beside grammar rows as alone
    for (schema, _), ids, reason in zip(constrained, outs[len(free):], reasons[len(free):]):
        text = text_of(tok, ids)
        assert reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.slow
def test_max_tokens_mid_json_ends_with_length(real_model, converted, grammars):
    tok = Tokenizer.from_dir(converted)
    engine = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), tok.stop_token_ids)
    outs, reasons = run(engine, [(tok.encode("A customer record as JSON: "), SamplingParams(max_tokens=5, temperature=0),
                                  {"constraint": grammars.constraint(from_guided_json(NESTED))})])
    assert reasons == ["length"] and len(outs[0]) == 5 and text_of(tok, outs[0]).startswith('{"')


# ---- both APIs ------------------------------------------------------------------------------------

MODEL = "@cf/google/gemma-7b-it-lora"


@pytest.fixture(scope="module")
def server(real_model, converted, tmp_path_factory):
    from gemlora.api.app import ServerSettings, create_app
    from gemlora.api.auth import Auth
    from gemlora.engine.async_engine import AsyncEngine
    tok = Tokenizer.from_dir(converted)
    engine = AsyncEngine(LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25, max_loras=2), tok.stop_token_ids),
                         tok).start()
    settings = ServerSettings(model_names=(MODEL,), data_dir=tmp_path_factory.mktemp("json-data"))
    base, stop = start_uvicorn(create_app(engine, settings, Auth({"tok": "acct"})))
    yield base
    stop()
    engine.shutdown()


AUTH = {"authorization": "Bearer tok"}


@pytest.mark.slow
def test_workers_ai_json_mode_answers_the_value_and_guided_json_the_text(server):
    url = f"{server}/accounts/acct/ai/run/{MODEL}"
    body = {"prompt": PROMPTS[0], "raw": True, "temperature": 0, "max_tokens": 160}
    out = httpx.post(url, headers=AUTH, timeout=60, json={**body, "response_format": {
        "type": "json_schema", "json_schema": NESTED}}).json()
    assert out["success"], out
    jsonschema.validate(out["result"]["response"], NESTED)          # the object itself
    guided = httpx.post(url, headers=AUTH, timeout=60, json={**body, "guided_json": json.dumps(NESTED)}).json()
    assert json.loads(guided["result"]["response"]) == out["result"]["response"]   # the same, as text
    frames = []
    with httpx.stream("POST", url, headers=AUTH, timeout=60,
                      json={**body, "stream": True, "response_format": {"type": "json_schema",
                                                                        "json_schema": NESTED}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                frames.append(json.loads(line[6:])["response"])
    assert len(frames) > 3 and json.loads("".join(frames)) == out["result"]["response"]
    for field in ("response_format", "guided_json"):     # its required keys cannot fit in 4 tokens: both forms
        value = {"type": "json_schema", "json_schema": NESTED} if field == "response_format" else NESTED
        cut = httpx.post(url, headers=AUTH, timeout=60, json={**body, "max_tokens": 4, field: value})
        assert cut.status_code == 400, cut.text
        assert re.search(r"'/max_tokens' must be >= \d+", cut.json()["errors"][0]["message"])
    bad = httpx.post(url, headers=AUTH, timeout=60, json={**body, "guided_json": {"uniqueItems": True}})
    assert bad.status_code == 400 and "uniqueItems" in bad.json()["errors"][0]["message"]
    # a schema it cannot follow, and a 2,000-level one in a string: the same 400 on every route and field
    deep = '{"type": "array", "items": ' * 2000 + "{}" + "}" * 2000
    chat = f"{server}/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    for schema, why in ((RECURSIVE_REQUIRED, "cannot be enforced"), (deep, "nests too deeply")):
        wrapped = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
        for target, payload in ((url, {**body, "guided_json": schema}),
                                (url, {**body, "response_format": wrapped}),
                                (chat, {"model": MODEL, "messages": msgs, "response_format": wrapped}),
                                (chat, {"model": MODEL, "messages": msgs, "guided_json": schema})):
            if isinstance(schema, str) and "response_format" in payload:
                continue                                     # a string there is not a schema at all
            r = httpx.post(target, headers=AUTH, timeout=60, json=payload)
            assert r.status_code == 400 and why in r.text, (target, list(payload), r.text)
    assert httpx.post(url, headers=AUTH, timeout=60, json={**body, "max_tokens": 3}).status_code == 200


@pytest.mark.slow
def test_openai_response_format_streamed_and_not(server):
    from openai import OpenAI
    client = OpenAI(base_url=f"{server}/v1", api_key="tok", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "colors", "schema": ARRAY_ENUM, "strict": True}}
    msgs = [{"role": "user", "content": "List two colours of the French flag."}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, temperature=0,
                                         max_tokens=64)
    jsonschema.validate(json.loads(out.choices[0].message.content), ARRAY_ENUM)
    assert out.choices[0].finish_reason == "stop"
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=msgs, response_format=fmt, temperature=0, max_tokens=64, stream=True) if c.choices]
    assert "".join(parts) == out.choices[0].message.content
    comp = client.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0.7, seed=3, max_tokens=96,
                                     extra_body={"response_format": {"type": "json_schema",
                                                                     "json_schema": {"name": "n", "schema": NUMBERS}}})
    jsonschema.validate(json.loads(comp.choices[0].text), NUMBERS)
    import openai
    with pytest.raises(openai.BadRequestError) as err:        # too few tokens for any valid answer
        client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, temperature=0, max_tokens=3)
    assert "must be >=" in str(err.value) and err.value.body.get("param") == "max_tokens"
    needed = int(re.search(r">= (\d+)", str(err.value)).group(1))
    short = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, temperature=0,
                                           max_tokens=needed)      # exactly enough: steered to the shortest
    jsonschema.validate(json.loads(short.choices[0].message.content), ARRAY_ENUM)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}})
    assert "not" in str(err.value) and err.value.body.get("param") == "response_format"
