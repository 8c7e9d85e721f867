"""ApiError and the error envelopes of both dialects.

Owns one exception type carrying a Workers AI internal code, an HTTP status and a message, and how
it is rendered: Workers AI's v4 envelope (`{"result": {}, "success": false, "errors": [{code,
message}], "messages": []}`) or OpenAI's `{"error": {message, type, param, code}}`. The helpers build
the Workers AI message texts seen in the wild (`AiError: Bad input: ...`, `AiError: AiError: Finetune
... not found`, `AiError: Ai: The estimated number ...`).

Statuses: nothing a caller got wrong is answered with 409, 429 or 5xx, because the Cloudflare and
OpenAI SDKs retry those (bad input is 400, an unknown finetune 404, too large / context window 413).
429 is kept for a busy server (`rejectIfBusy`), 500 for a failed step, 503 for an engine that is down.

Knows nothing of HTTP framework objects, the engine, the KV cache or adapters: plain data in, dicts out.
"""

from __future__ import annotations

# OpenAI's `error.type` by HTTP status.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# OpenAI's `error.code` where OpenAI has an analogue of the Workers AI code; any other code is
# passed on as the Workers AI code in a string ("5006", "3039"), so clients can still switch on it.
_OPENAI_CODES = {
    5021: "context_length_exceeded",
    10000: "invalid_api_key",
    5007: "model_not_found",
    3037: "model_not_found",
    404: "model_not_found",
    3006: "request_too_large",
    3036: "rate_limit_exceeded",
    3040: "rate_limit_exceeded",
}

_WORKERS_AI_PREFIXES = ("AiError: ", "Ai: ")


class ApiError(Exception):
    """A request refused with Workers AI code `code` and HTTP status `status`.

    `message` is kept exactly as constructed (the helpers below build the Workers AI text);
    `param` names the offending request field, for OpenAI's `error.param`.
    """

    def __init__(self, code: int, status: int, message: str, *, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"ApiError(code={self.code}, status={self.status}, message={self.message!r}, param={self.param!r})"

    def __reduce__(self):
        # picklable (an engine replica in another process raises it): rebuilt with the keyword too
        return _api_error, (self.code, self.status, self.message, self.param)

    def workers_ai_body(self, request_id: str | None = None) -> dict:
        """The v4 error envelope; `result` is `{}`, not null, as Workers AI sends it.

        With `request_id`, `AiError` messages end in ` (<request id>)` as newer Workers AI messages
        do; the generic Cloudflare v4 errors (authentication, routing) never carry it.
        """
        message = _encodable(self.message)
        if request_id and message.startswith("AiError"):
            message = f"{message} ({request_id})"
        return {"result": {}, "success": False, "errors": [{"code": self.code, "message": message}], "messages": []}

    def openai_body(self) -> dict:
        """OpenAI's error object. Workers AI's `AiError: ` / `Ai: ` prefixes are dropped from the message."""
        message = _encodable(self.message)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WORKERS_AI_PREFIXES:
                if message.startswith(prefix):
                    message, stripped = message[len(prefix):], True
        if self.status >= 500:
            kind = "api_error"
        else:
            kind = _OPENAI_TYPES.get(self.status, "invalid_request_error")
        code = _OPENAI_CODES.get(self.code, str(self.code))
        return {"error": {"message": message, "type": kind, "param": _encodable(self.param), "code": code}}


def _encodable(text: str | None) -> str | None:
    # Messages echo what the client sent, which may hold a lone UTF-16 surrogate (JSON allows the escape
    # "\udfff"); no UTF-8 body can carry one, so it is shown as that escape instead.
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_input(detail: str, param: str | None = None) -> ApiError:
    """5006 / 400: the request body breaks the input schema."""
    return ApiError(5006, 400, f"AiError: Bad input: {detail}", param=param)


def no_such_model(model: str) -> ApiError:
    """5007 / 400, Workers AI's official text."""
    return ApiError(5007, 400, f"No such model {model} or task", param="model")


def finetune_not_found(name: str) -> ApiError:
    """3037 / 404: no finetune of that id or name for this account (nor a public one)."""
    return ApiError(3037, 404, f"AiError: AiError: Finetune {name} not found", param="lora")


def finetune_missing_files() -> ApiError:
    """3039 / 400, Workers AI's official text (it names the assets by their internal names)."""
    return ApiError(3039, 400, "AiError: AiError: Finetune is missing required files "
                               "(model.safetensors and config.json)", param="lora")


def context_window(estimated: int, limit: int) -> ApiError:
    """5021 / 413: prompt tokens + max_tokens exceed the model's context window."""
    return ApiError(5021, 413, "AiError: Ai: The estimated number of input and maximum output tokens "
                               f"({estimated}) exceeded this model context window limit ({limit}).")


def budget_too_small(needed: int, field: str) -> ApiError:
    """5006 / 400: max_tokens is below what the shortest output following `field` (a JSON schema, JSON mode,
    tool calls) takes, so no valid answer fits. The one error for an unmeetable output format, on both
    dialects and both ai/run forms."""
    return ApiError(5006, 400, f"AiError: Bad input: '/max_tokens' must be >= {needed}: the shortest output "
                               f"that {field} allows takes {needed} tokens", param="max_tokens")


def output_cut(field: str, why: str) -> ApiError:
    """5006 / 400: a constrained output was ended before it was complete (by a stop string): no 200 ever
    carries invalid output."""
    return ApiError(5006, 400, f"AiError: Bad input: the output could not follow {field}: it ended ({why}) "
                               "before it was complete", param="stop")


def request_too_large(detail: str | None = None) -> ApiError:
    """3006 / 413, Workers AI's official text (and what was too large)."""
    return ApiError(3006, 413, f"Request is too large: {detail}" if detail else "Request is too large")


def capacity_exceeded() -> ApiError:
    """3040 / 429, Workers AI's answer to `options.rejectIfBusy` when requests are already queued."""
    return ApiError(3040, 429, "Capacity temporarily exceeded, please try again.")


def auth_error() -> ApiError:
    """10000 / 401: a missing or unknown API token (the generic Cloudflare v4 answer)."""
    return ApiError(10000, 401, "Authentication error")


def _api_error(code: int, status: int, message: str, param: str | None) -> ApiError:
    return ApiError(code, status, message, param=param)
