"""OpenAI's logprobs objects, made from the engine's per-token log-probabilities.

Chat completions carry `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`;
completions carry the legacy columns `tokens`, `token_logprobs`, `top_logprobs` (a dict per token)
and `text_offset` (each token's start in the completion text, counted on across a stream's chunks).
A token's text is its own bytes (a byte-fallback piece of a longer character is shown decoded with
a replacement character, its exact bytes in `bytes`). JSON has no -inf: a token the distribution
excludes (outside top-k, under a grammar mask) gets -9999.0, as vLLM reports it. Knows tokens and
the two response shapes; nothing of the engine or HTTP.
"""

from __future__ import annotations

import math
from typing import Any

from gemlora.engine.sampler import TokenLogprobs
from gemlora.text.tokenizer import Tokenizer

EXCLUDED = -9999.0     # the logprob shown for a token with probability 0


def _finite(logprob: float) -> float:
    if math.isnan(logprob) or logprob == -math.inf:
        return EXCLUDED
    return min(max(logprob, EXCLUDED), 0.0)   # rounding can leave a certain token at +1e-7


class Logprobs:
    """Renders one generation's logprobs, chunk by chunk (completions' text offsets carry over)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0

    def render(self, logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        return self._chat(logprobs) if self.chat else self._completion(logprobs)

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(logprob), "bytes": list(raw)}

    def _chat(self, logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        content = [{**self._entry(lp.token, lp.logprob),
                    "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in logprobs]
        return {"content": content, "refusal": None}

    def _completion(self, logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            text = self._text(lp.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(lp.logprob))
            top: dict[str, float] = {}
            for t, v in lp.top:            # most likely first; two tokens with one text keep the likelier
                top.setdefault(self._text(t), _finite(v))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def _text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")
