"""The grammar of an output that may or must call tools, as an OutputFormat JsonGrammars compiles.

For either tool format (gemlora.text.tool_format): with calls required (tool_choice "required" or one
named tool) the output is the offered calls only (for gemma-json the JSON schema of them; for
FunctionGemma its call syntax, gemlora.structured.functiongemma_grammar), so every call names an offered
tool and its arguments validate against that tool's `parameters`; with "auto", a Lark grammar of either
such calls or text (text that does not begin like a call, nor with whitespace, so a call once begun is a
call and is completed validly), or, when the request also asks for a JSON answer, either calls or that JSON.
Knows tool formats and schemas; nothing of tokens, the engine or HTTP.
"""

from __future__ import annotations

import json

from gemlora.structured.functiongemma_grammar import calls_rules
from gemlora.structured.json_grammars import JSON_STYLE
from gemlora.structured.output_format import MAX_SCHEMA_BYTES, OutputFormat, OutputFormatError, canonical
from gemlora.text.tool_format import GemmaJsonFormat

def tool_output_format(fmt, tools, choice: str, parallel: bool, answer: OutputFormat | None) -> OutputFormat | None:
    """The format of an output offered `tools` (ToolSpecs) under `choice` ("none", "auto", "required",
    "named" with the one tool), beside the request's own `answer` format (JSON mode / a schema) if any.
    OutputFormatError (field "tools") when the format cannot constrain its calls."""
    if choice == "none" or not tools:
        return answer
    many = parallel and choice != "named"
    if isinstance(fmt, GemmaJsonFormat):
        text = canonical(fmt.calls_schema(tools, parallel=many), "tools")
        if choice != "auto":
            return OutputFormat(text, "tools")
        calls = ["calls: %json " + _styled(json.loads(text))]
    else:
        calls = calls_rules(tools, many)
    if choice != "auto":
        lark = ["start: calls", *calls]
    elif answer is None:
        lark = ["start: calls | TEXT", *calls, "TEXT: " + text_regex(fmt.call_opens)]
    else:
        schema = {"type": "object"} if answer.json_object else json.loads(answer.schema)
        lark = ["start: calls | answer", *calls, "answer: %json " + _styled(schema)]
    grammar = "\n".join(lark) + "\n"
    if len(grammar.encode()) > 2 * MAX_SCHEMA_BYTES:
        raise OutputFormatError(f"the tools' schemas are larger than {MAX_SCHEMA_BYTES} bytes together", "tools")
    return OutputFormat(None, "tools", lark=grammar)


def text_regex(call_opens: str) -> str:
    """An answer in words: text that begins with none of the characters a call can begin with, nor a space
    (so the first visible character tells text from a call, as ToolStream reads it)."""
    opens = "".join("\\" + c if c in "[]\\^-" else c for c in call_opens)
    return "/[^" + opens + "\\s][\\s\\S]*/"


def _styled(schema: dict) -> str:
    """A schema for Lark's %json, in the one-line JSON style of every constrained output."""
    return json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False, separators=(",", ":"))
