"""Gemma chat/turn formatting: messages or a prompt -> the prompt string the model sees.

Owns the `<start_of_turn>role\\n...<end_of_turn>\\n` markup and the generation prompt.
Pure string functions: knows nothing of tokenizers, token ids, the engine, KV cache or HTTP.
`<bos>` is deliberately absent; the tokenizer adds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

START = "<start_of_turn>"
END = "<end_of_turn>"
GENERATION_PROMPT = f"{START}model\n"

# Gemma only has user and model turns; `assistant` is the OpenAI/Workers AI name for `model`.
_ROLE_MAP = {"user": "user", "assistant": "model", "model": "model"}


def _turn(role: str, content: str) -> str:
    return f"{START}{role}\n{content}{END}\n"


def format_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """Render messages as Gemma turns, ending with the generation prompt.

    System messages are folded into the next user turn as "system\\n\\nuser" (Gemma 3's
    template); system text with no user turn after it becomes a user turn of its own.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    parts: list[str] = []
    pending_system: list[str] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        content = msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        if role == "system":
            if content.strip():
                pending_system.append(content.strip())
            continue
        if role not in _ROLE_MAP:
            raise ValueError(f"message {i}: unsupported role {role!r}")
        gemma_role = _ROLE_MAP[role]
        text = content.strip()  # HF's Gemma templates `| trim` every message
        if pending_system:
            system = "\n\n".join(pending_system)
            pending_system.clear()
            if gemma_role == "user":
                text = f"{system}\n\n{text}" if text else system
            else:
                parts.append(_turn("user", system))
        parts.append(_turn(gemma_role, text))
    if pending_system:
        parts.append(_turn("user", "\n\n".join(pending_system)))
    return "".join(parts) + GENERATION_PROMPT


def format_prompt(prompt: str, raw: bool) -> str:
    """`raw` prompts are sent verbatim (the caller wrote the markup); others become one user turn."""
    if raw:
        return prompt
    return format_chat([{"role": "user", "content": prompt}])
