"""FunctionGemma's calls enforced by grammar (gemlora.structured.functiongemma_grammar), and served.

The tokenizer is the embedded model's with FunctionGemma's seven control tokens in place of seven of its
unused ones (as FunctionGemma's own tokenizer has them: special tokens of the same Gemma 3 vocabulary).
Oracles: jsonschema for the arguments, FunctionGemmaFormat's parser (tested against the published format in
test_tool_format.py) for the syntax. Sound: random walks through the grammar (every allowed token equally
likely, budget-steered to finish) over the 20 fixture tool schemas always parse and validate. Complete: what
the format's writer writes for valid arguments (in the schema's member order), and hand-picked edge values
of each keyword, are accepted; invalid ones are not. Served: a tiny random model with that tokenizer answers
tool_choice "required" and a named tool with valid calls on both APIs, streamed and not.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from gemlora.structured.json_grammars import JsonGrammars
from gemlora.structured.output_format import OutputFormatError
from gemlora.structured.tool_grammar import tool_output_format
from gemlora.text.tool_format import CONTROL_TOKENS, FunctionGemmaFormat, ToolSpec

TOOLS = json.loads((Path(__file__).parent / "fixtures" / "tool_schemas.json").read_text())
SPECS = [ToolSpec(t["name"], t.get("description", ""), t["parameters"]) for t in TOOLS]
FMT = FunctionGemmaFormat()
VOCAB = 262144


def functiongemma_tokenizer_json(text: str) -> str:
    """The tokenizer with FunctionGemma's control tokens as <unused0>..<unused6>'s ids."""
    data = json.loads(text)
    renamed = {f"<unused{i}>": name for i, name in enumerate(CONTROL_TOKENS)}
    for token in data["added_tokens"]:
        token["content"] = renamed.get(token["content"], token["content"])
    vocab = data["model"]["vocab"]
    for old, new in renamed.items():
        vocab[new] = vocab.pop(old)
    return json.dumps(data)


@pytest.fixture(scope="module")
def fg_dir(converted, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("functiongemma-tokenizer")
    (path / "tokenizer.json").write_text(functiongemma_tokenizer_json((converted / "tokenizer.json").read_text()))
    (path / "tokenizer_config.json").write_text((converted / "tokenizer_config.json").read_text())
    return path


@pytest.fixture(scope="module")
def fg(fg_dir):
    from gemlora.text.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(fg_dir)
    return tok, JsonGrammars(tok.to_json(), VOCAB, sorted(tok.stop_token_ids))


def _fmt(specs, choice="required", parallel=False):
    return tool_output_format(FMT, specs, choice, parallel, None)


def _accepts(grammars, fmt, text: str, tok) -> bool:
    constraint = grammars.constraint(fmt)
    matcher = constraint._matcher
    ids = tok.encode(text, add_bos=False)
    return matcher.validate_tokens(ids) == len(ids) and (matcher.consume_tokens(ids) or matcher.is_accepting())


def _walk(grammars, fmt, tok, seed: int, budget: int) -> str:
    """One output: a uniformly random allowed token at each step, budget-steered to finish."""
    gen = torch.Generator().manual_seed(seed)
    constraint = grammars.constraint(fmt)
    constraint.limit(budget)
    mask = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    out = []
    for _ in range(budget):
        constraint.fill_bitmask(mask, 0)
        bits = ((mask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:VOCAB].bool()
        allowed = bits.nonzero().flatten()
        token = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        token = constraint.steer(token)
        if token in tok.stop_token_ids:
            break
        constraint.accept(token)
        out.append(token)
    return tok.decode(out)


def test_every_fixture_schema_compiles_for_functiongemma(fg):
    tok, grammars = fg
    for spec in SPECS:
        for choice in ("required", "auto"):
            grammars.constraint(_fmt([spec], choice, parallel=True))      # raises if it could not be enforced


@pytest.mark.parametrize("parallel", [False, True])
def test_random_walks_through_the_grammar_always_end_in_valid_calls(fg, parallel):
    tok, grammars = fg
    by_name = {s.name: s for s in SPECS}
    valid = 0
    for i, spec in enumerate(SPECS):
        other = SPECS[(i * 7 + 3) % len(SPECS)]
        offered = [spec] if other is spec else [spec, other]
        fmt = _fmt(offered, parallel=parallel)
        for seed in range(2):
            text = _walk(grammars, fmt, tok, seed=i * 10 + seed, budget=96)
            content, calls = FMT.parse(text)
            assert content == "" and calls, text
            for call in calls:
                assert call.name in {s.name for s in offered}, text
                jsonschema.validate(dict(call.arguments), dict(by_name[call.name].parameters))
                valid += 1
            # and what the writer makes of them again is accepted (the grammar's syntax is the format's)
            assert _accepts(grammars, fmt, FMT.call(calls), tok), text
    assert valid >= 2 * len(SPECS)


def _spec(parameters: dict) -> ToolSpec:
    return ToolSpec("f", "", {"type": "object", **parameters})


@pytest.mark.parametrize("parameters, good, bad", [
    ({"properties": {"a": {"type": "string"}, "b": {"type": "integer", "minimum": 1, "maximum": 14}},
      "required": ["b"]},
     [{"b": 1}, {"a": "x y, z}", "b": 14}, {"a": "", "b": 3}], [{}, {"b": 0}, {"b": 15}, {"a": "x"}, {"b": 1.5}]),
    ({"properties": {"u": {"enum": ["c", "f"]}, "on": {"type": "boolean"}, "n": {"type": "null"}}},
     [{}, {"u": "c"}, {"on": False, "n": None}], [{"u": "k"}, {"on": "true"}]),
    ({"properties": {"t": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}}, "required": ["t"]},
     [{"t": "09:30"}], [{"t": "9:30"}, {"t": "x09:30"}, {"t": "09:30 "}]),
    ({"properties": {"t": {"type": "string", "pattern": "[0-9]+"}}, "required": ["t"]},
     [{"t": "a1b"}], [{"t": "ab"}]),
    ({"properties": {"d": {"type": "string", "format": "date"}, "w": {"type": "string", "format": "date-time"}}},
     [{"d": "2026-12-07", "w": "2026-12-07T19:05:00Z"}], [{"d": "2026-13-01"}, {"d": "2026-12-7"}]),
    ({"properties": {"s": {"type": "string", "minLength": 2, "maxLength": 3}}, "required": ["s"]},
     [{"s": "ab"}, {"s": "abc"}], [{"s": "a"}, {"s": "abcd"}]),
    ({"properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}},
      "required": ["xs"]},
     [{"xs": [1, 2]}, {"xs": [1, 2, 3, 4]}], [{"xs": []}, {"xs": [1]}, {"xs": [1, 2, 3, 4, 5]}, {"xs": ["1", 2]}]),
    ({"properties": {"o": {"type": "object", "properties": {"k": {"type": "number"}}, "required": ["k"]},
                     "any": {}}},
     [{"o": {"k": -2.5e3}}, {"any": {"x": [1, "y", None]}}], [{"o": {}}, {"o": {"k": "1"}}]),
    ({"properties": {"v": {"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["all"]}]}}, "required": ["v"]},
     [{"v": 3}, {"v": "all"}], [{"v": "some"}, {"v": 2.5}]),
])
def test_each_keyword_admits_its_valid_values_and_only_them(fg, parameters, good, bad):
    tok, grammars = fg
    spec = _spec(parameters)
    fmt = _fmt([spec])
    from gemlora.text.tool_format import ToolCall
    formats = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for arguments in good:
        jsonschema.validate(arguments, spec.parameters, format_checker=formats)   # the examples themselves are right
        assert _accepts(grammars, fmt, FMT.call([ToolCall("f", arguments)]), tok), arguments
    for arguments in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(arguments, spec.parameters, format_checker=formats)
        assert not _accepts(grammars, fmt, FMT.call([ToolCall("f", arguments)]), tok), arguments


@pytest.mark.parametrize("parameters, keyword", [
    ({"properties": {"a": {"type": "string", "format": "hostname"}}}, "hostname"),
    ({"properties": {"a": {"$ref": "#/$defs/x"}}}, "$ref"),
    ({"properties": {"a": {"oneOf": [{"type": "string"}]}}}, "oneOf"),
    ({"properties": {"a": {"type": "array", "maxItems": 1000}}}, "bound above"),
    ({"properties": {"a": {"type": "object", "patternProperties": {"x": {}}}}}, "patternProperties"),
])
def test_what_it_cannot_enforce_is_refused_naming_it(parameters, keyword):
    with pytest.raises(OutputFormatError) as err:
        _fmt([_spec(parameters)])
    assert keyword in str(err.value) and err.value.field == "tools"


def test_decoding_keeps_functiongemma_tokens_and_drops_other_special_ones(fg):
    tok, _ = fg
    text = "<start_function_call>call:f{a:<escape>x<escape>}<end_function_call>"
    ids = tok.encode(text, add_bos=True) + sorted(tok.stop_token_ids)[:1]
    assert tok.decode(ids) == text


# ---- served ---------------------------------------------------------------------------------------------

MODEL = "@cf/google/gemma-7b-it-lora"
AUTH = {"authorization": "Bearer tok"}


@pytest.fixture(scope="module")
def fg_server(fg_dir, tmp_path_factory):
    import shutil

    from conftest import make_tiny_checkpoint, serve_engine
    from gemlora.config import EngineConfig
    from gemlora.model.loader import load_model
    from gemlora.text.tokenizer import Tokenizer
    path = tmp_path_factory.mktemp("tiny-functiongemma")
    make_tiny_checkpoint("gemma3", path, vocab_size=VOCAB, max_position_embeddings=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fg_dir / name, path / name)
    with serve_engine(load_model(path, torch.float32), Tokenizer.from_dir(path), EngineConfig(kv_cache_memory_gb=0.25),
                      tmp_path_factory.mktemp("fg-data"), (MODEL,)) as base:
        yield base


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_served_calls_are_valid_on_both_apis_streamed_and_not(fg_server):
    import httpx
    by_name = {t["name"]: t for t in TOOLS}
    seen = 0
    with httpx.Client(timeout=120) as client:
        for i in range(8):
            names = list(dict.fromkeys([TOOLS[i]["name"], TOOLS[(i * 7 + 3) % 20]["name"]]))
            choice = "required" if i % 2 == 0 else {"type": "function", "function": {"name": names[0]}}
            common = {"messages": [{"role": "user", "content": "Go."}], "tool_choice": choice, "temperature": 1.0,
                      "seed": i + 1, "max_tokens": 64, "stream": i % 4 >= 2}
            if i % 3 == 0:
                r = client.post(f"{fg_server}/accounts/acct/ai/run/{MODEL}", headers=AUTH,
                                json={"tools": [by_name[n] for n in names], **common})
                assert r.status_code == 200, r.text
                calls = ([c for e in _events(r.text) for c in e.get("tool_calls", ())] if common["stream"]
                         else r.json()["result"]["tool_calls"])
                pairs = [(c["name"], c["arguments"]) for c in calls]
            else:
                r = client.post(f"{fg_server}/v1/chat/completions", headers=AUTH,
                                json={"model": MODEL, "tools": [{"type": "function", "function": by_name[n]}
                                                                for n in names], **common})
                assert r.status_code == 200, r.text
                calls = ([c for e in _events(r.text) for ch in e["choices"] for c in ch["delta"].get("tool_calls", ())]
                         if common["stream"] else r.json()["choices"][0]["message"]["tool_calls"])
                pairs = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
            assert pairs, r.text
            for name, arguments in pairs:
                assert name in (names if choice == "required" else names[:1])
                jsonschema.validate(arguments, by_name[name]["parameters"])
                seen += 1
    assert seen >= 8


def test_a_served_round_trip_in_functiongemmas_layout(fg_server):
    """A history with the model's call and the tool's result goes on in the same model turn (200), and a call no
    result answers is refused naming the messages (400), on the OpenAI route."""
    import httpx
    weather = next(t for t in TOOLS if t["name"] == "get_weather")
    call = {"id": "call_a", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Lisbon"})}}
    history = [{"role": "user", "content": "Weather in Lisbon?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_a", "content": '{"celsius": 21}'}]
    body = {"model": MODEL, "tools": [{"type": "function", "function": weather}], "max_tokens": 8,
            "temperature": 0}
    with httpx.Client(timeout=120) as client:
        r = client.post(f"{fg_server}/v1/chat/completions", headers=AUTH, json={**body, "messages": history})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
        r = client.post(f"{fg_server}/v1/chat/completions", headers=AUTH,
                        json={**body, "messages": [*history[:2], {"role": "user", "content": "and?"}]})
        assert r.status_code == 400 and "followed by its result" in r.json()["error"]["message"], r.text
