"""ScreenedHead: the LM head read in 4 bits, with the exact logits of the tokens that can win.

A decode step of a small Gemma reads its LM head more than anything else: the embedded 270M model's
262k x 640 table is 178 MB in 8 bits, 62% of the bytes a batch-1 step reads, and it is tied to the
embedding. This reads a 4-bit copy instead (round-to-nearest, groups of 32, min/max: 105 MB), its
activations quantized in one int8 pass (half the integer work of int8x2), to screen the vocabulary:
the `candidates` tokens with the highest coarse logits get their exact logits (the exact weight's
rows, dequantized, against the activations quantized as the exact path's kernel quantizes them, in
float64: the exact path's values to float rounding), and every other token's coarse logit is lowered
to just below the least of those. So the argmax is the exact path's whenever it is among the
candidates: on the embedded model, teacher-forced over 835 tokens of varied text, the 4-bit logits
alone agree on 89.5% of next tokens, their top 8 rescored on 100% (the coarse logits are off by 0.35
on average, 4.2 at most; the exact first token and the 64th are whole logits apart). The tail is only
a floor: a sampler drawing from the whole vocabulary would see it off by the coarse error (total
variation 1% at temperature 1), so only rows decided by their top tokens (greedy, top_k <=
candidates) come here.

Rows whose token depends on more than their top tokens (a full-vocabulary draw, logprobs, penalties,
grammar masks) are the caller's to send to the exact head; here every row given is screened. Built
once from the exact weight, a chunk of rows at a time (no full dense transient). Knows quantized
weights and the CPU kernels; nothing of requests or models.
"""

from __future__ import annotations

from typing import Callable

import torch

from gemlora.kernels import qmatmul as kernels
from gemlora.kernels.top_k import place_top, top_k_ids
from gemlora.quant import rtn
from gemlora.quant.tensor import stack_rows

CANDIDATES = 64           # tokens rescored exactly per row
MIN_BYTES = 32 * 2**20    # a smaller head reads in less time than the screening's fixed costs (top-k, rescoring)
_CHUNK_ROWS = 16384       # rows dequantized at once while building the 4-bit copy


class ScreenedHead:
    def __init__(self, rows: Callable[[torch.Tensor], torch.Tensor],
                 exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], vocab: int, hidden: int,
                 candidates: int = CANDIDATES):
        """`rows(ids)` -> the exact weight's rows `ids` as float32 [len(ids), hidden] (to build the copy
        from); `exact(x, ids)` -> the exact path's logits of tokens ids [M, C] for x [M, hidden]."""
        if kernels.extension() is None:
            raise RuntimeError("the screened LM head needs the CPU kernels")
        self.exact, self.vocab, self.hidden = exact, vocab, hidden
        self.candidates = min(candidates, vocab)
        parts = [rtn.quantize(rows(torch.arange(r0, min(vocab, r0 + _CHUNK_ROWS))), 4)
                 for r0 in range(0, vocab, _CHUNK_ROWS)]
        self.coarse = kernels.pack(stack_rows(parts) if len(parts) > 1 else parts[0])

    @classmethod
    def of(cls, weight, vocab: int, hidden: int, candidates: int = CANDIDATES) -> ScreenedHead:
        """From the LM head's weight: a dense [vocab, hidden] tensor or a single-part QuantWeight."""
        if isinstance(weight, torch.Tensor):
            dense = weight.detach()
            return cls(lambda ids: dense[ids].float(), lambda x, ids: kernels.rows_dot(dense[ids], x),
                       vocab, hidden, candidates)
        return cls(lambda ids: weight.take_rows(ids, torch.float32), weight.matmul_rows, vocab, hidden, candidates)

    @property
    def nbytes(self) -> int:
        return self.coarse.nbytes

    @staticmethod
    def pays(weight, vocab: int, hidden: int) -> bool:
        """Does the 4-bit copy read at most 2/3 of the bytes of `weight`, and the head at least MIN_BYTES
        (so a step saves more than the screening costs)? A head already in 4 or 5 bits gains nothing
        from it. (Also: can it be built: one part, rows a multiple of the group long.)"""
        if hidden % rtn.GROUP or not (isinstance(weight, torch.Tensor) or len(weight.activations) == 1):
            return False
        exact = weight.nelement() * weight.element_size() if isinstance(weight, torch.Tensor) else weight.nbytes
        coarse = vocab * hidden // 2 + vocab * (hidden // rtn.GROUP) * 4      # codes, fp16 scale and bias
        return exact >= MIN_BYTES and 3 * coarse <= 2 * exact

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, hidden] -> float32 logits [M, vocab]: exact at each row's top candidates, coarse
        elsewhere but always below the lowest candidate, so the row's top `candidates` tokens are its
        candidates, in their exact order."""
        logits = self.coarse.matmul(x, "int8")
        top = top_k_ids(logits, self.candidates)                                         # [M, C]
        return place_top(logits, top, self.exact(x, top))
