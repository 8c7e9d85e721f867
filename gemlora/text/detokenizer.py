"""Incremental (streaming) detokenization with stop strings.

Turns generated token ids, one at a time, into text deltas that are always complete UTF-8
characters, skip special tokens, and never leak any part of a stop string. Knows token ids and
strings only (through `decode`); nothing of the engine, sampling, KV cache or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded with the first generated tokens, so decoders whose output depends on
# left context (e.g. a leading-space strip) render the first delta as they would mid-text.
_PROMPT_CONTEXT = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        # vLLM's scheme: ids[prefix:read] were already emitted and are re-decoded only as
        # context; ids[read:] are pending until their text stops ending in U+FFFD.
        self._prefix = 0
        self._read = len(self._ids)
        self._stops = [s for s in stop if s]
        self._held = ""  # decoded text that might be the start of a stop string
        self.generated_ids: list[int] = []
        self.stopped = False
        self.stop_reason: str | None = None

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly completed, safe-to-show text."""
        if self.stopped:
            return ""
        self.generated_ids.append(token_id)
        self._ids.append(token_id)
        return self._filter_stops(self._utf8_delta(final=False), final=False)

    def flush(self) -> str:
        """End of generation: return everything still held back (incomplete bytes included)."""
        if self.stopped:
            return ""
        return self._filter_stops(self._utf8_delta(final=True), final=True)

    def _utf8_delta(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        # A trailing U+FFFD means a byte-fallback sequence is still incomplete: wait for more.
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def _filter_stops(self, delta: str, final: bool) -> str:
        if not self._stops:
            return delta
        text = self._held + delta
        hits = [(i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            index, stop = min(hits, key=lambda h: h[0])
            self.stopped, self.stop_reason, self._held = True, stop, ""
            return text[:index]
        keep = 0 if final else self._stop_prefix_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _stop_prefix_len(self, text: str) -> int:
        # Longest suffix of `text` that is a proper prefix of some stop string.
        longest = min(len(text), max(len(s) for s in self._stops) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
