"""Tool-calling conversations -> the plain Gemma messages `format_chat` renders.

Owns where a tool format's pieces go in the conversation: the declarations (and the format's rule) go
first, as system text (so they open the first user turn, as Google's function-calling examples put
them); an assistant turn that made calls carries them in the format's call syntax after any text it
had; the results of a turn's calls (role `tool`, in a row) become one user turn of the format's
results, named by the call they answer. Pure text: knows nothing of HTTP, ids' origin, tokens or
grammars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gemlora.text.tool_format import ToolCall, ToolSpec


def tool_messages(messages: Sequence[Mapping], tools: Sequence[ToolSpec], fmt, declare: bool = True) -> list[dict]:
    """`messages` (dicts with role and content, assistant ones optionally `tool_calls` (ToolCall), tool
    ones `tool_call_id` / `name`) -> [{"role", "content"}] with the format written in. `declare`: put the
    declarations first (False for tool_choice "none": the history is still shown, but no tool offered)."""
    out: list[dict] = []
    if declare and tools:
        out.append({"role": "system", "content": fmt.declarations(tools)})
    names: dict[str, str] = {}        # call id -> tool name, for results that name their call by id
    last_calls: list[ToolCall] = []
    results: list[str] = []
    for msg in messages:
        role = msg["role"]
        if role == "tool":
            results.append(fmt.result(_result_name(msg, names, last_calls, len(results)), msg.get("content") or ""))
            continue
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results = []
        calls = list(msg.get("tool_calls") or ())
        if role == "assistant" and calls:
            for call in calls:
                if call.id:
                    names[call.id] = call.name
            last_calls = calls
            text = (msg.get("content") or "").strip()
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + fmt.call(calls)})
        else:
            out.append({"role": role, "content": msg.get("content") or ""})
    if results:
        out.append({"role": "user", "content": "\n".join(results)})
    return out


def _result_name(msg: Mapping, names: Mapping[str, str], last_calls: Sequence[ToolCall], index: int) -> str:
    """The tool a result answers: its call's (by id), else the name it gives, else the call made in the same
    position of the last assistant turn, else ''."""
    if msg.get("tool_call_id") in names:
        return names[msg["tool_call_id"]]
    if msg.get("name"):
        return msg["name"]
    return last_calls[index].name if index < len(last_calls) else ""
