"""The decode stack: every decoder layer of a decode-only step in one C++ call (cpu/decode_stack.cpp).

It runs the kernels the model's Python layers run (qmatmul or at::linear, rms_norm, norm_rope, the
KV write, decode_attention, gelu), in the same order on the same layouts, so its output equals the
model's layer loop bit for bit: that loop is its reference (tests/test_decode_stack.py), and a
request decodes to the same tokens whichever of the two ran its step. It only removes the Python
between the kernels, a fifth of a batch-1 decode step of the 270M model.

It applies to steps whose rows all decode one token (one group of rows, in step order), in float32
on the CPU, with every projection packed for the CPU kernels or dense; anything else takes the layer
loop. Adapters in the step are applied by the kernel the Python layers call (gemlora.kernels.lora),
on the adapter slots' tensors, attached once per set of slots. Built once from the weights it is
given (a served model's weights do not change). Knows tensors, packed matrices, the attention plan's
decode rows and the step's adapter layout; nothing of requests or adapters' identities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemlora.kernels.build import extension
from gemlora.kernels.lora import kernel_applies
from gemlora.kernels.qmatmul import CPUPacked


@dataclass(frozen=True)
class StackShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    attn_scale: float
    softcap: float | None
    sandwich: bool                       # Gemma 2/3's four norms per layer (else Gemma 1's two)


@dataclass
class LayerWeights:
    """One decoder layer as the stack takes it. A projection is a list of parts whose outputs are
    concatenated: (CPUPacked, activations) pairs or one dense float32 [out, in] tensor."""
    qkv: list
    o: list
    gate_up: list
    down: list
    norms: list[torch.Tensor]            # float32 1 + w: input, post-attention (, pre- and post-feedforward)
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    sliding: bool


def _matrix(part):
    ext = extension()
    if isinstance(part, torch.Tensor):
        return ext.StackMatrix.dense(part)
    packed, activations = part
    if not isinstance(packed, CPUPacked):
        raise TypeError("the decode stack takes CPU-packed or dense weights")
    return ext.StackMatrix(packed.codes, packed.scales, packed.bias, packed.rows, packed.cols, packed.bits,
                           packed.group, packed.offset, activations)


class DecodeStack:
    def __init__(self, shape: StackShape, layers: list[LayerWeights]):
        ext = extension()
        if ext is None:
            raise RuntimeError("the CPU kernels are not available here")
        self._stack = ext.DecodeStack(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.eps,
                                      shape.attn_scale, shape.softcap or 0.0, shape.sandwich)
        self._lora_slots = None      # the LoRASlots whose tensors are attached
        for lw in layers:
            self._stack.add_layer([_matrix(p) for p in lw.qkv], [_matrix(p) for p in lw.o],
                                  [_matrix(p) for p in lw.gate_up], [_matrix(p) for p in lw.down], lw.norms,
                                  lw.q_norm, lw.k_norm, lw.sliding)

    def attach_lora(self, slots, keys: list[list[str]]) -> None:
        """slots: a LoRASlots; keys[i]: layer i's projections' keys in it (qkv, o, gate_up, down)."""
        for i, layer in enumerate(keys):
            self._stack.attach_lora(i, [slots.A[k] for k in layer], [slots.B[k] for k in layer],
                                    [slots.patched[k] for k in layer], [list(slots.part_offsets[k]) for k in layer])
        self._lora_slots = slots

    def attached(self, slots) -> bool:
        return self._lora_slots is slots

    @staticmethod
    def applies(x: torch.Tensor, attn, kv_caches, lora) -> bool:
        """Can the stack run this step? (decode rows only, one group in order, float32 CPU; adapters
        where the LoRA kernel serves them)"""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        if lora is not None and not kernel_applies(x, next(iter(lora.slots.A.values()))):
            return False
        for plan in (attn.global_plan, attn.sliding_plan):
            if plan.chunks or len(plan.rows) != 1 or plan.rows[0].tokens is not None:
                return False
        k = kv_caches[0][0]
        return k.dtype == torch.float32 and k.is_contiguous()

    def __call__(self, x: torch.Tensor, attn, kv_caches, cos_sin: dict, lora=None) -> torch.Tensor:
        """x [B, hidden] after the embedding; lora: the step's LoRABatch, its slots attached; returns the
        last layer's output (before the final norm)."""
        if lora is not None and not self.attached(lora.slots):
            raise ValueError("attach_lora first: the stack holds another set of adapter slots")
        step = (lora.row_slot, lora.row_scale, lora.slot_rank) if lora is not None else (None, None, None)
        g, s = attn.global_plan.rows[0], attn.sliding_plan.rows[0]
        gcos, gsin = cos_sin.get(False) or cos_sin[True]
        scos, ssin = cos_sin.get(True) or cos_sin[False]
        kv = [t for pair in kv_caches for t in pair]
        return self._stack.forward(x, kv, attn.slot_mapping, g.blocks, g.mask, s.blocks, s.mask, gcos, gsin,
                                   scos, ssin, *step)
