"""The grammar of an output that may or must call tools, as an OutputFormat JsonGrammars compiles.

For the gemma-json tool format (gemlora.text.tool_format): with calls required (tool_choice "required" or
one named tool) the output is the JSON schema of the offered calls, so every call names an offered tool
and its arguments validate against that tool's `parameters`; with "auto", a Lark grammar of either such
calls or text (text that starts with neither '{' nor '[' nor whitespace, so a call once begun is a call
and is completed validly), or, when the request also asks for a JSON answer, either calls or that JSON.
Knows tool formats and schemas; nothing of tokens, the engine or HTTP.
"""

from __future__ import annotations

import json

from gemlora.structured.json_grammars import JSON_STYLE
from gemlora.structured.output_format import MAX_SCHEMA_BYTES, OutputFormat, OutputFormatError, canonical
from gemlora.text.tool_format import GemmaJsonFormat

TEXT = r"/[^{\[\s][\s\S]*/"          # an answer in words: anything that does not begin like a call


def tool_output_format(fmt, tools, choice: str, parallel: bool, answer: OutputFormat | None) -> OutputFormat | None:
    """The format of an output offered `tools` (ToolSpecs) under `choice` ("none", "auto", "required",
    "named" with the one tool), beside the request's own `answer` format (JSON mode / a schema) if any.
    OutputFormatError (field "tools") when the format cannot constrain its calls."""
    if choice == "none" or not tools:
        return answer
    if not isinstance(fmt, GemmaJsonFormat):
        if choice == "auto" and answer is None:
            return None                    # the model's own call syntax, read back by its parser
        raise OutputFormatError(f"tool_choice {choice!r} is not enforced for the {fmt.name} tool format yet; "
                                "use \"auto\"", "tool_choice")
    calls = fmt.calls_schema(tools, parallel=parallel and choice != "named")
    text = canonical(calls, "tools")
    if choice != "auto":
        return OutputFormat(text, "tools")
    if answer is None:
        other = "TEXT"
    elif answer.json_object:
        other = "answer"
        answer_schema = {"type": "object"}
    else:
        other = "answer"
        answer_schema = json.loads(answer.schema)
    lark = ["start: calls | " + other, "calls: %json " + _styled(json.loads(text))]
    if other == "TEXT":
        lark.append("TEXT: " + TEXT)
    else:
        lark.append("answer: %json " + _styled(answer_schema))
    grammar = "\n".join(lark) + "\n"
    if len(grammar.encode()) > 2 * MAX_SCHEMA_BYTES:
        raise OutputFormatError(f"the tools' schemas are larger than {MAX_SCHEMA_BYTES} bytes together", "tools")
    return OutputFormat(None, "tools", lark=grammar)


def _styled(schema: dict) -> str:
    """A schema for Lark's %json, in the one-line JSON style of every constrained output."""
    return json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False, separators=(",", ":"))
