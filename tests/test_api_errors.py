"""The error envelopes of both dialects (gemlora.api.errors): exact shapes, codes, statuses and texts, and
that no refusal is a status the SDKs retry. Pure, fast, no engine and no HTTP."""

from __future__ import annotations

import json

import pytest

from gemlora.api.errors import (ApiError, auth_error, bad_input, context_window, finetune_missing_files,
                                finetune_not_found, no_such_model, request_too_large)
from gemlora.api.schemas import parse_run_body


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def test_workers_ai_envelope_exact_shape():
    err = bad_input("'/top_k' must be <= 50", "/top_k")
    assert err.workers_ai_body() == {
        "result": {}, "success": False, "messages": [],
        "errors": [{"code": 5006, "message": "AiError: Bad input: '/top_k' must be <= 50"}]}
    assert json.loads(json.dumps(err.workers_ai_body())) == err.workers_ai_body()


def test_workers_ai_envelope_with_request_id():
    err = finetune_not_found("3dd75f75")
    assert err.workers_ai_body("63371b53")["errors"] == [
        {"code": 3037, "message": "AiError: AiError: Finetune 3dd75f75 not found (63371b53)"}]
    # Generic Cloudflare errors never carry the request id.
    assert auth_error().workers_ai_body("63371b53")["errors"] == [{"code": 10000, "message": "Authentication error"}]


def test_openai_envelope_exact_shape():
    err = ApiError(5006, 400, "Invalid 'n': only n=1 is supported, got 2.", param="n")
    assert err.openai_body() == {"error": {"message": "Invalid 'n': only n=1 is supported, got 2.",
                                           "type": "invalid_request_error", "param": "n", "code": "5006"}}
    assert context_window(4000, 3500).openai_body() == {"error": {
        "message": "The estimated number of input and maximum output tokens (4000) exceeded this model context "
                   "window limit (3500).",
        "type": "invalid_request_error", "param": None, "code": "context_length_exceeded"}}
    assert auth_error().openai_body() == {"error": {"message": "Authentication error", "type": "authentication_error",
                                                    "param": None, "code": "invalid_api_key"}}
    assert finetune_not_found("ft").openai_body() == {"error": {"message": "Finetune ft not found",
                                                                "type": "not_found_error", "param": "lora",
                                                                "code": "model_not_found"}}
    assert ApiError(7000, 500, "boom").openai_body()["error"]["type"] == "api_error"


def test_helpers_codes_statuses_and_texts():
    cases = {
        bad_input("x"): (5006, 400, "AiError: Bad input: x"),
        no_such_model("@cf/meta/llama"): (5007, 400, "No such model @cf/meta/llama or task"),
        finetune_not_found("abc"): (3037, 404, "AiError: AiError: Finetune abc not found"),
        finetune_missing_files(): (3039, 400, "AiError: AiError: Finetune is missing required files "
                                              "(model.safetensors and config.json)"),
        context_window(263008, 262144): (5021, 413, "AiError: Ai: The estimated number of input and maximum output "
                                                    "tokens (263008) exceeded this model context window limit "
                                                    "(262144)."),
        request_too_large(): (3006, 413, "Request is too large"),
        auth_error(): (10000, 401, "Authentication error"),
    }
    for err, (code, status, message) in cases.items():
        assert (err.code, err.status, err.message, str(err)) == (code, status, message, message)
        # The SDKs retry 409, 429 and 5xx; nothing a caller got wrong may be answered with them.
        assert status != 409 and status != 429 and status < 500
    assert bad_input("x", "top_k").param == "top_k"


def test_every_parse_error_is_a_non_retryable_status():
    bodies = [b"", b"{}", body({"prompt": "hi", "top_k": 99}), body({"messages": [{"role": "x", "content": "y"}]})]
    for raw in bodies:
        with pytest.raises(ApiError) as info:
            parse_run_body(raw)
        assert info.value.status == 400
