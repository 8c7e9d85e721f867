"""Tool-calling conversations -> the prompt text, in the layout each tool format was trained on.

Owns where a tool format's pieces go in the conversation.
- gemma-json (`tool_messages`, then `format_chat`): the declarations (and the format's rule) go first,
  as system text (so they open the first user turn, as Google's function-calling examples put them); an
  assistant turn that made calls carries them in the format's call syntax after any text it had; the
  results of a turn's calls (role `tool`, in a row) become one user turn of the format's results, named
  by the call they answer.
- FunctionGemma (`functiongemma_prompt`), as its chat template lays it out: a `developer` turn holds the
  first system message (else the format's instruction) and the declarations; a model turn that calls
  does not end after its calls: the results follow in it, and the model goes on in that same turn (no
  new generation prompt after results). A call must be answered before anything else comes.
Pure text: knows nothing of HTTP, ids' origin, tokens or grammars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gemlora.text.chat import END, GENERATION_PROMPT, START, format_chat
from gemlora.text.tool_format import FUNCTIONGEMMA_INSTRUCTION, FunctionGemmaFormat, ToolCall, ToolSpec


def tool_prompt(messages: Sequence[Mapping], tools: Sequence[ToolSpec], fmt, declare: bool = True) -> str:
    """The prompt of a tool conversation in `fmt`'s layout (see the module's docstring)."""
    if isinstance(fmt, FunctionGemmaFormat):
        return functiongemma_prompt(messages, tools, fmt, declare)
    return format_chat(tool_messages(messages, tools, fmt, declare))


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


def functiongemma_prompt(messages: Sequence[Mapping], tools: Sequence[ToolSpec], fmt: FunctionGemmaFormat,
                         declare: bool = True) -> str:
    """FunctionGemma's layout. ValueError for a call that no result answers before the next message."""
    messages = list(messages)
    developer = None
    if messages and messages[0]["role"] == "system":
        developer = (messages.pop(0).get("content") or "").strip()
    parts = []
    if (declare and tools) or developer is not None:
        text = developer or ""
        if declare and tools:
            text = (text + "\n\n" if text else FUNCTIONGEMMA_INSTRUCTION) + fmt.declaration_tokens(tools)
        parts.append(f"{START}developer\n{text}{END}\n")
    names: dict[str, str] = {}
    last_calls: list[ToolCall] = []
    answered = 0
    state = None                      # what the last message left open: None, "call" or "result"
    for msg in messages:
        role = "model" if msg["role"] == "assistant" else msg["role"]
        if role == "tool":
            if state not in ("call", "result"):
                raise ValueError("a tool result must follow the model's call")
            parts.append(fmt.result(_result_name(msg, names, last_calls, answered), msg.get("content") or ""))
            answered, state = answered + 1, "result"
            continue
        if state == "call":
            raise ValueError("a tool call must be followed by its result")
        if state != "result":
            parts.append(f"{START}{role}\n")
        parts.append((msg.get("content") or "").strip())
        state = None
        calls = list(msg.get("tool_calls") or ())
        if calls:
            for call in calls:
                if call.id:
                    names[call.id] = call.name
            last_calls, answered, state = calls, 0, "call"
            parts.append(fmt.call(calls))
        else:
            parts.append(f"{END}\n")
    if state == "call":
        raise ValueError("a tool call must be followed by its result")
    return "".join(parts) + ("" if state == "result" else GENERATION_PROMPT)
