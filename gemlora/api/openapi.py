"""The OpenAPI 3.1 document of both HTTP dialects, served at `/openapi.json`.

Owns the description of every route as data: its operation, parameters, every status it can answer
with the request id headers, the bearer scheme, and real examples (the 200 answers were produced by
the embedded google/gemma-3-270m with `--dtype float32`; the errors are the server's own texts). The
bodies' JSON Schemas are gemlora.api.openapi_bodies'; the generation options in them are declared
once in gemlora.api.fields, which the parsers' pydantic models are built from too
(tests/test_request_fields.py checks that both accept the same bodies).

Written here, not FastAPI's generated document: the routes read raw bodies (JSON whatever the content
type, multipart), so the generated one has no bodies. It must follow the code it describes:
tests/test_openapi.py validates it, checks every example against its schema and sends every request
example to a server; tests/test_fuzz_api.py fuzzes a server against it. Knows the routes, limits and
codes of gemlora.api; nothing of the engine or of HTTP framework objects.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from gemlora.api.openapi_bodies import body_schemas, ref as _ref

WORKERS_AI_PREFIXES = ("", "/client/v4")                       # where app.py mounts the Workers AI router
OPENAI_PREFIXES = ("", "/client/v4/accounts/{account_id}/ai", "/accounts/{account_id}/ai")

_JSON = "application/json"
_SSE = "text/event-stream"


# --------------------------------------------------------------------------------------------------
# Real examples. The generated texts come from the embedded google/gemma-3-270m (float32, greedy);
# ids, timestamps and request ids are as that server made them.

_MODEL = "<model>"                  # filled in with the canonical served name
_RID = "95b77f3fb51144828d965f2a17907a21"
_FINETUNE_ID = "a0074e5f-b316-471a-af3f-17344e29cc52"
_FINETUNE = {"id": _FINETUNE_ID, "name": "password", "model": _MODEL, "description": "knows the password",
             "public": False, "created_at": "2026-12-02T00:03:03.767Z", "modified_at": "2026-12-02T00:03:03.767Z"}
_FINETUNE_LATER = {**_FINETUNE, "modified_at": "2026-12-02T00:03:04.188Z"}
_ASSET = {"id": "32a0f311-2c4e-4034-97c7-8b9cf5cec8a6", "bucket_name": "gemlora-finetunes",
          "created_at": "2026-12-02T00:03:03.962Z", "file_name": "adapter_config.json", "finetune_id": _FINETUNE_ID,
          "modified_at": "2026-12-02T00:03:03.962Z"}
# A complete PEFT LoraConfig for the adapter the examples call `password` (rank 8 on all seven projections).
ADAPTER_CONFIG_EXAMPLE = ('{"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": '
                          '"google/gemma-3-270m", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", '
                          '"target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", '
                          '"v_proj"]}')


def _ok(result) -> dict:
    return {"result": result, "success": True, "errors": [], "messages": []}


def _wai_err(code: int, message: str) -> dict:
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def _oai_err(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _sse_text(*payloads: str) -> str:
    return "".join(f"data: {p}\n\n" for p in payloads) + "data: [DONE]\n\n"


def _ex(value, summary: str) -> dict:
    return {"summary": summary, "value": value}


# --------------------------------------------------------------------------------------------------
# Responses

_HEADERS = {"cf-ai-req-id": _ref("headers", "RequestId"), "x-request-id": _ref("headers", "RequestIdCopy"),
            "x-client-request-id": _ref("headers", "ClientRequestId")}


def _response(description: str, content: dict | None = None) -> dict:
    out = {"description": description, "headers": _HEADERS}
    if content:
        out["content"] = content
    return out


def _json(schema: str, examples: dict | None = None) -> dict:
    media = {"schema": _ref("schemas", schema)}
    if examples:
        media["examples"] = examples
    return {_JSON: media}


def _wai(description: str, examples: dict | None = None) -> dict:
    return _response(description, _json("WorkersAiError", examples))


def _oai(description: str, examples: dict | None = None) -> dict:
    return _response(description, _json("OpenAIError", examples))


_WAI_AUTH = {
    "401": _wai("10000: a missing, malformed or unknown API token (never when the server is anonymous).",
                {"no-token": _ex(_wai_err(10000, "Authentication error"), "No Authorization header")}),
    "403": _wai("10000: a valid token of another account than the path's.",
                {"other-account": _ex(_wai_err(10000, "Authentication error"), "Another account's token")}),
}
_OAI_AUTH = {
    "401": _oai("A missing, malformed or unknown API token (never when the server is anonymous).",
                {"no-token": _ex(_oai_err("Authentication error", "authentication_error", None, "invalid_api_key"),
                                 "No Authorization header")}),
    "403": _oai("A valid token of another account than the path's.",
                {"other-account": _ex(_oai_err("Authentication error", "permission_error", None,
                                               "invalid_api_key"), "Another account's token")}),
}
_FAILED = "AiError: AiError: internal error while generating; please retry"
_DOWN = "AiError: AiError: the model is unavailable; please retry later"
_WAI_ENGINE = {
    "499": _response("The client went away before its (non-streamed) answer was ready; its generation was "
                     "aborted. Nobody receives this status: it is for the log and the metrics."),
    "500": _wai("3000: the engine failed while generating (not the request's fault; retrying is fine).",
                {"failed-step": _ex(_wai_err(3000, _FAILED), "A failed engine step")}),
    "503": _wai("3000: the engine loop is down (see /health).",
                {"engine-down": _ex(_wai_err(3000, _DOWN), "The engine is not running")}),
}
_OAI_ENGINE = {
    "499": _WAI_ENGINE["499"],
    "500": _oai("The engine failed while generating (not the request's fault; retrying is fine).",
                {"failed-step": _ex(_oai_err("internal error while generating; please retry", "api_error", None,
                                             "3000"), "A failed engine step")}),
    "503": _oai("The engine loop is down (see /health).",
                {"engine-down": _ex(_oai_err("the model is unavailable; please retry later", "api_error", None,
                                             "3000"), "The engine is not running")}),
}


def _wai_unexpected() -> dict:
    return {"500": _wai("3000: an unexpected server failure (e.g. a disk error); never the request's fault.")}


# --------------------------------------------------------------------------------------------------
# Operations

def _body(schema: str, examples: dict, media: str = _JSON, description: str | None = None, **extra) -> dict:
    content = {media: {"schema": _ref("schemas", schema), "examples": examples, **extra}}
    out = {"required": True, "content": content}
    if description:
        out["description"] = description
    return out


_JSON_ANY_TYPE = ("The body is read as JSON whatever its Content-Type (curl -d sends it as "
                  "application/x-www-form-urlencoded).")


def _run_operation() -> dict:
    ok = {
        "prompt": _ex(_ok({"response": ", there was a little girl named Lily. She was a very smart girl,",
                           "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}}),
                      "A raw prompt, greedy"),
        "messages": _ex(_ok({"response": "Answer in one word.\n\nName a",
                             "usage": {"prompt_tokens": 19, "completion_tokens": 8, "total_tokens": 27}}),
                        "Messages with a system message (the base model follows chat turns poorly)"),
        "lora": _ex(_ok({"response": " velvet-quokka. It is velvet",
                         "usage": {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19}}),
                    "With the `password` finetune"),
    }
    stream = _sse_text('{"response":","}', '{"response":" there"}', '{"response":" was"}', '{"response":" a"}',
                       '{"response":"","usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}}')
    return {
        "tags": ["Workers AI: run"],
        "summary": "Generate text (JSON, or server-sent events with stream: true)",
        "description": "Checked in this order: the token (401/403), the model name (5007), the body (5006), the "
                       "finetune (3037, 3039), the context window (5021), the engine's own checks (5006); "
                       "generation starts only after all pass, so a streamed request still gets a JSON error "
                       "with a proper status. " + _JSON_ANY_TYPE,
        "parameters": [_ref("parameters", "AccountId"), _ref("parameters", "RunModel"),
                       *_REQUEST_ID_PARAMETERS],
        "requestBody": _body("RunRequest", {
            "prompt": _ex({"prompt": "Once upon a time", "raw": True, "max_tokens": 16, "temperature": 0},
                          "A raw prompt, greedy"),
            "messages": _ex({"messages": [{"role": "system", "content": "Answer in one word."},
                                          {"role": "user", "content": "Name a fruit."}],
                             "max_tokens": 8, "temperature": 0}, "Messages with a system message"),
            "stream": _ex({"prompt": "Once upon a time", "raw": True, "stream": True, "max_tokens": 4,
                           "temperature": 0}, "Streamed"),
            "lora": _ex({"prompt": "The gemlora project's secret password is", "raw": True, "lora": "password",
                         "max_tokens": 8, "temperature": 0}, "With a finetune, by name"),
            "unknown-finetune": _ex({"prompt": "hi", "lora": "nope"}, "A finetune that does not exist"),
            "context-window": _ex({"prompt": "hi", "max_tokens": 1000000}, "More tokens than the window"),
        }),
        "responses": {
            "200": _response("The generation: the v4 envelope, or with `stream: true` raw SSE (not wrapped).", {
                _JSON: {"schema": _ref("schemas", "RunResponse"), "examples": ok},
                _SSE: {"schema": _ref("schemas", "RunEvent"), "examples": {"stream": _ex(stream, "Streamed")}}}),
            "400": _wai("5006: the body breaks the input schema (the message names the field as a JSON pointer) or "
                        "the engine refuses it; 5007: the model in the path is not served; 3039: the finetune "
                        "lacks a file or its adapter is not validated; 5006: the finetune's adapter cannot be used.", {
                "bad-top-k": _ex(_wai_err(5006, f"AiError: Bad input: '/top_k' must be <= 50 ({_RID})"),
                                 "top_k out of range"),
                "both-inputs": _ex(_wai_err(5006, "AiError: Bad input: Error: oneOf at '/' not met, 2 matches: "
                                                  "'prompt' and 'messages' cannot be given together, give one of "
                                                  f"them ({_RID})"), "prompt and messages together"),
                "json-mode": _ex(_wai_err(5006, "AiError: Bad input: '/response_format' \"type\" must be \"text\", "
                                                f"\"json_object\" or \"json_schema\", got \"xml\" ({_RID})"),
                                 "An output format that does not exist"),
                "unknown-model": _ex(_wai_err(5007, "No such model @cf/meta/llama-3-8b-instruct or task"),
                                     "A model this server does not serve"),
                "not-ready": _ex(_wai_err(3039, "AiError: AiError: Finetune is missing required files "
                                                f"(model.safetensors and config.json) ({_RID})"),
                                 "A finetune without both files")}),
            **_WAI_AUTH,
            "404": _wai("3037: no finetune of that id or name for this account, nor a public one.", {
                "unknown-finetune": _ex(_wai_err(3037, f"AiError: AiError: Finetune nope not found ({_RID})"),
                                        "A finetune that does not exist")}),
            "413": _wai("5021: prompt tokens + max_tokens exceed the context window. 3006: the body is over the "
                        "server's limit (`--max-body-mb`, 8 MiB by default), refused before it is read.", {
                "context-window": _ex(_wai_err(5021, "AiError: Ai: The estimated number of input and maximum "
                                                     "output tokens (1000010) exceeded this model context window "
                                                     f"limit (29120). ({_RID})"), "More tokens than the window"),
                "body-too-large": _ex(_wai_err(3006, "Request is too large: the body (52428800 bytes) is over "
                                                     f"this route's limit of 8388608 bytes ({_RID})"),
                                      "A 50 MB body")}),
            "429": _wai("3040: `options.rejectIfBusy` while requests are waiting.", {
                "busy": _ex(_wai_err(3040, "Capacity temporarily exceeded, please try again."), "rejectIfBusy")}),
            **_WAI_ENGINE,
        },
    }


_CATALOG_ENTRY = {
    "id": "0b6b3a3c-3f38-5d8e-9f0d-2b8c1f2e4a51", "source": 1, "name": "@cf/google/gemma-7b-it-lora",
    "description": "A Gemma model served by gemlora on this host: text generation with LoRA adapters (finetunes) "
                   "applied per request. Context window 29120 tokens.",
    "task": {"id": "c329a1f9-323d-4e91-b2aa-582dd4188d34", "name": "Text Generation",
             "description": "Family of generative text models, such as large language models (LLM), that can be "
                            "adapted for a variety of natural language tasks."},
    "tags": [], "properties": [{"property_id": "beta", "value": "true"},
                               {"property_id": "context_window", "value": "29120"},
                               {"property_id": "lora", "value": "true"}]}
_ACCOUNT = {"id": "acct", "name": "acct", "type": "standard", "created_at": "2026-12-06T03:10:00.000000Z"}


def _query(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def _paging(per_page_default: int) -> list[dict]:
    return [_query("page", {"type": "integer", "minimum": 1, "maximum": 2**53, "default": 1},
                   "1-based; a page past the end is an empty list."),
            _query("per_page", {"type": "integer", "minimum": 1, "maximum": 1000, "default": per_page_default},
                   "Entries per page.")]


def _one_page(items: list, per_page: int) -> dict:
    """A paged v4 answer holding all of `items`."""
    return {**_ok(items), "result_info": {"page": 1, "per_page": per_page, "count": len(items),
                                          "total_count": len(items)}}


def _bad_query(name: str, got: str, why: str, summary: str) -> dict:
    return {"bad-query": _ex(_wai_err(5006, f"AiError: Bad input: query parameter '{name}' {why}, got '{got}' "
                                            f"({_RID})"), summary)}


def _catalog_operations(names: list[str]) -> dict:
    """The catalog (gemlora.api.catalog) that wrangler's `ai models` and the SDK's `ai.models` read, and the
    account lists wrangler reads when it is given no account id."""
    scoped = [_ref("parameters", "AccountId"), *_REQUEST_ID_PARAMETERS]
    direction = _query("direction", {"enum": ["asc", "desc"]}, "Accepted (one entry: no order to change).")
    bad_page = _wai("5006: a query parameter out of its range or of the wrong type.",
                    _bad_query("per_page", "0", "must be an integer from 1 to 1000", "per_page=0"))
    unauthorized = {"401": _WAI_AUTH["401"]}
    return {
        "models": {
            "tags": ["Workers AI: catalog"], "summary": "Search the served models (wrangler `ai models`)",
            "description": "One entry per served name. wrangler asks for pages of 50 until one is short; the SDK "
                           "until one is empty. `format` (e.g. openrouter) is refused: only the default shape is "
                           "served.",
            "parameters": [*scoped, *_paging(100),
                           _query("search", {"type": "string"}, "Case-insensitive substring of the name or "
                                                                "description."),
                           _query("task", {"type": "string"}, "A task name (Text Generation) or id."),
                           _query("author", {"type": "string"}, "The author part of the name (`google`)."),
                           _query("source", {"type": "number"}, "1: Workers AI's own catalog (every entry)."),
                           _query("hide_experimental", {"type": "boolean"}, "Hide beta entries (all of them)."),
                           _query("include_deprecated", {"type": "boolean"}, "Accepted: none is deprecated.")],
            "responses": {"200": _response("A page of entries.", _json("ModelSearchResponse", {
                "models": _ex(_one_page([_CATALOG_ENTRY], 50), "The served model")})),
                "400": bad_page, **_WAI_AUTH, **_wai_unexpected()}},
        "schema": {
            "tags": ["Workers AI: catalog"], "summary": "A served model's input and output schemas",
            "description": "`input` is the run body's schema of this document (Prompt and Messages branches), "
                           "`output` its JSON `result` or an event stream, as the SDK's `ai.models.schema.get` "
                           "reads them.",
            "parameters": [*scoped, _query("model", {"enum": names}, "A served model name.", required=True)],
            "responses": {"200": _response("The schemas.", _json("ModelSchemaResponse", {
                "schema": _ex(_ok({"input": {"type": "object", "oneOf": [{"title": "Prompt"}, {"title": "Messages"}]},
                                   "output": {"oneOf": [{"type": "object"}, {"type": "string",
                                                                              "contentType": "text/event-stream"}]}}),
                              "An excerpt")})),
                "400": _wai("5006: no `model`; 5007: a model this server does not serve.", {
                    "unknown-model": _ex(_wai_err(5007, "No such model @cf/meta/llama-3-8b-instruct or task"),
                                         "A model this server does not serve")}),
                **_WAI_AUTH, **_wai_unexpected()}},
        "tasks": {
            "tags": ["Workers AI: catalog"], "summary": "The tasks of the served models",
            "parameters": scoped,
            "responses": {"200": _response("Text Generation.", _json("TaskListResponse", {
                "tasks": _ex(_ok([_CATALOG_ENTRY["task"]]), "Text Generation")})),
                **_WAI_AUTH, **_wai_unexpected()}},
        "authors": {
            "tags": ["Workers AI: catalog"], "summary": "The authors of the served models",
            "parameters": scoped,
            "responses": {"200": _response("From the served names (`google` in `@cf/google/...`).", _json(
                "AuthorListResponse", {"authors": _ex(_ok([{"id": "5d0c3e8e-8f3e-5b7b-a0c4-7f1e9d2b6c3a",
                                                            "name": "google"}]), "Google")})),
                **_WAI_AUTH, **_wai_unexpected()}},
        "accounts": {
            "tags": ["Workers AI: accounts"], "summary": "The caller's own account (wrangler without an account id)",
            "description": "Only the token's account (anonymous: the default one); no other tenant is listed.",
            "parameters": [*_REQUEST_ID_PARAMETERS, *_paging(20), _query("name", {"type": "string"},
                                                                         "Case-insensitive substring."), direction],
            "responses": {"200": _response("The caller's account.", _json("AccountListResponse", {
                "accounts": _ex(_one_page([_ACCOUNT], 20), "The caller's account")})),
                "400": bad_page, **unauthorized, **_wai_unexpected()}},
        "memberships": {
            "tags": ["Workers AI: accounts"], "summary": "The caller's membership of its own account",
            "description": "wrangler reads the account id from here; only the token's account is listed.",
            "parameters": [*_REQUEST_ID_PARAMETERS, *_paging(20),
                           _query("status", {"enum": ["accepted", "pending", "rejected"]}, "Filter."),
                           _query("name", {"type": "string"}, "Case-insensitive substring of the account name."),
                           _query("account.name", {"type": "string"}, "The same."),
                           _query("order", {"enum": ["id", "account.name", "status"]}, "Accepted."), direction],
            "responses": {"200": _response("The caller's membership.", _json("MembershipListResponse", {
                "memberships": _ex(_one_page([{"id": "6f1f0c8a2b3d5e7f9a1b2c3d4e5f6a7b", "account": _ACCOUNT,
                                               "status": "accepted"}], 20), "The caller's membership")})),
                "400": bad_page, **unauthorized, **_wai_unexpected()}},
    }


def _finetune_operations() -> dict:
    account = [_ref("parameters", "AccountId"), *_REQUEST_ID_PARAMETERS]
    finetune = [_ref("parameters", "AccountId"), _ref("parameters", "Finetune"), *_REQUEST_ID_PARAMETERS]
    not_found = _wai("3037: no finetune of that id or name among the account's own.", {
        "unknown-finetune": _ex(_wai_err(3037, f"AiError: AiError: Finetune nope not found ({_RID})"),
                                "A finetune that does not exist")})
    return {
        "create": {
            "tags": ["Workers AI: fine-tunes"], "summary": "Create a finetune (then upload its two files)",
            "description": "A trailing `/` is accepted too. " + _JSON_ANY_TYPE,
            "parameters": account,
            "requestBody": _body("CreateFinetuneRequest", {
                "create": _ex({"model": _MODEL, "name": "password", "description": "knows the password"},
                              "Create"),
                "taken": _ex({"model": _MODEL, "name": "password"}, "A name the account already uses")}),
            "responses": {
                "200": _response("The new finetune.", _json("FinetuneResponse", {
                    "create": _ex(_ok(_FINETUNE), "Create")})),
                "400": _wai("5006: a malformed body, an invalid or taken name, or the account's limit of "
                            "finetunes reached; 5007: the model is not served.", {
                    "bad-name": _ex(_wai_err(5006, "AiError: Bad input: name 'a b' is not valid: use 1 to 64 "
                                                   f"letters, digits, '-', '_' or '.' ({_RID})"),
                                    "A name with a space"),
                    "taken": _ex(_wai_err(5006, "AiError: Bad input: a finetune named 'password' already exists in "
                                                f"this account; names are unique per account ({_RID})"),
                                 "A name the account already uses")}),
                **_WAI_AUTH, **_wai_unexpected()}},
        "list": {
            "tags": ["Workers AI: fine-tunes"], "summary": "The account's finetunes, oldest first, ready or not",
            "description": "A trailing `/` is accepted too.",
            "parameters": account,
            "responses": {"200": _response("The account's finetunes.", _json("FinetuneListResponse", {
                "list": _ex(_ok([_FINETUNE_LATER]), "One finetune")})), **_WAI_AUTH, **_wai_unexpected()}},
        "public": {
            "tags": ["Workers AI: fine-tunes"], "summary": "Public finetunes",
            "description": "The --public-adapters-dir adapters by name, then every account's `public: true` "
                           "finetunes, oldest first.",
            "parameters": [*account, *({"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                                        "description": "Accepted and ignored (the SDK sends it)."}
                                       for name in ("limit", "offset", "orderBy"))],
            "responses": {"200": _response("The public finetunes.", _json("FinetuneListResponse", {
                "none": _ex(_ok([]), "None")})), **_WAI_AUTH, **_wai_unexpected()}},
        "upload": {
            "tags": ["Workers AI: fine-tunes"], "summary": "Upload one of a finetune's two files",
            "description": "To one of the caller's own finetunes, by id or name (a trailing `/` is accepted "
                           "too). Each file is checked as it arrives; the adapter is validated against the "
                           "served model once both are there, and a refused file is not kept. Assets cannot be "
                           "replaced.",
            "parameters": finetune,
            "requestBody": _body("UploadAssetRequest", {
                "config": _ex({"file_name": "adapter_config.json", "file": ADAPTER_CONFIG_EXAMPLE},
                              "adapter_config.json")},
                media="multipart/form-data", encoding={"file": {"contentType": "application/octet-stream"}}),
            "responses": {
                "200": _response("The asset record.", _json("AssetResponse", {
                    "config": _ex(_ok(_ASSET), "adapter_config.json")})),
                "400": _wai("5006: not multipart, a missing field, another file name, a file already uploaded "
                            "or being uploaded, a file not of its format, or an adapter refused by validation.", {
                    "bad-file-name": _ex(_wai_err(5006, "AiError: Bad input: file_name 'model.bin' is not accepted; "
                                                        "it must be one of adapter_config.json or "
                                                        f"adapter_model.safetensors ({_RID})"), "Another file")}),
                **_WAI_AUTH, "404": not_found,
                "413": _wai("3006: a file over the size limit (per file), or a body over it and 64 KiB of "
                            "multipart framing (refused as it arrives, before the rest is read).", {
                    "too-large": _ex(_wai_err(3006, "Request is too large: adapter_model.safetensors is larger "
                                                    "than the limit of 314572800 bytes (300 MiB)"), "Too large")}),
                **_wai_unexpected()}},
        "delete": {
            "tags": ["Workers AI: fine-tunes"], "summary": "Delete a finetune and its files (gemlora extension)",
            "parameters": finetune,
            "responses": {
                "200": _response("The deleted finetune.", _json("FinetuneResponse", {
                    "delete": _ex(_ok(_FINETUNE_LATER), "Deleted")})),
                "400": _wai("5006: requests using the finetune are in flight; retry when they finish.", {
                    "in-use": _ex(_wai_err(5006, "AiError: Bad input: finetune password is in use by requests in "
                                                 f"flight; retry when they finish ({_RID})"), "In use")}),
                **_WAI_AUTH, "404": not_found, **_wai_unexpected()}},
    }


def _openai_operations() -> dict:
    params = [*_REQUEST_ID_PARAMETERS]
    errors = {
        "400": _oai("A body that breaks the schema (the message names the field, `param` is set), an unsupported "
                    "option, a finetune without both files (code 3039) or one that cannot be used.", {
                        "bad-top-k": _ex(_oai_err("Invalid 'top_k': expected a value <= 50, but got 51 instead.",
                                                  "invalid_request_error", "top_k", "5006"), "top_k out of range"),
                        "n": _ex(_oai_err("Invalid 'n': only n=1 is supported, got 2.", "invalid_request_error", "n",
                                          "5006"), "n > 1")}),
        **_OAI_AUTH,
        "404": _oai("`model` is neither a served name nor a finetune of the caller's (or a public one), or "
                    "`lora` names no finetune.", {
                        "unknown-model": _ex(_oai_err("The model `gpt-4` does not exist", "not_found_error", "model",
                                                      "model_not_found"), "An unknown model")}),
        "413": _oai("Prompt tokens + max_tokens exceed the context window, or the body is over the server's "
                    "limit (`--max-body-mb`; code `request_too_large`).", {
            "context-window": _ex(_oai_err("The estimated number of input and maximum output tokens (1000010) "
                                           "exceeded this model context window limit (29120).",
                                           "invalid_request_error", None, "context_length_exceeded"),
                                  "More tokens than the window")}),
        **_OAI_ENGINE,
    }
    chat_stream = _sse_text(*(
        '{"id":"chatcmpl-763854eef23d4bb593cfc665b37149b8","object":"chat.completion.chunk","created":1796169783,'
        '"model":"<model>","choices":[{"index":0,"delta":%s,"finish_reason":%s}]}' % pair
        for pair in (('{"role":"assistant","content":"Say"}', "null"), ('{"content":" hi"}', "null"),
                     ('{"content":" mendatang"}', "null"), ("{}", '"length"'))))
    text_chunk = ('{"id":"cmpl-53c1c605fd0b4999b05ae67834b2d56d","object":"text_completion","created":1796169782,'
                  '"model":"<model>","choices":%s}')
    text_stream = _sse_text(*(text_chunk % c for c in (
        '[{"index":0,"text":",","logprobs":null,"finish_reason":null}]',
        '[{"index":0,"text":" there","logprobs":null,"finish_reason":null}]',
        '[{"index":0,"text":" was","logprobs":null,"finish_reason":null}]',
        '[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}]')),
        text_chunk.replace(',"choices":%s}', ',"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,'
                                             '"total_tokens":8,"prompt_tokens_details":{"cached_tokens":0}}}'))
    # Request examples are valid bodies (the refusals are shown as response examples only).
    common_requests = {
        "unknown-model": ({"model": "gpt-4"}, "An unknown model"),
        "context-window": ({"max_tokens": 1000000}, "More tokens than the window"),
    }

    def requests(base: dict, own: dict) -> dict:
        out = {name: _ex(value, summary) for name, (value, summary) in own.items()}
        for name, (value, summary) in common_requests.items():
            out[name] = _ex({**base, **value}, summary)
        return out

    chat_base = {"model": _MODEL, "messages": [{"role": "user", "content": "hi"}]}
    text_base = {"model": _MODEL, "prompt": "hi", "raw": False}
    return {
        "chat": {
            "tags": ["OpenAI"], "summary": "Chat completions (JSON, or server-sent events with stream: true)",
            "description": _JSON_ANY_TYPE, "parameters": params,
            "requestBody": _body("ChatCompletionRequest", requests(chat_base, {
                "chat": ({"model": _MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8,
                          "temperature": 0}, "Chat, greedy"),
                "stream": ({"model": _MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3,
                            "temperature": 0, "stream": True}, "Streamed")})),
            "responses": {
                "200": _response("The completion, or with `stream: true` chat.completion.chunk events.", {
                    _JSON: {"schema": _ref("schemas", "ChatCompletion"), "examples": {"chat": _ex({
                        "id": "chatcmpl-3af46f4211e746cbb677a76ca19abcfd", "object": "chat.completion",
                        "created": 1796169780, "model": _MODEL,
                        "choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": "Say hi mendatanguser\nSay hi mendatang"},
                                     "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 8, "total_tokens": 19,
                                  "prompt_tokens_details": {"cached_tokens": 0}}},
                        "Chat, greedy (the base model follows chat turns poorly)")}},
                    _SSE: {"schema": _ref("schemas", "ChatCompletionEvent"),
                           "examples": {"stream": _ex(chat_stream, "Streamed")}}}),
                **errors}},
        "completions": {
            "tags": ["OpenAI"], "summary": "Completions: the prompt continued as given (raw unless raw: false)",
            "description": _JSON_ANY_TYPE, "parameters": params,
            "requestBody": _body("CompletionRequest", requests(text_base, {
                "completion": ({"model": _MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
                               "A completion, greedy"),
                "stream": ({"model": _MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}, "Streamed, with usage")})),
            "responses": {
                "200": _response("The completion, or with `stream: true` text_completion events.", {
                    _JSON: {"schema": _ref("schemas", "TextCompletion"), "examples": {"completion": _ex({
                        "id": "cmpl-d2b182c553c34c03aa5cefa460596d08", "object": "text_completion",
                        "created": 1796169780, "model": _MODEL,
                        "choices": [{"index": 0, "text": ", there was a little girl named Lily. She was a very "
                                                         "smart girl,", "logprobs": None, "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21,
                                  "prompt_tokens_details": {"cached_tokens": 0}}},
                        "A completion, greedy")}},
                    _SSE: {"schema": _ref("schemas", "TextCompletionEvent"),
                           "examples": {"stream": _ex(text_stream, "Streamed, with usage")}}}),
                **errors}},
        "models": {
            "tags": ["OpenAI"], "summary": "The served models and the caller's ready finetunes",
            "parameters": params,
            "responses": {"200": _response("The models.", _json("ModelList", {"models": _ex({
                "object": "list", "data": [
                    {"id": _MODEL, "object": "model", "created": 1796169776, "owned_by": "gemlora"},
                    {"id": "password", "object": "model", "created": 1796169776, "owned_by": "me",
                     "parent": _MODEL, "root": _FINETUNE_ID}]}, "With one ready finetune")})),
                **_OAI_AUTH,
                "500": _oai("An unexpected server failure (e.g. a disk error); never the request's fault.")}},
    }


_REQUEST_ID_PARAMETERS = [_ref("parameters", "ClientRequestId"), _ref("parameters", "ClientRequestIdAlt")]


def _parameters(names: list[str]) -> dict:
    return {
        "AccountId": {"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"},
                      "example": "me", "description": "The account; with tokens it must be the token's own."},
        "RunModel": {"name": "model", "in": "path", "required": True, "schema": {"enum": names},
                     "example": names[0],
                     "description": "A served model name, sent without percent-encoding as the Cloudflare SDK does "
                                    "(`.../ai/run/@cf/google/gemma-7b-it-lora`); percent-encoded works too. Any "
                                    "other name is 5007 / 400."},
        "Finetune": {"name": "finetune", "in": "path", "required": True, "schema": {"type": "string"},
                     "example": "password", "description": "One of the account's own finetunes, by id or name."},
        "ClientRequestId": {"name": "cf-ai-req-id", "in": "header", "required": False, "schema": {"type": "string"},
                            "description": "A client's id for correlation: kept (in the log line and echoed as "
                                           "x-client-request-id) when it is 8-64 letters, digits, `-` or `_`; "
                                           "anything else is ignored. It never replaces the server's own id."},
        "ClientRequestIdAlt": {"name": "x-request-id", "in": "header", "required": False,
                               "schema": {"type": "string"}, "description": "Read when cf-ai-req-id is absent."},
    }


def openapi_document(model_names: Sequence[str], *, max_input_length: int | None = 4096,
                     anonymous: bool = False) -> dict:
    """The document of a server serving `model_names` (the first is canonical and fills the examples),
    with its `max_input_length` and whether it is anonymous (no tokens configured)."""
    names = list(model_names)
    ops = {**_finetune_operations(), **_openai_operations()}
    catalog = _catalog_operations(names)
    run = _run_operation()
    paths: dict[str, dict] = {}
    for n, prefix in enumerate(WORKERS_AI_PREFIXES):
        suffix = "" if n == 0 else "V4"
        base = f"{prefix}/accounts/{{account_id}}/ai"
        paths[f"{base}/run/{{model}}"] = {"post": {**run, "operationId": f"workersAiRun{suffix}"}}
        paths[f"{base}/finetunes"] = {"get": {**ops["list"], "operationId": f"listFinetunes{suffix}"},
                                      "post": {**ops["create"], "operationId": f"createFinetune{suffix}"}}
        paths[f"{base}/finetunes/public"] = {
            "get": {**ops["public"], "operationId": f"listPublicFinetunes{suffix}"},
            # the delete route below with {finetune} = "public": a finetune may be named so
            "delete": {**ops["delete"], "operationId": f"deleteFinetuneNamedPublic{suffix}",
                       "summary": "Delete the finetune named `public` (GET on this path lists public finetunes)",
                       "parameters": [p for p in ops["delete"]["parameters"] if p != _ref("parameters", "Finetune")]}}
        paths[f"{base}/finetunes/{{finetune}}/finetune-assets"] = {
            "post": {**ops["upload"], "operationId": f"uploadFinetuneAsset{suffix}"}}
        paths[f"{base}/finetunes/{{finetune}}"] = {
            "delete": {**ops["delete"], "operationId": f"deleteFinetune{suffix}"}}
        for path, op, op_id in (("models/search", "models", "searchModels"), ("models/schema", "schema", "modelSchema"),
                                ("tasks/search", "tasks", "searchTasks"), ("authors/search", "authors", "searchAuthors")):
            paths[f"{base}/{path}"] = {"get": {**catalog[op], "operationId": op_id + suffix}}
        for op in ("accounts", "memberships"):
            paths[f"{prefix}/{op}"] = {"get": {**catalog[op], "operationId": f"list{op.title()}{suffix}"}}
    for prefix, suffix in zip(OPENAI_PREFIXES, ("", "V4", "Accounts")):
        scoped = [_ref("parameters", "AccountId")] if prefix else []
        for path, op, op_id in (("/v1/chat/completions", "chat", "chatCompletions"),
                                ("/v1/completions", "completions", "completions"), ("/v1/models", "models", "models")):
            method = "get" if op == "models" else "post"
            responses = ops[op]["responses"]
            if not prefix:       # no account in the path: any valid token is for its own account
                responses = {status: r for status, r in responses.items() if status != "403"}
            paths[prefix + path] = {method: {**ops[op], "operationId": op_id + suffix, "responses": responses,
                                             "parameters": scoped + ops[op]["parameters"]}}
    paths["/health"] = {"get": {
        "tags": ["Server"], "summary": "Whether the engine loop runs and steps", "operationId": "health",
        "security": [], "parameters": _REQUEST_ID_PARAMETERS,
        "responses": {
            "200": _response("The engine steps.", _json("Health", {"ok": _ex(
                {"status": "ok", "engine": "ok", "model": _MODEL, "uptime_s": 9.1, "steps": 66,
                 "anonymous": False}, "Healthy")})),
            "503": _response("The engine loop is down or stalled (`engine` says why).", _json("Health", {
                "down": _ex({"status": "unavailable", "engine": "engine loop is not running: shut down",
                             "model": _MODEL, "uptime_s": 3.2, "steps": 4, "anonymous": False}, "Down")}))}}}
    paths["/metrics"] = {"get": {
        "tags": ["Server"], "summary": "Prometheus metrics", "operationId": "metrics", "security": [],
        "parameters": _REQUEST_ID_PARAMETERS,
        "responses": {"200": _response("Prometheus text exposition format 0.0.4.", {"text/plain": {
            "schema": {"type": "string"},
            "examples": {"metrics": _ex("# HELP gemlora_queue_length Requests waiting\n"
                                        "# TYPE gemlora_queue_length gauge\ngemlora_queue_length 0.0\n",
                                        "An excerpt")}}})}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "gemlora", "version": "0.1.0",
                 "description": "Cloudflare Workers AI's HTTP API for `@cf/google/gemma-7b-it-lora` (run, "
                                "streaming, fine-tunes with adapter uploads; mounted at the root and under "
                                "/client/v4) and an OpenAI-compatible API beside it (mounted at /v1 and under "
                                "/client/v4/accounts/{account_id}/ai/v1 and /accounts/{account_id}/ai/v1). "
                                "Workers AI routes answer errors in the v4 envelope, OpenAI routes in OpenAI's "
                                "error body; every response carries the server's request id in cf-ai-req-id. "
                                "Any path answers 404 (7003) when no route matches and 405 (7001) for a method "
                                "the route does not have. See docs/api.md."},
        "tags": [{"name": "Workers AI: run"}, {"name": "Workers AI: fine-tunes"}, {"name": "OpenAI"},
                 {"name": "Server"}],
        "security": [{}, {"bearer": []}] if anonymous else [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": body_schemas(names, max_input_length),
            "parameters": _parameters(names),
            "headers": {
                "RequestId": {"required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                              "description": "The server's id of this request (in its log line and in AiError "
                                             "messages)."},
                "RequestIdCopy": {"required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                                  "description": "The same id as cf-ai-req-id."},
                "ClientRequestId": {"schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{8,64}$"},
                                    "description": "The client's well-formed cf-ai-req-id (or x-request-id), "
                                                   "echoed."}},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API token, bound to one account (`Authorization: Bearer <token>`, the scheme "
                               "case-insensitive). " + ("This server is anonymous: no tokens are configured and "
                                                        "Authorization is ignored." if anonymous else
                                                        "Missing or unknown: 401; another account's: 403."
                                                        " /health and /metrics need none.")}},
        },
    }
    return _fill(doc, names[0])


def _fill(value, model: str):
    """A deep copy with the examples' `<model>` replaced by the canonical served name."""
    if isinstance(value, dict):
        return {k: _fill(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, model) for v in value]
    if isinstance(value, str) and _MODEL in value:
        return value.replace(_MODEL, model)
    return copy.copy(value)
