"""GrammarConstraint: one request's output grammar in flight, an llguidance matcher behind the engine's
TokenConstraint interface (gemlora.engine.token_masks).

Owns the matcher's state for one request: the mask of tokens allowed next, the tokens it accepted,
and whether the output is complete. A token the matcher refuses (it cannot happen when the token was
sampled under its mask) leaves it in an error state whose mask allows only end-of-sequence, so the
request ends rather than running on unconstrained. Knows nothing of schemas, HTTP or the scheduler.
"""

from __future__ import annotations

import llguidance
import llguidance.torch
import torch


class GrammarConstraint:
    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None
