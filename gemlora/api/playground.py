"""The playground: a web page at `/` and `/playground` to try the server in a browser.

Owns serving three hand-written static files from `gemlora/api/static/` (the page, its script and its
style sheet), with headers that keep the page to itself: a Content-Security-Policy allowing only this
origin's script, style and fetches (no inline script, no other site, no framing), `nosniff`, and no
referrer. Files are read from the installed package, so the page works offline, with no build step.

Must not know anything else: not the engine, KV blocks or adapters, not accounts or tokens, not what any
API route answers. The page talks to the server only through the public HTTP API, as any client does
(`/accounts`, the catalog and finetunes routes, `ai/run` with SSE, `/health`, `/metrics`), with the
token the user types; this module only serves files.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

router = APIRouter()

_ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def _read(name: str) -> bytes:
    return (files("gemlora.api") / "static" / name).read_bytes()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
@router.api_route("/playground", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> Response:
    return Response(_read("playground.html"), media_type="text/html; charset=utf-8",
                    headers={**_HEADERS, "Content-Security-Policy": _CSP})


@router.api_route("/playground/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in _ASSETS:          # a fixed list: no path is ever joined from the request
        raise HTTPException(404)     # the app's handler answers it in the Workers AI envelope (7003)
    return Response(_read(name), media_type=_ASSETS[name], headers=_HEADERS)
