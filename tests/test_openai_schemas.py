"""OpenAI request bodies (chat completions and completions) -> GenerateRequest: defaults, every option,
nulls, aliases, the prompt forms and the refused options, with OpenAI's error texts naming the param.
Pure, fast, no engine and no HTTP."""

from __future__ import annotations

import json

import pytest

from gemlora.api.errors import ApiError
from gemlora.api.openai_schemas import parse_chat_completion, parse_completion
from gemlora.sampling import SamplingParams

USER = [{"role": "user", "content": "hi"}]


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def openai_error(parse, obj) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(obj if isinstance(obj, bytes) else body(obj))
    err = info.value
    assert (err.code, err.status) == (5006, 400)
    return err


def test_chat_completion_defaults():
    model, req = parse_chat_completion(body({"model": "@cf/google/gemma-7b-it-lora", "messages": USER}))
    assert model == "@cf/google/gemma-7b-it-lora"
    assert req.messages == tuple(USER) and req.prompt is None and req.raw is False
    assert req.params == SamplingParams(max_tokens=256, temperature=1.0)
    assert req.stream is False and req.include_usage is False and req.lora is None and req.lora_scale == 1.0


def test_chat_completion_every_option():
    model, req = parse_chat_completion(body({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 9, "temperature": 0.2, "top_p": 0.9, "top_k": 5, "seed": 3,
        "frequency_penalty": 0.1, "presence_penalty": 0.2, "repetition_penalty": 1.1, "stop": ["x", "y"],
        "stream": True, "stream_options": {"include_usage": True}, "n": 1, "lora": "ft", "lora_scale": 2,
        "user": "someone", "logprobs": False, "tools": [], "response_format": {"type": "text"}}))
    assert req.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"})
    assert req.params == SamplingParams(max_tokens=9, temperature=0.2, top_p=0.9, top_k=5, seed=3,
                                        frequency_penalty=0.1, presence_penalty=0.2, repetition_penalty=1.1,
                                        stop=("x", "y"))
    assert req.stream and req.include_usage and req.lora == "ft" and req.lora_scale == 2


def test_openai_nulls_mean_absent():
    _, req = parse_chat_completion(body({"model": "m", "messages": USER, "max_tokens": None, "temperature": None,
                                         "stop": None, "n": None, "seed": None, "stream": None,
                                         "stream_options": None, "lora": None}))
    assert req.params == SamplingParams(max_tokens=256, temperature=1.0) and req.stream is False


def test_max_tokens_aliases():
    _, req = parse_chat_completion(body({"model": "m", "messages": USER, "max_tokens": 12}))
    assert req.params.max_tokens == 12
    _, req = parse_chat_completion(body({"model": "m", "messages": USER, "max_tokens": 12,
                                         "max_completion_tokens": 12}))
    assert req.params.max_tokens == 12
    err = openai_error(parse_chat_completion, {"model": "m", "messages": USER, "max_tokens": 1,
                                               "max_completion_tokens": 2})
    assert err.param == "max_tokens"
    err = openai_error(parse_chat_completion, {"model": "m", "messages": USER, "max_completion_tokens": 0})
    assert err.param == "max_completion_tokens"


def test_temperature_accepts_the_workers_ai_range():
    _, req = parse_chat_completion(body({"model": "m", "messages": USER, "temperature": 5}))
    assert req.params.temperature == 5
    err = openai_error(parse_chat_completion, {"model": "m", "messages": USER, "temperature": 5.5})
    assert err.param == "temperature"
    assert err.message == "Invalid 'temperature': expected a value <= 5, but got 5.5 instead."


def test_completion_defaults_and_prompt_forms():
    model, req = parse_completion(body({"model": "m", "prompt": "Once upon"}))
    assert model == "m" and req.prompt == "Once upon" and req.messages is None
    assert req.raw is True     # completions continue the text as given: no chat template
    assert req.params == SamplingParams(max_tokens=256, temperature=1.0)
    assert parse_completion(body({"model": "m", "prompt": ["only one"]}))[1].prompt == "only one"
    assert parse_completion(body({"model": "m", "prompt": "p", "raw": False}))[1].raw is False


@pytest.mark.parametrize("prompt,fragment", [
    (["a", "b"], "only one prompt per request is supported, got 2"),
    ([], "only one prompt per request is supported, got 0"),
    ([1, 2, 3], "token-id prompts are not supported"),
    ([[1, 2]], "token-id prompts are not supported"),
    ("", "string too short"),
    (None, "expected a string, but got null instead"),
    (7, "expected a string, but got an integer instead"),
])
def test_completion_prompt_errors(prompt, fragment):
    err = openai_error(parse_completion, {"model": "m", "prompt": prompt})
    assert err.param == "prompt" and fragment in err.message, err.message


def test_stop_string_or_list():
    _, req = parse_completion(body({"model": "m", "prompt": "p", "stop": "\n"}))
    assert req.params.stop == ("\n",)
    _, req = parse_completion(body({"model": "m", "prompt": "p", "stop": ["a", "b", "c", "d"]}))
    assert req.params.stop == ("a", "b", "c", "d")
    _, req = parse_completion(body({"model": "m", "prompt": "p", "stop": []}))
    assert req.params.stop == ()
    for stop in (["a", "b", "c", "d", "e"], [1], 5, {"a": 1}, [""]):
        err = openai_error(parse_completion, {"model": "m", "prompt": "p", "stop": stop})
        assert err.param == "stop", stop
    err = openai_error(parse_completion, {"model": "m", "prompt": "p", "stop": ["a"] * 5})
    assert err.message == "Invalid 'stop': at most 4 stop sequences are allowed, got 5."


@pytest.mark.parametrize("parse,base", [(parse_chat_completion, {"model": "m", "messages": USER}),
                                        (parse_completion, {"model": "m", "prompt": "p"})])
def test_n_above_one_is_refused(parse, base):
    err = openai_error(parse, {**base, "n": 2})
    assert err.param == "n" and err.message == "Invalid 'n': only n=1 is supported, got 2."
    assert parse(body({**base, "n": 1}))[1].params.max_tokens == 256


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
def test_negative_penalties_are_refused(field):
    err = openai_error(parse_chat_completion, {"model": "m", "messages": USER, field: -0.5})
    assert err.param == field and "negative values are not supported" in err.message
    err = openai_error(parse_chat_completion, {"model": "m", "messages": USER, field: 2.5})
    assert err.param == field and "<= 2" in err.message
    assert getattr(parse_chat_completion(body({"model": "m", "messages": USER, field: 2}))[1].params, field) == 2


@pytest.mark.parametrize("parse,base", [(parse_chat_completion, {"messages": USER}),
                                        (parse_completion, {"prompt": "p"})])
def test_model_is_required(parse, base):
    err = openai_error(parse, base)
    assert err.param == "model" and err.message == "Missing required parameter: 'model'."
    for model in (5, None, ""):
        assert openai_error(parse, {**base, "model": model}).param == "model"


@pytest.mark.parametrize("obj,param,message", [
    ({"model": "m"}, "messages", "Missing required parameter: 'messages'."),
    ({"model": "m", "messages": []}, "messages", None),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "Invalid type for 'messages[0].content': expected a string, but got an integer instead."),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
     "Missing required parameter: 'messages[0].tool_call_id'."),
    ({"model": "m", "messages": [{"role": "function", "content": "x"}]}, "messages[0].role", None),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", None),
    ({"model": "m", "messages": USER, "temperature": "hot"}, "temperature",
     "Invalid type for 'temperature': expected a number, but got a string instead."),
    ({"model": "m", "messages": USER, "max_tokens": "5"}, "max_tokens", None),
    ({"model": "m", "messages": USER, "top_k": 51}, "top_k",
     "Invalid 'top_k': expected a value <= 50, but got 51 instead."),
    ({"model": "m", "messages": USER, "seed": 0}, "seed", None),
    ({"model": "m", "messages": USER, "lora_scale": 11}, "lora_scale", None),
    ({"model": "m", "messages": USER, "stream": "yes"}, "stream", None),
    ({"model": "m", "messages": USER, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage",
     None),
    ({"model": "m", "messages": USER, "logprobs": "yes"}, "logprobs", None),
    ({"model": "m", "messages": USER, "top_logprobs": 3}, "top_logprobs",
     "Invalid 'top_logprobs': logprobs must be set to true when top_logprobs is given."),
    ({"model": "m", "messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "Invalid 'top_logprobs': expected a value <= 20, but got 21 instead."),
    ({"model": "m", "messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0].function.name", None),
    ({"model": "m", "messages": USER, "response_format": {"type": "json_objekt"}}, "response_format", None),
    ({"model": "m", "messages": USER, "logit_bias": {"50256": -100}}, "logit_bias", None),
])
def test_openai_chat_errors_name_the_param(obj, param, message):
    err = openai_error(parse_chat_completion, obj)
    assert err.param == param, err.message
    if message is not None:
        assert err.message == message
    assert err.openai_body()["error"]["param"] == param


def test_openai_completion_only_options_are_refused():
    for extra in ({"echo": True}, {"best_of": 3}, {"suffix": "end"}, {"top_logprobs": 2}):
        err = openai_error(parse_completion, {"model": "m", "prompt": "p", **extra})
        assert err.param == next(iter(extra))


def test_logprobs_become_the_number_of_alternatives():
    chat = {"model": "m", "messages": USER}
    assert parse_chat_completion(json.dumps(chat).encode())[1].params.logprobs is None
    assert parse_chat_completion(json.dumps({**chat, "logprobs": False}).encode())[1].params.logprobs is None
    assert parse_chat_completion(json.dumps({**chat, "logprobs": True}).encode())[1].params.logprobs == 0
    both = {**chat, "logprobs": True, "top_logprobs": 20}
    assert parse_chat_completion(json.dumps(both).encode())[1].params.logprobs == 20
    completion = {"model": "m", "prompt": "p"}
    assert parse_completion(json.dumps({**completion, "logprobs": 5}).encode())[1].params.logprobs == 5
    assert parse_completion(json.dumps({**completion, "logprobs": 0}).encode())[1].params.logprobs == 0
    assert parse_completion(json.dumps({**completion, "logprobs": None}).encode())[1].params.logprobs is None


@pytest.mark.parametrize("raw", [b"", b"nope", b"[]", b'"x"'])
def test_openai_not_a_json_object(raw):
    for parse in (parse_chat_completion, parse_completion):
        err = openai_error(parse, raw)
        assert err.param is None and "not a JSON object" in err.openai_body()["error"]["message"]


def test_openai_content_length_cap_is_optional():
    long = [{"role": "user", "content": "x" * 10_000}]
    assert parse_chat_completion(body({"model": "m", "messages": long}))[1].messages == tuple(long)
    with pytest.raises(ApiError) as info:
        parse_chat_completion(body({"model": "m", "messages": long}), max_length=4096)
    assert info.value.param == "messages[0].content"
