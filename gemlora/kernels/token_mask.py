"""A grammar's token bitmask applied to logits: the C++ CPU kernel (cpu/token_mask.cpp) and its reference.

    logits[rows[j], v] = -inf  where bit (v % 32) of mask[j, v // 32] is 0        (in place)

The mask is int32 [len(rows), ceil(vocab / 32)], the layout grammar libraries (llguidance, xgrammar)
fill; tokens past its last word are disallowed. `rows` picks the logits rows the mask rows apply to
(all of them, in order, by default), so a step's constrained rows are masked where they lie. Knows tensors only: nothing of grammars or requests.
"""

from __future__ import annotations

import torch

from gemlora.kernels.build import extension


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [rows, words] -> bool [rows, vocab_size], True where the token is allowed."""
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=mask.device)) & 1
    allowed = bits.reshape(mask.shape[0], -1).bool()[:, :vocab_size]
    if allowed.shape[1] < vocab_size:
        allowed = torch.cat([allowed, allowed.new_zeros(mask.shape[0], vocab_size - allowed.shape[1])], dim=1)
    return allowed


def reference_apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor, rows: list[int] | None = None) -> None:
    rows = list(range(logits.shape[0])) if rows is None else list(rows)
    allowed = unpack(mask.to(logits.device), logits.shape[1])
    for j, r in enumerate(rows):
        logits[r].masked_fill_(~allowed[j], float("-inf"))


def apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor, rows: list[int] | None = None,
                        isa: str = "auto") -> None:
    """In place. The kernel (`isa`: "auto", "avx512_vnni", "avx2" or "scalar") for float32 rows on the CPU,
    the reference elsewhere."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.stride(-1) == 1:
        ext = extension()
        if ext is not None:
            at = torch.arange(mask.shape[0]) if rows is None else torch.tensor(rows, dtype=torch.int64)
            ext.apply_token_bitmask(logits, mask.to(torch.int32), at, isa)
            return
    reference_apply_token_bitmask(logits, mask, rows)
