"""JsonGrammars: OutputFormats compiled into grammar constraints for one tokenizer, by llguidance.

Why llguidance (measured on the embedded model's 262,144-token vocabulary, bench/grammar_libraries.py,
2026-12-06, with a benchmark server running beside it): it compiles a schema 5-8x faster than xgrammar 0.2.9 (5.8 against 46 ms for a
nested schema; a request's schema is compiled before its first token), computes a token mask in
tens of microseconds as xgrammar does, with a better worst case (0.2 against 4.1 ms), names the
schema features it cannot enforce instead of ignoring them, and is one dependency-free wheel
(xgrammar needs torch, transformers, triton and tvm-ffi).

Owns the llguidance tokenizer (built once, ~2-3 s, on first use or at start by `warm`), the JSON
style of the output (one line, `", "` and `": "` separators: whitespace stays in the model's hands
nowhere, so it cannot run on in blank lines), the check that refuses schemas it cannot enforce, and
an LRU cache of checked grammars keyed by (salt, schema), so each account's repeated schema is
compiled once; a request gets a fresh copy of the compiled matcher. The cache is bounded in bytes, in
total and per salt (account), so one tenant's stream of distinct schemas evicts its own grammars, not
the others'; a grammar's bytes are estimated from its schema's size (llguidance does not report them:
measured 1.3-2.8 MB for 54 KB schemas). Knows nothing of HTTP or the engine.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, OrderedDict

import llguidance
import llguidance.torch
import torch

from gemlora.structured.grammar_constraint import GrammarConstraint
from gemlora.structured.json_closer import JsonCloser
from gemlora.structured.output_format import OutputFormat, OutputFormatError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# One llguidance tokenizer per (tokenizer, vocabulary, stop tokens) in the process: it takes seconds to build.
# (with its closer, whose token table takes ~0.5 s more: both are built off the engine's thread)
_TOKENIZERS: dict[tuple[str, int, tuple[int, ...]], tuple[llguidance.LLTokenizer, JsonCloser]] = {}
_TOKENIZERS_LOCK = threading.Lock()


class JsonGrammars:
    def __init__(self, tokenizer_json, vocab_size: int, stop_token_ids: list[int], cache_size: int = 1024,
                 cache_bytes: int = 256 * 2**20, salt_cache_bytes: int = 64 * 2**20):
        self._tokenizer_json = tokenizer_json     # the tokenizer's JSON, or a function giving it (read when needed)
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_token_ids)
        self._cache: OrderedDict[tuple[str, str | None], tuple[llguidance.LLMatcher, int]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes, self._salt_cache_bytes = cache_bytes, salt_cache_bytes
        self._bytes = 0
        self._salt_bytes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._closer: JsonCloser | None = None

    def warm(self) -> None:
        """Build the tokenizer now (a server calls this on a thread at start)."""
        self._llg_tokenizer()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            text = self._tokenizer_json() if callable(self._tokenizer_json) else self._tokenizer_json
            key = (hashlib.sha256(text.encode()).hexdigest(), self._vocab_size, tuple(self._stop_ids))
            with _TOKENIZERS_LOCK:
                if key not in _TOKENIZERS:
                    tokenizer = llguidance.LLTokenizer(text, n_vocab=self._vocab_size, eos_token=self._stop_ids)
                    closer = JsonCloser(tokenizer, self._vocab_size, self._stop_ids)
                    closer.warm()
                    _TOKENIZERS[key] = (tokenizer, closer)
                self._tokenizer, self._closer = _TOKENIZERS[key]
        return self._tokenizer

    def constraint(self, fmt: OutputFormat, salt: str = "") -> GrammarConstraint:
        """A fresh constraint for one request. Raises OutputFormatError naming what cannot be enforced."""
        key = (salt, fmt.lark or fmt.schema)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
        if entry is None:
            entry = (self._compile(fmt), grammar_bytes(fmt))
            with self._lock:
                self._remember(key, entry)
        return GrammarConstraint(entry[0].deep_copy(), self._closer)

    def _remember(self, key: tuple[str, str | None], entry: tuple[llguidance.LLMatcher, int]) -> None:
        """Under the lock: cache `entry`, first evicting the salt's own oldest grammars past its budget,
        then the oldest of all past the total."""
        salt, cost = key[0], entry[1]
        if key in self._cache or cost > self._salt_cache_bytes:
            return
        for old in [k for k in self._cache if k[0] == salt]:
            if self._salt_bytes[salt] + cost <= self._salt_cache_bytes:
                break
            self._forget(old)
        while self._cache and (self._bytes + cost > self._cache_bytes or len(self._cache) >= self._cache_size):
            self._forget(next(iter(self._cache)))
        self._cache[key] = entry
        self._bytes += cost
        self._salt_bytes[salt] += cost

    def _forget(self, key: tuple[str, str | None]) -> None:
        _, cost = self._cache.pop(key)
        self._bytes -= cost
        self._salt_bytes[key[0]] -= cost
        if not self._salt_bytes[key[0]]:
            del self._salt_bytes[key[0]]

    def cached_bytes(self, salt: str | None = None) -> int:
        """The estimated bytes of the cached grammars, of one salt or of all."""
        with self._lock:
            return self._bytes if salt is None else self._salt_bytes.get(salt, 0)

    def _compile(self, fmt: OutputFormat) -> llguidance.LLMatcher:
        tokenizer = self._llg_tokenizer()
        schema = {"type": "object"} if fmt.json_object else None if fmt.lark else json.loads(fmt.schema)
        try:
            if fmt.lark is not None:
                grammar = llguidance.LLMatcher.grammar_from_lark(fmt.lark)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except (ValueError, TypeError) as exc:
            raise OutputFormatError(f"the JSON schema cannot be used: {exc}", fmt.field) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error or messages:     # a feature it would not enforce is refused, never ignored
            raise OutputFormatError("the JSON schema cannot be enforced: " + "; ".join(messages), fmt.field)
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        if matcher.is_error():
            raise OutputFormatError(f"the JSON schema cannot be enforced: {_first_line(matcher.get_error())}", fmt.field)
        self._probe(matcher, fmt)
        return matcher

    def _probe(self, matcher: llguidance.LLMatcher, fmt: OutputFormat) -> None:
        """Walks the output's forced start (the tokens the grammar leaves no choice about) and computes the
        mask after it, on a copy: a schema llguidance accepts but cannot follow (a required recursive $ref,
        $defs that only refer to each other, a regex past its lexer's limits) fails here, before any token
        is generated, instead of ending the output after one token with '', '"' or '{"'."""
        probe = matcher.deep_copy()
        mask = torch.zeros(1, (self._vocab_size + 31) // 32, dtype=torch.int32)
        for _ in range(_PROBE_ROUNDS):
            forced = probe.compute_ff_tokens()
            if forced:
                probe.consume_tokens(forced)
            if not probe.is_error():
                llguidance.torch.fill_next_token_bitmask(probe, mask, 0)
            if probe.is_error():
                raise OutputFormatError(f"the JSON schema cannot be enforced: {_first_line(probe.get_error())}",
                                        fmt.field)
            if not forced or probe.is_stopped():
                return


_PROBE_ROUNDS = 8


def grammar_bytes(fmt: OutputFormat) -> int:
    """A compiled grammar's memory, estimated from its schema (a fixed part and ~48 bytes per schema byte:
    2.9 MB for a 54 KB schema, the top of what was measured)."""
    return 256 * 2**10 + 48 * len((fmt.lark or fmt.schema or "").encode())


def _first_line(error: str) -> str:
    """llguidance's error without the parser state dump that follows it."""
    return error.strip().splitlines()[0] if error.strip() else "the grammar failed"
