"""TokenMasks: the output grammars of a step's sampling rows, as one bitmask filled while the model runs.

Owns `TokenConstraint`, all the engine knows of a request's output grammar (fill its row of an int32
token bitmask, accept the sampled token, say when the output is complete), and one worker thread
that fills a step's bitmask while the model computes the same step's logits: grammar libraries
release the GIL while they compute a mask, and the model's kernels do too. Knows nothing of JSON,
schemas or text; the sampler applies the mask.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

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
        for j, constraint in enumerate(constraints):
            constraint.fill_bitmask(bitmask, j)
        return rows, bitmask
