"""JsonCloser: the shortest way to finish a JSON output from where a grammar's matcher stands, so that a
constrained answer can be steered to close before its token budget runs out.

Owns two things. `JsonScan`, the lexical place in the JSON text written so far (inside a string or a
key, a number, a literal; expecting a value, a key, a ':' or what follows a value; the open objects
and arrays), fed the bytes of each accepted token. And `plan(matcher, scan)`: walking a copy-free
greedy path through the matcher (consume, then roll back) that takes, at each point, the tokens the
grammar forces, else the first token the grammar allows from a short list of closers fit for the
place (`"` in a string; `}` / `]` / `,` after a value; `0`, `""`, `[]`, `{}` for a value; `}` before
an optional key; before them, FunctionGemma's <escape> and <end_function_call> tokens where the
tokenizer has them, which end its strings and calls), else the longest allowed token that opens nothing (a member of an enum, a digit a
pattern needs). The path ends where the grammar accepts; its length is the number of tokens the
output still needs at the least, as far as the greedy choice finds (JSON's shortest completion is
greedy at every place but one: a value whose shortest form the list does not try first; the length
is then an upper bound, which keeps steering safe, since it only starts earlier).

Knows llguidance's matcher and token bytes; nothing of schemas, the engine, HTTP or requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import llguidance
import llguidance.torch
import torch

from gemlora.text.tool_format import END_CALL, ESCAPE

PLAN_LIMIT = 256          # tokens a plan may take; past it the output cannot be steered (said, not hidden)

# the closers to try first at each place, best first
_CANDIDATES = {
    "string": ('"',),
    "key_string": ('"',),
    "number": ("}", "]", ","),
    "literal": (),
    "value": ("0", '""', "[]", "{}", '"', "[", "{", "null"),
    "first_value": ("]", "0", '""', "[]", "{}", '"', "[", "{", "null"),    # just after '[': may close at once
    "key": ('"',),
    "first_key": ("}", '"'),                          # just after '{': the object may close at once
    "colon": (":",),
    "after": ("}", "]", ","),
}
_OPENERS = frozenset(b"{[,:")
# where no closer fits (a string's pattern, format or minimum length; a number's range): single characters
# to write before one does, each tried first with a closer after it (one token of lookahead)
_FILLERS = {
    "string": ("a", "1", "0", ":", "/", ".", "-", "@", "_", "A", " "),
    "key_string": ("a", "1", "_"),
    "number": ("1", "2", "5", "9", ".", "0", "e", "-", "+"),
}
_ENDERS = {"string": ('"',), "key_string": ('"',), "number": (",", "}", "]")}


@dataclass
class JsonScan:
    """Where JSON text stands lexically. Whitespace outside strings is skipped; the grammar has already
    made the text valid, so nothing here checks it."""
    where: str = "value"
    stack: list[str] = field(default_factory=list)
    escape: bool = False

    def copy(self) -> JsonScan:
        return JsonScan(self.where, list(self.stack), self.escape)

    def feed(self, data: bytes) -> None:
        for byte in data:
            self._char(chr(byte))

    def _char(self, c: str) -> None:
        where = self.where
        if where in ("string", "key_string"):
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.where = "colon" if where == "key_string" else "after"
            return
        if where == "number":
            if c in "0123456789.eE+-":
                return
            self.where = "after"
        elif where == "literal":
            if c.isalpha():
                return
            self.where = "after"
        if c in " \t\r\n":
            return
        where = self.where
        if where in ("value", "first_value"):
            if c == '"':
                self.where = "string"
            elif c in "{[":
                self.stack.append(c)
                self.where = "first_key" if c == "{" else "first_value"
            elif c in "]}" and self.stack:           # an empty array closes where a value could start
                self.stack.pop()
                self.where = "after"
            elif c in "-0123456789":
                self.where = "number"
            else:
                self.where = "literal"
        elif where in ("key", "first_key"):
            if c == '"':
                self.where = "key_string"
            elif c == "}" and self.stack:
                self.stack.pop()
                self.where = "after"
        elif where == "colon":
            if c == ":":
                self.where = "value"
        elif where == "after":
            if c == ",":
                self.where = "key" if self.stack and self.stack[-1] == "{" else "value"
            elif c in "]}" and self.stack:
                self.stack.pop()


class JsonCloser:
    """Plans for one tokenizer: built once per grammar set, shared by every request's constraint."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self.stop_token_ids = frozenset(stop_token_ids)
        # each closer also with the space a separator's style may put before it (`": "` then `0`)
        self._candidates = {place: [t for t in (self._single_token(s + text) for text in texts for s in ("", " "))
                                    if t is not None]
                            for place, texts in _CANDIDATES.items()}
        self._fillers = {place: self._ids(texts) for place, texts in _FILLERS.items()}
        self._enders = {place: self._ids(texts) for place, texts in _ENDERS.items()}
        # FunctionGemma's closers, where the tokenizer has them as its own tokens: its strings end with
        # <escape> (which JSON's scan does not know as a quote) and its calls with <end_function_call>
        self._closers = [t for t in self._ids((ESCAPE, END_CALL)) if tokenizer.is_special_token(t)]
        self._bytes_cache: dict[int, bytes] = {}
        self._fallback_rank: torch.Tensor | None = None     # per token: its length in bytes, -1 if it opens

    def _ids(self, texts) -> list[int]:
        return [t for t in map(self._single_token, texts) if t is not None]

    def _single_token(self, text: str) -> int | None:
        ids = self._tokenizer.tokenize_str(text)
        return ids[0] if len(ids) == 1 else None

    def token_bytes(self, token: int) -> bytes:
        data = self._bytes_cache.get(token)
        if data is None:
            data = self._bytes_cache[token] = self._tokenizer.decode_bytes([token])
        return data

    def plan(self, matcher: llguidance.LLMatcher, scan: JsonScan) -> list[int] | None:
        """The tokens that finish the output from the matcher's state, shortest the greedy walk finds ([] if
        the grammar accepts already), or None if none within PLAN_LIMIT. The matcher is left as it was."""
        if matcher.is_error():
            return None
        scan, taken = scan.copy(), []
        try:
            while not (matcher.is_accepting() or matcher.is_stopped()):
                if len(taken) >= PLAN_LIMIT:
                    return None
                forced = matcher.compute_ff_tokens()
                tokens = forced or [self._next(matcher, scan, taken)]
                if tokens[0] is None or matcher.validate_tokens(tokens) != len(tokens):
                    return None
                matcher.consume_tokens(tokens)
                taken.extend(tokens)
                for t in tokens:
                    scan.feed(self.token_bytes(t))
            return taken
        finally:
            if taken:
                matcher.rollback(len(taken))

    def _next(self, matcher: llguidance.LLMatcher, scan: JsonScan, taken: list[int]) -> int | None:
        for token in self._closers:
            if matcher.validate_tokens([token]) == 1:
                return token
        for token in self._candidates[scan.where]:
            if matcher.validate_tokens([token]) == 1:
                return token
        fillers, enders = self._fillers.get(scan.where, ()), self._enders.get(scan.where, ())
        for token in fillers:                     # one that lets the item end right after it
            if any(matcher.validate_tokens([token, end]) == 2 for end in enders):
                return token
        recent = taken[-3:]
        for token in fillers:                     # else one that goes on, unless it is looping
            if matcher.validate_tokens([token]) == 1 and recent.count(token) < 3:
                return token
        return self._fallback(matcher)

    def _fallback(self, matcher: llguidance.LLMatcher) -> int | None:
        """The longest allowed token that opens nothing (ties: the lowest id, "0" last), else the lowest
        allowed one."""
        words = (self._vocab_size + 31) // 32
        bitmask = torch.zeros(1, words, dtype=torch.int32)
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        allowed = ((bitmask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:self._vocab_size]
        allowed = allowed.bool()
        for t in self.stop_token_ids:
            if t < self._vocab_size:
                allowed[t] = False
        if not allowed.any():
            return None
        rank = torch.where(allowed, self._ranks(), torch.tensor(-2, dtype=torch.int32))
        return int(torch.argmax(rank))           # the first of the highest: the lowest id among the longest

    def warm(self) -> None:
        self._ranks()

    def _ranks(self) -> torch.Tensor:
        if self._fallback_rank is None:           # once per tokenizer (~0.3 s for 262k tokens)
            rank = torch.empty(self._vocab_size, dtype=torch.int32)
            for t in range(self._vocab_size):
                data = self._tokenizer.decode_bytes([t])
                # longer first; a lone "0" after the other digits, since a number may need a non-zero one
                # (llguidance's range for [-90, 90] has no "-0", so "-0." must go on to "-0.1")
                rank[t] = -1 if _OPENERS.intersection(data) else 2 * len(data) - (data == b"0")
            self._fallback_rank = rank
        return self._fallback_rank
