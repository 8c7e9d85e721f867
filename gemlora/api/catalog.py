"""The Workers AI model catalog, and the account lists that wrangler reads when it has no account id.

    GET /accounts/{account_id}/ai/models/search    ?page&per_page&search&task&author&source&hide_experimental
    GET /accounts/{account_id}/ai/models/schema    ?model=
    GET /accounts/{account_id}/ai/tasks/search
    GET /accounts/{account_id}/ai/authors/search
    GET /accounts                                  ?page&per_page&name&direction
    GET /memberships                               ?page&per_page&status&name&account.name&order&direction

Mounted at the root and under /client/v4, as the `workers_ai` router is. Each served model name is one
catalog entry, shaped like Workers AI's `@cf/google/gemma-7b-it-lora` entry: task "Text Generation",
properties `beta` and `lora`, plus this server's `context_window`. The paged lists answer the v4 envelope
with `result_info` {page, per_page, count, total_count}. The `models/schema` answer is not written here:
it is taken from the `/openapi.json` document that `gemlora.api.openapi` builds, with its `$ref`s inlined.

`/accounts` and `/memberships` list one account: the caller's own. With tokens that is the token's account;
in anonymous mode it is the anonymous default. No account id is taken from the client, and one tenant
never sees another's account.

Knows the settings, the auth and the OpenAPI document. Of the engine it knows only the context window
and whether there are adapter slots.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from fastapi import APIRouter, Request

from gemlora.api.errors import bad_input, no_such_model
from gemlora.api.openapi import openapi_document
from gemlora.finetunes.files import iso

router = APIRouter()

CATALOG_NAMESPACE = uuid.UUID("3f0f6c9e-2b7d-5e51-a1c4-8d2e6b9a7f30")   # uuid5 namespace of entry/author ids
MAX_PER_PAGE = 1000
MODELS_PER_PAGE = 100        # default page size of models/search (wrangler always sends per_page=50)
ACCOUNTS_PER_PAGE = 20       # default page size of /accounts and /memberships (Cloudflare's v4 default)

# Workers AI's own task record (id, name and description as its catalog has them).
TEXT_GENERATION = {"id": "c329a1f9-323d-4e91-b2aa-582dd4188d34", "name": "Text Generation",
                   "description": "Family of generative text models, such as large language models (LLM), that "
                                  "can be adapted for a variety of natural language tasks."}

_SSE_OUTPUT = {"type": "string", "contentType": "text/event-stream", "format": "binary"}   # as the seed's
_MEMBERSHIP_STATUSES = ("accepted", "pending", "rejected")
_MEMBERSHIP_ORDERS = ("id", "account.name", "status")
_TRUE, _FALSE = ("true", "1"), ("false", "0")
_WHOLE = re.compile(r"([0-9]+)(?:\.0*)?")


@dataclass(frozen=True)
class Catalog:
    entries: tuple[dict, ...]          # one models/search entry per served name, in the settings' order
    schema: dict                       # the models/schema result ({input, output}); every name is one model
    authors: tuple[dict, ...]


def envelope(result, result_info: dict | None = None) -> dict:
    body = {"result": result, "success": True, "errors": [], "messages": []}
    if result_info is not None:
        body["result_info"] = result_info
    return body


def author_of(name: str) -> str:
    """The author part of a model name: `google` in `@cf/google/gemma-7b-it-lora`, `local` in `@local/x`."""
    parts = name.split("/")
    return parts[-2].lstrip("@") if len(parts) >= 2 else ""


def _id(kind: str, value: str) -> str:
    return str(uuid.uuid5(CATALOG_NAMESPACE, f"{kind}/{value}"))


def _entry(name: str, canonical: str, context_window: int, lora: bool) -> dict:
    what = ("A Gemma model served by gemlora on this host" if name == canonical else
            f"Another name of {canonical} on this gemlora server (the same model, the same finetunes)")
    how = ("text generation with LoRA adapters (finetunes) applied per request" if lora else
           "text generation; this server has no adapter slots (--max-loras 0)")
    description = f"{what}: {how}. Context window {context_window} tokens."
    properties = [{"property_id": "beta", "value": "true"},
                  {"property_id": "context_window", "value": str(context_window)}]
    if lora:
        properties.append({"property_id": "lora", "value": "true"})
    return {"id": _id("model", name), "source": 1, "name": name, "description": description,
            "task": dict(TEXT_GENERATION), "tags": [], "properties": properties}


def _inline(node, schemas: dict, depth: int = 0):
    """`node` with every `#/components/schemas/...` reference replaced by a copy of its target."""
    if depth > 32:
        raise ValueError("schema references nest too deep")
    if isinstance(node, list):
        return [_inline(v, schemas, depth) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        target = _inline(schemas[ref.rsplit("/", 1)[1]], schemas, depth + 1)
        return {**target, **{k: _inline(v, schemas, depth) for k, v in node.items() if k != "$ref"}}
    return {k: _inline(v, schemas, depth) for k, v in node.items()}


def model_schema(document: dict) -> dict:
    """The models/schema result of the run route, from its OpenAPI document: the seed's shape (input a
    `oneOf` of the Prompt and Messages branches; output the JSON result or an event stream)."""
    schemas = document["components"]["schemas"]
    request = _inline(schemas["RunRequest"], schemas)
    result = _inline(schemas["RunResponse"], schemas)["properties"]["result"]
    return {
        "input": {"type": "object", "additionalProperties": True,
                  "description": "The JSON body of POST /accounts/{account_id}/ai/run/{model}. "
                                 + request.get("description", ""),
                  "oneOf": request["oneOf"]},
        "output": {"description": "The `result` of POST /accounts/{account_id}/ai/run/{model}; with "
                                  "`stream: true`, server-sent events instead.",
                   "oneOf": [{**result, "contentType": "application/json"}, dict(_SSE_OUTPUT)]},
    }


def _catalog(request: Request) -> Catalog:
    cached = getattr(request.app.state, "catalog", None)
    if cached is not None:
        return cached
    ctx = request.app.state.ctx
    names = ctx.settings.model_names
    lora = ctx.engine.config.max_loras > 0
    entries = tuple(_entry(n, names[0], ctx.engine.max_model_len, lora) for n in names)
    document = openapi_document(names, max_input_length=ctx.settings.max_input_length, anonymous=ctx.auth.anonymous)
    authors = tuple({"id": _id("author", a), "name": a} for a in dict.fromkeys(author_of(n) for n in names))
    catalog = Catalog(entries, model_schema(document), authors)
    request.app.state.catalog = catalog
    return catalog


# --------------------------------------------------------------------------------------------------
# Query parameters: anything malformed is 5006 / 400, naming the parameter.

def _int(request: Request, name: str, default: int, upper: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # ASCII digits, optionally as a whole float ("2.0": the SDK types some of these as numbers)
    digits = _WHOLE.fullmatch(raw)
    value = int(digits.group(1)) if digits and len(digits.group(1)) <= 20 else 0
    if not 1 <= value <= upper:
        raise bad_input(f"query parameter '{name}' must be an integer from 1 to {upper}, got '{raw[:64]}'", name)
    return value


def _bool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return False
    if raw.lower() in _TRUE + _FALSE:
        return raw.lower() in _TRUE
    raise bad_input(f"query parameter '{name}' must be true or false, got '{raw[:64]}'", name)


def _choice(request: Request, name: str, allowed: tuple[str, ...]) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if raw not in allowed:
        raise bad_input(f"query parameter '{name}' must be one of {', '.join(allowed)}, got '{raw[:64]}'", name)
    return raw


def _text(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    return raw.casefold() if raw else None


def _page(request: Request, items: list, default_per_page: int) -> tuple[list, dict]:
    page = _int(request, "page", 1, 2**53)
    per_page = _int(request, "per_page", default_per_page, MAX_PER_PAGE)
    chunk = items[(page - 1) * per_page: page * per_page]
    return chunk, {"page": page, "per_page": per_page, "count": len(chunk), "total_count": len(items)}


def _caller(request: Request, account_id: str | None) -> str:
    return request.app.state.ctx.auth.account(request.headers.get("authorization"), account_id)


# --------------------------------------------------------------------------------------------------
# Workers AI catalog

@router.get("/accounts/{account_id}/ai/models/search")
async def search_models(account_id: str, request: Request):
    _caller(request, account_id)
    catalog = _catalog(request)
    if request.query_params.get("format"):       # `openrouter` answers another shape, which is not served
        raise bad_input("query parameter 'format' is not supported by this server (only the default format)",
                        "format")
    search, task, author = _text(request, "search"), _text(request, "task"), _text(request, "author")
    source_raw = request.query_params.get("source")
    source = None
    if source_raw is not None:
        try:
            source = float(source_raw)
        except ValueError:
            source = math.nan
        if not math.isfinite(source):
            raise bad_input(f"query parameter 'source' must be a number, got '{source_raw[:64]}'", "source")
    hide_experimental = _bool(request, "hide_experimental")
    _bool(request, "include_deprecated")     # validated; no served model is deprecated
    found = [e for e in catalog.entries
             if (search is None or search in e["name"].casefold() or search in e["description"].casefold())
             and (task is None or task in (e["task"]["name"].casefold(), e["task"]["id"]))
             and (author is None or author == author_of(e["name"]).casefold())
             and (source is None or source == e["source"])
             and not (hide_experimental and {"property_id": "beta", "value": "true"} in e["properties"])]
    chunk, info = _page(request, found, MODELS_PER_PAGE)
    return envelope(chunk, info)


@router.get("/accounts/{account_id}/ai/models/schema")
async def model_schema_route(account_id: str, request: Request):
    _caller(request, account_id)
    model = request.query_params.get("model")
    if not model:
        raise bad_input("required query parameter 'model' is missing", "model")
    if model not in request.app.state.ctx.settings.model_names:
        raise no_such_model(model)
    return envelope(_catalog(request).schema)


@router.get("/accounts/{account_id}/ai/tasks/search")
async def search_tasks(account_id: str, request: Request):
    _caller(request, account_id)
    return envelope([dict(TEXT_GENERATION)])


@router.get("/accounts/{account_id}/ai/authors/search")
async def search_authors(account_id: str, request: Request):
    _caller(request, account_id)
    return envelope(list(_catalog(request).authors))


# --------------------------------------------------------------------------------------------------
# Accounts: the caller's own, only

def _account_record(request: Request, account: str) -> dict:
    started = datetime.fromtimestamp(request.app.state.ctx.started, timezone.utc)
    return {"id": account, "name": account, "type": "standard", "created_at": iso(started)}


@router.get("/accounts")
async def list_accounts(request: Request):
    account = _caller(request, None)     # the token's; anonymous: the default one
    _choice(request, "direction", ("asc", "desc"))
    name = _text(request, "name")
    records = [_account_record(request, account)]
    records = [r for r in records if name is None or name in r["name"].casefold()]
    chunk, info = _page(request, records, ACCOUNTS_PER_PAGE)
    return envelope(chunk, info)


@router.get("/memberships")
async def list_memberships(request: Request):
    account = _caller(request, None)     # the token's; anonymous: the default one
    _choice(request, "direction", ("asc", "desc"))
    _choice(request, "order", _MEMBERSHIP_ORDERS)
    status = _choice(request, "status", _MEMBERSHIP_STATUSES)
    names = [n for n in (_text(request, "account.name"), _text(request, "name")) if n is not None]
    membership = {"id": uuid.uuid5(CATALOG_NAMESPACE, f"membership/{account}").hex,
                  "account": _account_record(request, account), "status": "accepted"}
    records = [m for m in [membership] if (status is None or status == m["status"])
               and all(n in m["account"]["name"].casefold() for n in names)]
    chunk, info = _page(request, records, ACCOUNTS_PER_PAGE)
    return envelope(chunk, info)
