"""The JSON Schemas of every body in `/openapi.json`: `components.schemas`.

Owns what each request and response body of both dialects looks like: the Workers AI run body (the seed
schema's `oneOf` of a prompt branch and a messages branch), its JSON answer and its events, the
fine-tunes and catalog envelopes, the OpenAI chat and completions bodies, answers and chunks, the error
bodies, `/health`. The generation options themselves come from their one declaration (gemlora.api.fields).
The routes, their statuses and the examples are gemlora.api.openapi's. Knows the fields, limits and
shapes of gemlora.api; nothing of the engine or of HTTP framework objects.
"""

from __future__ import annotations

from gemlora.api.fields import CHAT, COMPLETION, RUN, properties
from gemlora.api.openai_schemas import OPENAI_ROLES
from gemlora.api.schemas import MAX_MESSAGES, MESSAGE_ROLES
from gemlora.api.tools import MESSAGE_TOOL_FIELDS, OPENAI_CALL_SCHEMA, WORKERS_AI_CALL_SCHEMA
from gemlora.finetunes.files import ASSET_NAMES
from gemlora.sampling import MAX_LOGPROBS

_REF = "#/components/"
_JSON = "application/json"


def ref(kind: str, name: str) -> dict:
    return {"$ref": f"{_REF}{kind}/{name}"}


# logprobs on the OpenAI routes (gemlora.api.openai_logprobs): -9999.0 stands for a token the distribution excludes.
_LOGPROB = {"type": "number", "minimum": -9999.0, "maximum": 0}
_TOKEN_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"],
                  "properties": {"token": {"type": "string"}, "logprob": _LOGPROB,
                                 "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}}}
CHAT_LOGPROBS = {
    "type": "object", "required": ["content"],
    "properties": {"content": {"type": "array", "items": {
        **_TOKEN_LOGPROB, "required": [*_TOKEN_LOGPROB["required"], "top_logprobs"],
        "properties": {**_TOKEN_LOGPROB["properties"],
                       "top_logprobs": {"type": "array", "maxItems": MAX_LOGPROBS, "items": _TOKEN_LOGPROB}}}},
                   "refusal": {"type": "null"}},
    "description": "Per output token (a final stop token left out): its log-probability under the distribution it "
                   "was drawn from (after penalties, temperature, top-k/top-p and any JSON grammar), and the "
                   "`top_logprobs` most likely tokens, most likely first."}
TEXT_LOGPROBS = {
    "type": "object", "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "properties": {"tokens": {"type": "array", "items": {"type": "string"}},
                   "token_logprobs": {"type": "array", "items": _LOGPROB},
                   "top_logprobs": {"type": "array", "items": {"type": "object", "maxProperties": MAX_LOGPROBS,
                                                               "additionalProperties": _LOGPROB}},
                   "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    "description": "The legacy columns, per output token: `logprobs` alternatives in each `top_logprobs` entry; "
                   "`text_offset` counts characters of the completion, across a stream's chunks."}


# --------------------------------------------------------------------------------------------------
# Schemas

def body_schemas(names: list[str], max_length: int | None) -> dict:
    """`components.schemas`: every body, for a server serving `names` with text capped at `max_length`."""
    text = {"type": "string"} if max_length is None else {"type": "string", "maxLength": max_length}
    prompt = {**text, "minLength": 1}
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "additionalProperties": False,
             "properties": {"prompt_tokens": {"type": "integer", "minimum": 0},
                            "completion_tokens": {"type": "integer", "minimum": 0},
                            "total_tokens": {"type": "integer", "minimum": 0}}}

    def envelope(result: dict) -> dict:
        return {"type": "object", "required": ["result", "success", "errors", "messages"],
                "additionalProperties": False,
                "properties": {"result": result, "success": {"const": True},
                               "errors": {"type": "array", "maxItems": 0},
                               "messages": {"type": "array", "maxItems": 0}}}

    def paged(item: dict) -> dict:
        out = envelope({"type": "array", "items": item})
        return {**out, "required": [*out["required"], "result_info"],
                "properties": {**out["properties"], "result_info": ref("schemas", "ResultInfo")}}

    task = {"type": "object", "required": ["id", "name", "description"],
            "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "description": {"type": "string"}}}
    account_record = {"type": "object", "required": ["id", "name", "type", "created_at"],
                      "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                     "type": {"const": "standard"}, "created_at": {"type": "string"}}}
    catalog = {
        "ResultInfo": {"type": "object", "required": ["page", "per_page", "count", "total_count"],
                       "properties": {k: {"type": "integer", "minimum": 0}
                                      for k in ("page", "per_page", "count", "total_count")}},
        "CatalogModel": {
            "type": "object", "required": ["id", "source", "name", "description", "task", "tags", "properties"],
            "properties": {"id": {"type": "string", "format": "uuid"}, "source": {"const": 1},
                           "name": {"enum": names}, "description": {"type": "string"}, "task": task,
                           "tags": {"type": "array", "items": {"type": "string"}},
                           "properties": {"type": "array", "items": {
                               "type": "object", "required": ["property_id", "value"],
                               "properties": {"property_id": {"enum": ["beta", "context_window", "lora"]},
                                              "value": {"type": "string"}}}}},
            "description": "One served model name, shaped like Workers AI's catalog entry of "
                           "@cf/google/gemma-7b-it-lora; `context_window` is this server's."},
        "ModelSearchResponse": paged(ref("schemas", "CatalogModel")),
        "ModelSchemaResponse": envelope({"type": "object", "required": ["input", "output"],
                                         "properties": {"input": {"type": "object"}, "output": {"type": "object"}},
                                         "description": "`input`: the run body's schema (its Prompt and Messages "
                                                        "branches, as in this document); `output`: its `result`, "
                                                        "or an event stream."}),
        "TaskListResponse": envelope({"type": "array", "items": task}),
        "AuthorListResponse": envelope({"type": "array", "items": {
            "type": "object", "required": ["id", "name"],
            "properties": {"id": {"type": "string"}, "name": {"type": "string"}}}}),
        "AccountListResponse": paged(account_record),
        "MembershipListResponse": paged({"type": "object", "required": ["id", "account", "status"],
                                         "properties": {"id": {"type": "string"}, "account": account_record,
                                                        "status": {"const": "accepted"}}}),
    }

    run_fields = properties(RUN, max_length)
    # content may be left out only by an assistant turn that made calls
    content_unless_calls = {"if": {"not": {"required": ["tool_calls"], "properties": {
        "role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}}},
        "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}}
    run_message = {"type": "object", "required": ["role"], **content_unless_calls,
                   "properties": {"role": {"enum": list(MESSAGE_ROLES)}, "content": text, **MESSAGE_TOOL_FIELDS},
                   "description": "Other keys are ignored."}
    run_prompt = {"title": "Prompt", "type": "object", "required": ["prompt"],
                  "not": {"required": ["messages"]},
                  "properties": {"prompt": prompt, **run_fields,
                                 "tools": {"type": "array", "maxItems": 0, "description": "With messages only."},
                                 "tool_choice": {"enum": [None, "none", "auto"], "description": "With messages only."}}}
    # "required" or a named tool needs tools (and a named one must be among them: not expressible here)
    tools_needed = {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [
        {"const": "required"}, {"type": "object"}]}}},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}
    run_messages = {"title": "Messages", "type": "object", "required": ["messages"], **tools_needed,
                    "not": {"required": ["prompt"]},
                    "properties": {"messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": run_message},
                                   **run_fields}}

    oai_model = {"anyOf": [{"enum": names}, {"type": "string", "minLength": 1}],
                 "description": "A served model name, or one of the caller's finetunes (or a public one) by name "
                                "or id, which then becomes the adapter."}
    # A finetune as `model` and another one in `lora` would be two adapters: with `lora`, `model` is a served name.
    lora_needs_base = {"if": {"required": ["lora"], "properties": {"lora": {"type": "string"}}},
                       "then": {"properties": {"model": {"enum": names}}}}
    top_needs_logprobs = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
                          "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    chat_message = {"type": "object", "required": ["role"], **content_unless_calls,
                    "allOf": [{"if": {"properties": {"role": {"const": "tool"}}},
                               "then": {"required": ["tool_call_id"]}}],
                    "properties": {"role": {"enum": list(OPENAI_ROLES),
                                            "description": "`developer` is taken as `system`."},
                                   "content": {"anyOf": [text, {"type": "array", "items": part}, {"type": "null"}],
                                               "description": "A string, or text parts joined with newlines "
                                                              f"(at most {max_length} characters in all); null on "
                                                              "an assistant turn with tool_calls."},
                                   **MESSAGE_TOOL_FIELDS}}
    one_prompt = {**text, "minLength": 1}
    finish = {"enum": ["stop", "length", "tool_calls"]}
    chunk_common = {"id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"}}

    uuid_like = "^-*(?:[0-9A-Fa-f]-*){32}$"      # what uuid.UUID() parses within the name alphabet
    finetune = {"type": "object", "additionalProperties": False,
                "required": ["id", "name", "model", "description", "public", "created_at", "modified_at"],
                "properties": {"id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
                               "model": {"type": "string"}, "description": {"type": "string"},
                               "public": {"type": "boolean"},
                               "created_at": {"type": "string", "format": "date-time"},
                               "modified_at": {"type": "string", "format": "date-time"}}}
    return {
        **catalog,
        "WorkersAiError": {
            "description": "The v4 error envelope; `result` is `{}`, never null, and there is exactly one error.",
            "type": "object", "required": ["result", "success", "errors", "messages"], "additionalProperties": False,
            "properties": {"result": {"type": "object", "maxProperties": 0}, "success": {"const": False},
                           "errors": {"type": "array", "minItems": 1, "maxItems": 1,
                                      "items": {"type": "object", "required": ["code", "message"],
                                                "additionalProperties": False,
                                                "properties": {"code": {"type": "integer"},
                                                               "message": {"type": "string"}}}},
                           "messages": {"type": "array", "maxItems": 0}}},
        "OpenAIError": {
            "type": "object", "required": ["error"], "additionalProperties": False,
            "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                     "additionalProperties": False,
                                     "properties": {"message": {"type": "string"},
                                                    "type": {"enum": ["invalid_request_error",
                                                                      "authentication_error", "permission_error",
                                                                      "not_found_error", "timeout_error",
                                                                      "rate_limit_error", "api_error"]},
                                                    "param": {"type": ["string", "null"]},
                                                    "code": {"type": ["string", "null"]}}}}},
        "Usage": usage,
        "OpenAIUsage": {**usage, "required": [*usage["required"], "prompt_tokens_details"],
                        "properties": {**usage["properties"], "prompt_tokens_details": {
                            "type": "object", "required": ["cached_tokens"], "additionalProperties": False,
                            "description": "cached_tokens: prompt tokens whose K/V came from the prefix cache.",
                            "properties": {"cached_tokens": {"type": "integer", "minimum": 0}}}}},
        "RunPrompt": run_prompt,
        "RunMessages": run_messages,
        "RunRequest": {"description": "Exactly one of `prompt` / `messages` (a body with both is refused). Other "
                                      "keys are ignored. Types are strict: \"5\" is not an integer, 5.0 is, null "
                                      "is not a value of any typed field (the output format and tool options take "
                                      "it as not given).",
                       "oneOf": [ref("schemas", "RunPrompt"), ref("schemas", "RunMessages")]},
        "RunResponse": envelope({"type": "object", "required": ["response", "usage"], "additionalProperties": False,
                                 "properties": {"response": {
                                     "anyOf": [{"type": "string"}, {"type": ["object", "array", "number", "boolean",
                                                                              "null"]}],
                                     "description": "The generated text; with `response_format` JSON mode (not "
                                                    "streamed), the JSON value itself; \"\" when only calls were "
                                                    "made."},
                                                "tool_calls": {"type": "array", "minItems": 1,
                                                               "items": WORKERS_AI_CALL_SCHEMA,
                                                               "description": "The calls the model made, each "
                                                                              "valid against its tool's parameters."},
                                                "usage": ref("schemas", "Usage")}}),
        "RunEvent": {
            "description": "One server-sent event (the schema describes each event, as OpenAPI 3.2's "
                           "`itemSchema` does). Text deltas, then the usage with an empty response, then "
                           "`[DONE]`; an engine failure after the status line comes as an error envelope.",
            "type": "object", "required": ["data"],
            "properties": {"event": {"const": "message"}, "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": _JSON, "contentSchema": {"anyOf": [
                    {"type": "object", "required": ["response"], "additionalProperties": False,
                     "properties": {"response": {"type": "string", "minLength": 1}}},
                    {"type": "object", "required": ["response", "tool_calls"], "additionalProperties": False,
                     "properties": {"response": {"type": "string"},
                                    "tool_calls": {"type": "array", "minItems": 1, "items": WORKERS_AI_CALL_SCHEMA}},
                     "description": "The calls, whole, once the output is complete."},
                    {"type": "object", "required": ["response", "usage"], "additionalProperties": False,
                     "properties": {"response": {"const": ""}, "usage": ref("schemas", "Usage")}},
                    ref("schemas", "WorkersAiError")]}}]}}},
        "Finetune": finetune,
        "FinetuneResponse": envelope(ref("schemas", "Finetune")),
        "FinetuneListResponse": envelope({"type": "array", "items": ref("schemas", "Finetune")}),
        "CreateFinetuneRequest": {
            "type": "object", "required": ["model", "name"],
            "properties": {
                "model": {"enum": names, "description": "A served model name."},
                "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$",
                         "not": {"anyOf": [{"pattern": "^[cC][fF]-"}, {"pattern": uuid_like}]},
                         "description": "Unique in the account (case-sensitive); the `cf-` prefix is reserved in "
                                        "any case; a name cannot parse as a UUID."},
                "description": {"type": ["string", "null"], "description": "Default \"\" (also for null)."},
                "public": {"type": "boolean", "default": False,
                           "description": "Listed for every account, usable by others by id."}}},
        "Asset": {"type": "object", "additionalProperties": False,
                  "required": ["id", "bucket_name", "created_at", "file_name", "finetune_id", "modified_at"],
                  "properties": {"id": {"type": "string", "format": "uuid"}, "bucket_name": {"type": "string"},
                                 "created_at": {"type": "string", "format": "date-time"},
                                 "file_name": {"enum": list(ASSET_NAMES)},
                                 "finetune_id": {"type": "string", "format": "uuid"},
                                 "modified_at": {"type": "string", "format": "date-time"}}},
        "AssetResponse": envelope(ref("schemas", "Asset")),
        "UploadAssetRequest": {
            "type": "object", "required": ["file_name", "file"],
            "properties": {"file_name": {"enum": list(ASSET_NAMES),
                                         "description": "Which asset `file` is (the part's own filename is "
                                                        "ignored)."},
                           "file": {"type": "string", "format": "binary",
                                    "contentMediaType": "application/octet-stream",
                                    "description": "The file's bytes, as a file part (with a filename)."}}},
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"],
            "allOf": [lora_needs_base, top_needs_logprobs, tools_needed],
            "properties": {"messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
                                        "items": chat_message},
                           "model": oai_model, **properties(CHAT, max_length)},
            "description": "Unknown keys are ignored; null is \"not given\" for every optional field."},
        "CompletionRequest": {
            "type": "object", "required": ["model", "prompt"], **lora_needs_base,
            "properties": {"prompt": {"anyOf": [one_prompt, {"type": "array", "minItems": 1, "maxItems": 1,
                                                             "items": one_prompt}],
                                      "description": "One text prompt (token-id prompts are refused)."},
                           "model": oai_model, **properties(COMPLETION, max_length)},
            "description": "Unknown keys are ignored; null is \"not given\" for every optional field."},
        "ChatCompletion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {**chunk_common, "id": {"type": "string", "pattern": "^chatcmpl-"},
                           "object": {"const": "chat.completion"},
                           "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                               "type": "object", "required": ["index", "message", "finish_reason"],
                               "properties": {"index": {"const": 0}, "finish_reason": finish,
                                              "logprobs": CHAT_LOGPROBS,
                                              "message": {"type": "object", "required": ["role", "content"],
                                                          "properties": {"role": {"const": "assistant"},
                                                                         "content": {"type": ["string", "null"],
                                                                                     "description": "null when only "
                                                                                     "calls were made"},
                                                                         "tool_calls": {"type": "array", "minItems": 1,
                                                                                        "items": OPENAI_CALL_SCHEMA}}}}}},
                           "usage": ref("schemas", "OpenAIUsage")}},
        "TextCompletion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {**chunk_common, "id": {"type": "string", "pattern": "^cmpl-"},
                           "object": {"const": "text_completion"},
                           "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                               "type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
                               "properties": {"index": {"const": 0}, "text": {"type": "string"},
                                              "logprobs": {"anyOf": [{"type": "null"}, TEXT_LOGPROBS]},
                                              "finish_reason": finish}}},
                           "usage": ref("schemas", "OpenAIUsage")}},
        "ChatCompletionEvent": _openai_event({
            "type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {**chunk_common, "object": {"const": "chat.completion.chunk"},
                           "choices": {"type": "array", "maxItems": 1, "items": {
                               "type": "object", "required": ["index", "delta", "finish_reason"],
                               "properties": {"index": {"const": 0},
                                              "finish_reason": {"enum": [None, "stop", "length", "tool_calls"]},
                                              "logprobs": CHAT_LOGPROBS,
                                              "delta": {"type": "object", "additionalProperties": False,
                                                        "properties": {"role": {"const": "assistant"},
                                                                       "content": {"type": "string"},
                                                                       "tool_calls": {"type": "array", "items": {
                                                                           **OPENAI_CALL_SCHEMA, "required": [
                                                                               "index", *OPENAI_CALL_SCHEMA["required"]],
                                                                           "properties": {
                                                                               "index": {"type": "integer", "minimum": 0},
                                                                               **OPENAI_CALL_SCHEMA["properties"]}},
                                                                           "description": "One delta per call, whole "
                                                                                          "(id, name, arguments)."}}}}}},
                           "usage": ref("schemas", "OpenAIUsage")}}),
        "TextCompletionEvent": _openai_event({
            "type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {**chunk_common, "object": {"const": "text_completion"},
                           "choices": {"type": "array", "maxItems": 1, "items": {
                               "type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
                               "properties": {"index": {"const": 0}, "text": {"type": "string"},
                                              "logprobs": {"anyOf": [{"type": "null"}, TEXT_LOGPROBS]},
                                              "finish_reason": {"enum": [None, "stop", "length"]}}}},
                           "usage": ref("schemas", "OpenAIUsage")}}),
        "ModelList": {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object", "created", "owned_by"],
                "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                               "owned_by": {"type": "string"}, "parent": {"type": "string"},
                               "root": {"type": "string"}}}}},
            "description": "The served names (owned_by gemlora), then the caller's own ready finetunes by name "
                           "(owned_by the account, root the finetune id)."},
        "Health": {
            "type": "object", "required": ["status", "engine", "model", "uptime_s", "steps", "anonymous"],
            "properties": {"status": {"enum": ["ok", "unavailable"]}, "engine": {"type": "string"},
                           "model": {"type": "string"}, "uptime_s": {"type": "number"},
                           "steps": {"type": "integer", "minimum": 0}, "anonymous": {"type": "boolean"}}},
    }


def _openai_event(chunk: dict) -> dict:
    return {"description": "One server-sent event (the schema describes each event, as OpenAPI 3.2's "
                           "`itemSchema` does): chunks, then `[DONE]`; an engine failure after the status line "
                           "comes as an OpenAI error object.",
            "type": "object", "required": ["data"],
            "properties": {"event": {"const": "message"}, "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": _JSON,
                 "contentSchema": {"anyOf": [chunk, ref("schemas", "OpenAIError")]}}]}}}
