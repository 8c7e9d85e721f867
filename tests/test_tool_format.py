"""The tool-calling prompt formats (gemlora.text.tool_format) against the formats' published examples
(FunctionGemma's formatting guide, Google's Gemma function-calling page), and their call parsers
against their own writers over generated values."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemlora.text.tool_format import (GEMMA_JSON_INSTRUCTION, FunctionGemmaFormat, GemmaJsonFormat, ToolCall,
                                      ToolFormatError, ToolSpec, format_for, read_value)

WEATHER = ToolSpec("get_current_weather", "Gets the current weather in a given location.", {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": 'The city and state, e.g. "San Francisco, CA" or "Tokyo, JP"'},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"],
                 "description": "The unit to return the temperature in."}},
    "required": ["location"]})


def test_functiongemma_declaration_is_the_published_one():
    # FunctionGemma's formatting guide, "Turn 1: Tool Definition (Developer)"
    published = (
        "You are a model that can do function calling with the following functions<start_function_declaration>"
        "declaration:get_current_weather{description:<escape>Gets the current weather in a given location.<escape>,"
        "parameters:{properties:{location:{description:<escape>The city and state, e.g. \"San Francisco, CA\" or "
        "\"Tokyo, JP\"<escape>,type:<escape>STRING<escape>},unit:{description:<escape>The unit to return the "
        "temperature in.<escape>,enum:[<escape>celsius<escape>,<escape>fahrenheit<escape>],type:<escape>STRING"
        "<escape>}},required:[<escape>location<escape>],type:<escape>OBJECT<escape>}}<end_function_declaration>")
    assert FunctionGemmaFormat().declarations([WEATHER]) == published


def test_functiongemma_call_and_response_are_the_published_ones():
    fmt = FunctionGemmaFormat()
    call = "<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan<escape>}<end_function_call>"
    assert fmt.parse(call) == ("", [ToolCall("get_current_weather", {"location": "Tokyo, Japan"})])
    assert fmt.call([ToolCall("get_current_weather", {"location": "Tokyo, Japan"})]) == call
    assert fmt.result("get_current_weather", json.dumps({"temperature": 15, "weather": "sunny"})) == (
        "<start_function_response>response:get_current_weather{temperature:15,weather:<escape>sunny<escape>}"
        "<end_function_response>")
    assert fmt.stop == ("<start_function_response>",)
    paris = ("<start_function_call>call:get_current_temperature{location:<escape>Paris<escape>,unit:<escape>celsius"
             "<escape>}<end_function_call>")
    assert fmt.parse(paris)[1] == [ToolCall("get_current_temperature", {"location": "Paris", "unit": "celsius"})]


def test_functiongemma_conversation_layout_is_its_chat_templates():
    """FunctionGemma's chat template: declarations in a developer turn; a calling model turn stays open for the
    results, and the model goes on in that same turn (no generation prompt after results)."""
    from gemlora.text.tool_prompt import tool_prompt
    fmt = FunctionGemmaFormat()
    call = ToolCall("get_current_weather", {"location": "Tokyo, JP"}, "call_1")
    decl = fmt.declaration_tokens([WEATHER])
    ask = [{"role": "user", "content": "Weather in Tokyo?"}]
    assert tool_prompt(ask, [WEATHER], fmt) == (
        "<start_of_turn>developer\nYou are a model that can do function calling with the following functions"
        + decl + "<end_of_turn>\n<start_of_turn>user\nWeather in Tokyo?<end_of_turn>\n<start_of_turn>model\n")
    answered = [{"role": "system", "content": " Be brief. "}, *ask,
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 15}'}]
    assert tool_prompt(answered, [WEATHER], fmt) == (
        "<start_of_turn>developer\nBe brief.\n\n" + decl + "<end_of_turn>\n"
        "<start_of_turn>user\nWeather in Tokyo?<end_of_turn>\n<start_of_turn>model\n"
        "<start_function_call>call:get_current_weather{location:<escape>Tokyo, JP<escape>}<end_function_call>"
        "<start_function_response>response:get_current_weather{temperature:15}<end_function_response>")
    later = [*answered, {"role": "assistant", "content": "15 degrees."}, {"role": "user", "content": "Thanks"}]
    assert tool_prompt(later, [WEATHER], fmt, declare=False).endswith(
        "<end_function_response>15 degrees.<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert tool_prompt(later, [WEATHER], fmt, declare=False).startswith("<start_of_turn>developer\nBe brief.<end")
    for unanswered in (answered[:-1], [*answered[:-1], {"role": "user", "content": "and?"}]):
        with pytest.raises(ValueError, match="followed by its result"):
            tool_prompt(unanswered, [WEATHER], fmt)


def test_functiongemma_parallel_calls_and_text_around_them():
    fmt = FunctionGemmaFormat()
    text = ("Sure.<start_function_call>call:get_weather{city:<escape>Tokyo<escape>}<end_function_call>"
            "<start_function_call>call:get_stock_price{ticker:<escape>GOOG<escape>,n:[1,2.5,true,null]}"
            "<end_function_call>")
    content, calls = fmt.parse(text)
    assert content == "Sure." and calls == [ToolCall("get_weather", {"city": "Tokyo"}),
                                            ToolCall("get_stock_price", {"ticker": "GOOG", "n": [1, 2.5, True, None]})]
    with pytest.raises(ToolFormatError):
        fmt.parse("<start_function_call>call:f{a:<escape>open}<end_function_call>")
    with pytest.raises(ToolFormatError):
        fmt.parse("<start_function_call>call:f{a 1}<end_function_call>")


def test_gemma_json_declaration_is_googles_documented_prompt():
    # ai.google.dev/gemma/docs/capabilities/function-calling, the JSON variant
    tool = ToolSpec("get_product_name_by_PID", "Finds the name of a product by its Product ID",
                    {"type": "object", "properties": {"PID": {"type": "string"}}, "required": ["PID"]})
    text = GemmaJsonFormat().declarations([tool])
    assert text.startswith("You have access to functions. If you decide to invoke any of the function(s), you MUST "
                           "put it in the format of\n{\"name\": function name, \"parameters\": dictionary of argument "
                           "name and its value}\n\nYou SHOULD NOT include any other text in the response if you call "
                           "a function\n")
    assert json.loads(text[len(GEMMA_JSON_INSTRUCTION):]) == [{
        "name": "get_product_name_by_PID", "description": "Finds the name of a product by its Product ID",
        "parameters": {"type": "object", "properties": {"PID": {"type": "string"}}, "required": ["PID"]}}]


def test_gemma_json_parses_calls_and_leaves_text_alone():
    fmt = GemmaJsonFormat()
    one = ToolCall("get_product_name_by_PID", {"PID": "807ZPKBL9V"})
    assert fmt.parse('{"name": "get_product_name_by_PID", "parameters": {"PID": "807ZPKBL9V"}}') == ("", [one])
    assert fmt.parse('```json\n{"name": "get_product_name_by_PID", "parameters": {"PID": "807ZPKBL9V"}}\n```')[1] == [one]
    assert fmt.parse(fmt.call([one, one])) == ("", [one, one])
    for text in ("The product is a lamp.", '{"answer": 4}', '{"name": 5, "parameters": {}}', "[]"):
        assert fmt.parse(text) == (text, [])
    assert fmt.result("f", '{"a": 1}') == '```tool_output\n{"a": 1}\n```'


def test_the_format_follows_the_tokenizer_unless_named():
    assert isinstance(format_for(lambda t: t == "<start_function_call>"), FunctionGemmaFormat)
    assert isinstance(format_for(lambda t: False), GemmaJsonFormat)
    assert isinstance(format_for(lambda t: False, "functiongemma"), FunctionGemmaFormat)
    with pytest.raises(ValueError, match="tool format must be one of"):
        format_for(lambda t: False, "xml")


NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12).filter(lambda s: "<escape>" not in s)
VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), TEXT,
                                st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)),
                      lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(NAMES, kids, max_size=3)),
                      max_leaves=10)
CALLS = st.lists(st.builds(ToolCall, NAMES, st.dictionaries(NAMES, VALUES, max_size=4)), min_size=1, max_size=3)


@settings(max_examples=300, derandomize=True, database=None)
@given(calls=CALLS)
def test_each_format_reads_back_the_calls_it_writes(calls):
    for fmt in (FunctionGemmaFormat(), GemmaJsonFormat()):
        content, parsed = fmt.parse(fmt.call(calls))
        assert content == "" and [(c.name, dict(c.arguments)) for c in parsed] == \
            [(c.name, json.loads(json.dumps(dict(c.arguments)))) for c in calls]


def test_read_value_reports_where_it_stopped():
    assert read_value("{a:1,b:<escape>x,y<escape>}tail", 0) == ({"a": 1, "b": "x,y"}, 27)


def test_gemma_json_calls_schema_admits_exactly_the_declared_calls():
    import jsonschema
    other = ToolSpec("get_time", "The time in a zone.", {"type": "object", "properties": {"zone": {"type": "string"}},
                                                         "required": ["zone"], "additionalProperties": False})
    schema = GemmaJsonFormat().calls_schema([WEATHER, other])
    ok = {"name": "get_time", "parameters": {"zone": "UTC"}}
    jsonschema.validate(ok, schema)
    for bad in ({"name": "get_time", "parameters": {}}, {"name": "nope", "parameters": {}},
                {"name": "get_current_weather", "parameters": {"unit": "kelvin", "location": "x"}},
                {**ok, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    parallel = GemmaJsonFormat().calls_schema([WEATHER, other], parallel=True)
    jsonschema.validate([ok, ok], parallel)
    jsonschema.validate(ok, parallel)                    # one call alone, as the model writes it most often
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], parallel)
    assert GemmaJsonFormat().parse(json.dumps([ok, ok]))[1] == [ToolCall("get_time", {"zone": "UTC"})] * 2


@pytest.mark.slow
def test_a_required_call_generated_under_the_calls_grammar_always_parses_and_validates(real_model, converted):
    """The embedded model, sampled, constrained by the calls schema through the JSON grammar: every output
    that completes is a declared call whose arguments validate (jsonschema)."""
    import jsonschema

    from gemlora.config import EngineConfig
    from gemlora.engine.engine import LLMEngine
    from gemlora.sampling import SamplingParams
    from gemlora.structured.json_grammars import JsonGrammars
    from gemlora.structured.output_format import from_guided_json
    from gemlora.text.chat import format_chat
    from gemlora.text.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(converted)
    fmt = GemmaJsonFormat()
    other = ToolSpec("get_time", "The time in a zone.", {"type": "object", "properties": {"zone": {"type": "string"}},
                                                         "required": ["zone"]})
    tools = [WEATHER, other]
    grammars = JsonGrammars(tok.to_json(), 262144, sorted(tok.stop_token_ids))
    engine = LLMEngine(real_model, EngineConfig(kv_cache_memory_gb=0.25), tok.stop_token_ids)
    prompt = tok.encode(format_chat([{"role": "user", "content": fmt.declarations(tools)
                                      + "\nWhat is the weather in Paris, and the time in UTC?"}]))
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=96, temperature=0.8, seed=seed),
                              constraint=grammars.constraint(from_guided_json(fmt.calls_schema(tools))))
           for seed in range(1, 9)]
    outs: dict = {}
    while engine.has_work():
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(out.new_token_ids)
    complete = 0
    for rid in ids:
        text = tok.decode(outs[rid])
        content, calls = fmt.parse(text)
        if content:                          # cut off by max_tokens: issue 27's budget steering comes later
            continue
        complete += 1
        [call] = calls
        spec = {t.name: t for t in tools}[call.name]
        jsonschema.validate(dict(call.arguments), dict(spec.parameters))
    # the property is that every complete output is a valid call; how many complete within 96 tokens depends on
    # the CPU's kernel path (sampled tokens differ by ISA), and is issue 27's budget steering to fix
    print(f"\n{complete} of {len(ids)} sampled calls complete within 96 tokens; all valid")
    assert complete >= len(ids) // 2, complete          # 8 of 8 here (AVX-512 VNNI path)
