"""GrammarConstraint: one request's output grammar in flight, an llguidance matcher behind the engine's
TokenConstraint interface (gemlora.engine.token_masks).

Owns the matcher's state for one request: the mask of tokens allowed next, the tokens it accepted,
and whether the output is complete. A token the matcher refuses (it cannot happen when the token was
sampled under its mask) leaves it in an error state whose mask allows only end-of-sequence, so the
request ends rather than running on unconstrained. A step's constraints are filled together by
`fill_rows`, one call into llguidance's thread pool that runs without the GIL.

Budget steering (with a closer, gemlora.structured.json_closer): told how many tokens the request may
still produce (`limit`), it keeps the output finishable within them. Each accepted token is checked
(`steer`): one after which the shortest completion no longer fits the budget left is replaced by the
first token of the shortest completion from before it; and once the budget equals that completion's
length, the mask allows only its next token. So an output whose grammar could be met within its
budget when it started always ends valid. Knows nothing of schemas, HTTP or the scheduler.
"""

from __future__ import annotations

import llguidance
import llguidance.torch
import torch

from gemlora.structured.json_closer import JsonCloser, JsonScan

_executor: llguidance.LLExecutor | None = None
STEER_MARGIN = 64    # tokens one token would have to add to the shortest completion to escape the check
REPLAN = 16          # tokens after which a plan's length is measured again, even far from the budget
REPLAN_FAILED = 64   # ... after a plan that reached PLAN_LIMIT (a walk of PLAN_LIMIT tokens costs ~1-2 ms)


class GrammarConstraint:
    def __init__(self, matcher: llguidance.LLMatcher, closer: JsonCloser | None = None):
        self._matcher = matcher
        self._closer = closer
        self._scan = JsonScan()
        self._budget: int | None = None         # tokens the request may still produce; None: not steered
        self._plan: list[int] | None = None      # the shortest completion from the current state, when known
        self._planned = False
        self._known: int | None = None          # the last plan's length (-1: none found), `_stale` tokens ago
        self._stale = 0
        self._next: tuple[int, list[int] | None] | None = None   # (token, plan after it), found by steer
        self.steered = 0                         # tokens replaced or forced by budget steering

    # ---- budget steering ---------------------------------------------------------------------------

    def shortest(self) -> int | None:
        """The tokens the output needs at the least from here (None: unknown, or no closer)."""
        plan = self._current_plan()
        return None if plan is None else len(plan)

    def limit(self, budget: int) -> None:
        """At most `budget` more tokens may be generated (this request's max_tokens and context window)."""
        self._budget = budget

    def _current_plan(self) -> list[int] | None:
        if self._closer is None:
            return None
        if not self._planned:
            self._plan, self._planned = self._closer.plan(self._matcher, self._scan), True
            self._known, self._stale = (-1 if self._plan is None else len(self._plan)), 0
        return self._plan

    def _far(self) -> bool:
        """The budget is so far beyond the last known shortest completion (measured at most REPLAN tokens
        ago) that no check is needed yet: planning costs ~0.1-1 ms, so it is done near the budget only."""
        if self._known is None:
            return False
        if self._known < 0:                 # no plan within PLAN_LIMIT: the output is far from its end
            return self._stale < REPLAN_FAILED
        return self._stale < REPLAN and self._budget - 1 > self._known + self._stale + STEER_MARGIN

    def _must_close(self) -> bool:
        """The budget left is exactly what the shortest completion needs: only its next token may come."""
        if self._budget is None or self._closer is None or self._far():
            return False
        plan = self._current_plan()
        return bool(plan) and len(plan) >= self._budget

    def steer(self, token: int) -> int:
        """The token to take in place of the sampled `token`: itself, unless after it the output could no
        longer be finished within the budget; then the next token of the shortest completion (or a stop
        token, when the output is already complete)."""
        if self._budget is None or self._closer is None or self._far():
            return token
        before = self._current_plan()
        if before is None or self._matcher.validate_tokens([token]) != 1:
            return token                          # nothing to steer by / refused anyway (error path)
        self._matcher.consume_token(token)
        scan = self._scan.copy()
        scan.feed(self._closer.token_bytes(token))
        after = self._closer.plan(self._matcher, scan)
        self._matcher.rollback(1)
        if after is not None and len(after) <= self._budget - 1:
            self._next = (token, after)
            return token
        self.steered += 1
        if before:
            return before[0]
        return min(self._closer.stop_token_ids)   # complete already: end it here

    # ---- the TokenConstraint interface -------------------------------------------------------------

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._must_close():
            self._only(bitmask, row, self._current_plan()[0])
        else:
            llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    @staticmethod
    def _only(bitmask: torch.Tensor, row: int, token: int) -> None:
        bit = 1 << (token % 32)
        bitmask[row].zero_()
        bitmask[row, token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit     # int32 words

    @staticmethod
    def fill_rows(constraints: list[GrammarConstraint], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Row rows[j] of `bitmask` for constraints[j], all in one call (in parallel where there are cores)."""
        global _executor
        if _executor is None:
            _executor = llguidance.LLExecutor(max(1, min(torch.get_num_threads(), 8)))
        closing = [c._must_close() for c in constraints]
        free = [(c._matcher, row) for c, row, close in zip(constraints, rows, closing) if not close]
        if free:
            llguidance.torch.fill_next_token_bitmask_par(_executor, free, bitmask)
        for c, row, close in zip(constraints, rows, closing):
            if close:
                c._only(bitmask, row, c._current_plan()[0])

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)
        if self._closer is not None:
            self._scan.feed(self._closer.token_bytes(token))
        self._planned, self._stale = False, self._stale + 1
        if self._next is not None and self._next[0] == token:
            self._plan, self._planned = self._next[1], True
            self._known, self._stale = (-1 if self._plan is None else len(self._plan)), 0
        self._next = None
        if self._budget is not None:
            self._budget -= 1

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None
