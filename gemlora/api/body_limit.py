"""The bound on every request body: an ASGI middleware that refuses a body over its route's limit
before it is read (a Content-Length over the limit, or not a number, is refused without reading a byte)
and counts the bytes of a body sent without one (chunked), refusing it as soon as it passes the limit.

Owns the byte counting only. The refusal is raised as `request_too_large` (3006 / 413) from the
route's own read (`request.body()`, `request.form()`), so the app's error handler writes it in the
caller's dialect; a route that never reads its body never pays for it. uvicorn stops reading the socket
while the app does not receive, so an unread body costs nothing. Knows paths and bytes; nothing of
what the body holds.
"""

from __future__ import annotations

from collections.abc import Callable

from gemlora.api.errors import request_too_large

Scope = dict
Receive = Callable
Send = Callable


class BodyLimit:
    def __init__(self, app, limit_for: Callable[[str], int]):
        """`limit_for(path)` -> the largest body, in bytes, a request to `path` may send."""
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        received = 0

        async def bounded_receive():
            nonlocal received
            if declared is not None and (declared < 0 or declared > limit):
                raise request_too_large(_why(limit, declared))
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise request_too_large(_why(limit))
            return message

        await self.app(scope, bounded_receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length; -1 for one that is not a plain decimal number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) <= 18 else -1
    return None


def _why(limit: int, declared: int | None = None) -> str:
    if declared is not None and declared < 0:
        return "the Content-Length header is not a number of bytes"
    size = f" ({declared} bytes)" if declared is not None else ""
    return f"the body{size} is over this route's limit of {limit} bytes"
