"""GrammarConstraint: one request's output grammar in flight, an llguidance matcher behind the engine's
TokenConstraint interface (gemlora.engine.token_masks).

Owns the matcher's state for one request: the mask of tokens allowed next, the tokens it accepted,
and whether the output is complete. A token the matcher refuses (it cannot happen when the token was
sampled under its mask) leaves it in an error state whose mask allows only end-of-sequence, so the
request ends rather than running on unconstrained. A step's constraints are filled together by
`fill_rows`, one call into llguidance's thread pool that runs without the GIL. Knows nothing of
schemas, HTTP or the scheduler.
"""

from __future__ import annotations

import llguidance
import llguidance.torch
import torch


_executor: llguidance.LLExecutor | None = None


class GrammarConstraint:
    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    @staticmethod
    def fill_rows(constraints: list[GrammarConstraint], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Row rows[j] of `bitmask` for constraints[j], all in one call (in parallel where there are cores)."""
        global _executor
        if _executor is None:
            _executor = llguidance.LLExecutor(max(1, min(torch.get_num_threads(), 8)))
        llguidance.torch.fill_next_token_bitmask_par(
            _executor, [(c._matcher, row) for c, row in zip(constraints, rows)], bitmask)

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None
