"""Module-name patterns from a tenant's adapter_config.json, evaluated in time linear in the name.

PEFT reads several config fields as Python regexes (`target_modules` and `exclude_modules` given as a
string, `layers_pattern`, the keys of `rank_pattern` / `alpha_pattern`). Python's `re` backtracks and
holds the GIL while it does: one 9-character pattern like `(.*.*)*x` never returns on a real module
name, freezing the event loop, the engine thread and every later start that validates the file.
These patterns are matched here by RE2 (`google-re2`), which runs in time linear in the text and
memory bounded by `MAX_PROGRAM_BYTES`, keeping PEFT's semantics for what RE2 accepts: Perl-style
leftmost-first submatches, the same syntax for everything module names need. A pattern RE2 cannot
run in bounded time (backreferences, lookarounds, atomic groups) or that Python's `re` would not
accept either is refused with a PatternError naming the field, the pattern and why; adapters trained
with such patterns are rare and can be saved with a list of module names instead.

Owns compiling, counting and matching patterns; knows nothing of adapters' tensors, models or files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import re2

MAX_PATTERN_CHARS = 4096        # per pattern; a real one is a few dozen characters
MAX_PATTERNS = 1024             # patterns and list entries per config (an EVA rank_pattern names each module)
MAX_PROGRAM_BYTES = 1 << 20     # RE2's memory for one compiled pattern

_OPTIONS = re2.Options()
_OPTIONS.max_mem = MAX_PROGRAM_BYTES
_OPTIONS.log_errors = False


class PatternError(ValueError):
    """A pattern that cannot be evaluated in bounded time, or is not a valid regex."""


def compile_pattern(pattern: str, what: str, template: str = "{}"):
    """`template` with `pattern` put in it (e.g. "(?:.*\\.)?(?:{})"), compiled by RE2; PatternError if it
    is too long, invalid for Python's `re` (what PEFT would have run) or beyond RE2."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{what} is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are accepted")
    try:
        re.compile(pattern)   # compiling is bounded; only matching backtracks
    except re.error as e:
        raise PatternError(f"{what} {pattern!r} is not a valid regex ({e})") from None
    try:
        return re2.compile(template.format(pattern), _OPTIONS)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(f"{what} {pattern!r} cannot be evaluated in bounded time ({why}); backreferences, "
                           "lookarounds and very large repetitions are not supported: list the module names "
                           "instead") from None


def check_count(counts: Iterable[int]) -> None:
    total = sum(counts)
    if total > MAX_PATTERNS:
        raise PatternError(f"the config holds {total} patterns and module names; at most {MAX_PATTERNS} are "
                           "accepted")


class FirstMatch:
    """PEFT's get_pattern_key over `keys` in order: the first key K such that `(.*\\.)?(K)$` matches a
    name. One RE2 program per key, never a combined RE2::Set: a Set whose DFA runs out of memory
    reports "no match" where a single program falls back to its NFA and stays exact."""

    def __init__(self, keys: Sequence[str], what: str):
        self._programs = [(key, compile_pattern(key, f"{what} key", r"(?:.*\.)?(?:{})")) for key in keys]

    def first(self, name: str) -> str | None:
        return next((key for key, program in self._programs if program.fullmatch(name)), None)
