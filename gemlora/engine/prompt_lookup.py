"""PromptLookup: draft tokens for one request from its own prompt and output (n-gram lookup).

Prompt-lookup decoding (Saxena 2023; vLLM's `ngram` method, llama.cpp's `lookup`): when the last n
tokens of a sequence occurred earlier in it, the tokens that followed that occurrence are a cheap
guess of what comes next. Edits, rewrites, code changes, extraction and summaries that quote their
source copy long runs of their prompt, and a guess that is right saves a whole decode step per token.
No extra weights: the draft costs a dictionary lookup.

It keeps, for each n in [min_n, max_n], the end of the latest occurrence of every n-gram seen so far
(but the sequence's own suffix), and extends that index by the tokens added since the last call, so
a step costs O(max_n) whatever the sequence's length. The longest n that matches wins; the latest
occurrence of it is followed. Knows token ids only: nothing of models, sampling or scheduling.
"""

from __future__ import annotations


class PromptLookup:
    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup needs 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self._indexed = 0          # every n-gram ending (exclusive) at or before this is in the index

    def extend(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Catch up with the sequence prompt_ids + output_ids (which only ever grows)."""
        have, p = len(self.tokens), len(prompt_ids)
        if have < p:
            self.tokens += prompt_ids[have:]
            have = p
        self.tokens += output_ids[have - p:]

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        toks, end = self.tokens, len(self.tokens)
        if k <= 0 or end <= self.min_n:
            return []
        for e in range(self._indexed + 1, end):          # every n-gram ending before the suffix does
            for n, ends in self._ends.items():
                if e >= n:
                    ends[tuple(toks[e - n:e])] = e
        self._indexed = max(self._indexed, end - 1)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            at = self._ends[n].get(tuple(toks[end - n:end]))
            if at is not None:
                return toks[at:at + k]
        return []
