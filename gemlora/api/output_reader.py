"""OutputReader: a finished or streaming output -> what the API answers (text, or text and tool calls).

Owns the model's tool format (FunctionGemma's where the tokenizer has its tokens, else Google's Gemma
JSON format, or the one the server names) on the reading side, and the rule that no 200 carries an
invalid constrained output: JSON that a stop string cut short, or calls that are not complete, become
the API's 5006 instead. Shared by the single-process TextGeneration and the replicas' ingress (which
reads outputs that replicas generated). Knows requests and tool formats; no HTTP objects, no engine.
"""

from __future__ import annotations

import json

from gemlora.api.errors import output_cut
from gemlora.api.schemas import GenerateRequest
from gemlora.api.tools import ToolStream, read_calls
from gemlora.text.tool_format import ToolCall, ToolFormatError, format_for


class OutputReader:
    def __init__(self, tokenizer, tool_format: str | None = None):
        self.tool_format = format_for(lambda t: tokenizer.token_id(t) is not None, tool_format)

    def read(self, req: GenerateRequest, text: str, finish_reason) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished output; the API's error where it was cut short of valid."""
        if not _calls_possible(req):
            check_complete(req, text, finish_reason)
            return text, []
        try:
            return read_calls(self.tool_format, text, req.tools)
        except ToolFormatError:
            raise output_cut("tools", _why(req, finish_reason)) from None

    def stream(self, req: GenerateRequest) -> ToolStream | None:
        """What splits a streamed output into text now and calls at the end (None: no calls possible)."""
        return ToolStream(req.tools, self.tool_format.call_opens) if _calls_possible(req) else None

    def finish_stream(self, req: GenerateRequest, tools: ToolStream, finish_reason) -> tuple[str, list[ToolCall]]:
        try:
            return tools.finish(self.tool_format)
        except ToolFormatError:
            raise output_cut("tools", _why(req, finish_reason)) from None


def _calls_possible(req: GenerateRequest) -> bool:
    return req.tools is not None and bool(req.tools.offered)


def check_complete(req: GenerateRequest, text: str, finish_reason) -> None:
    """A constrained output is complete JSON whenever it ends by its grammar or its budget (steering sees
    to that); only a caller's stop string can cut it short, and then it is refused, never answered as 200."""
    if req.output_format is None or _calls_possible(req):
        return
    try:
        json.loads(text)
    except ValueError:
        raise output_cut(req.output_format.field, _why(req, finish_reason)) from None


def _why(req: GenerateRequest, finish_reason) -> str:
    why = f"finish reason {finish_reason.value}" if finish_reason else "finish reason unknown"
    return why + (", a stop string matched" if req.params.stop else "")
