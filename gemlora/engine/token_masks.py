"""TokenMasks: the output grammars of a step's sampling rows, as one bitmask filled while the model runs.

Owns `TokenConstraint`, all the engine knows of a request's output grammar (fill its row of an int32
token bitmask, accept the sampled token, say when the output is complete), and one worker thread
that fills a step's bitmask while the model computes the same step's logits: grammar libraries
release the GIL while they compute a mask, and the model's kernels do too. Constraints that share a
`fill_rows` function are filled by one call to it (a library's batch fill: one trip through Python
for all rows, so the worker does not queue for the GIL behind the model's Python once per row).
Knows nothing of JSON, schemas or text; the sampler applies the mask.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Protocol

import torch

from gemlora.kernels.token_mask import mask_words


class TokenConstraint(Protocol):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row `row` of int32 [rows, ceil(vocab / 32)] to the tokens allowed next (bit v % 32 of word v // 32)."""

    def accept(self, token: int) -> None:
        """The token sampled from the mask just filled."""

    @property
    def finished(self) -> bool:
        """The output is complete: nothing may follow it."""

    @property
    def error(self) -> str | None:
        """Why the grammar cannot go on (it failed past its limits), or None."""

    # Optional: limit(budget), told the tokens the request may still produce, and steer(token) -> the token
    # to take instead of the sampled one so that the output can still be finished within that budget
    # (gemlora.structured.grammar_constraint). Request calls them.
    # Optional: fill_rows(constraints, bitmask, rows), filling row rows[j] for constraints[j], all of the
    # same kind; a static function, so that constraints of one kind share it.


class TokenMasks:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._worker: ThreadPoolExecutor | None = None

    def start(self, constraints: list[TokenConstraint | None]) -> Future | None:
        """Begin filling the masks of the constrained rows among `constraints` (one per sampling row).
        The future gives (their row indices, int32 bitmask [len(indices), words])."""
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="gemlora-token-masks")
        return self._worker.submit(self._fill, rows, [constraints[i] for i in rows])

    def _fill(self, rows: list[int], constraints: list[TokenConstraint]) -> tuple[list[int], torch.Tensor]:
        bitmask = torch.full((len(rows), mask_words(self.vocab_size)), -1, dtype=torch.int32)
        batches: dict[Callable, list[int]] = {}
        for j, constraint in enumerate(constraints):
            fill_rows = getattr(constraint, "fill_rows", None)
            if fill_rows is None:
                constraint.fill_bitmask(bitmask, j)
            else:
                batches.setdefault(fill_rows, []).append(j)
        for fill_rows, js in batches.items():
            fill_rows([constraints[j] for j in js], bitmask, js)
        return rows, bitmask
