"""LoRASlots: the adapter weights next to the model, in a fixed number of preallocated slots, and
which adapter each slot holds. The one owner of slot residency.

For every projection of every layer, one stack per packed module: A as
`[max_loras, n_parts, max_rank, in]` and B as `[max_loras, max_rank, out]` (each rank's output row
contiguous, as the CPU kernel's expand reads it), where the parts are the packed pieces (q|k|v,
gate|up): part i's output columns of B pair with part i's rows of A. Smaller ranks are zero-padded.
Scaling is already folded into B by the adapter loader. Which parts each slot patches is kept twice,
for the two readers: as sets (`filled`, for the torch path's per-step skip) and as a CPU bool tensor
per module (`patched`, [max_loras, n_parts], for the kernels); `_load` and `_clear` write both. Loading into a
slot is a copy of a few MB; no allocation in the step.

`activate` is called once per step with the step's adapters: each keeps its slot if it has one,
otherwise it takes an empty slot or the least recently used one that no running request needs, and
is copied in. A slot counts as holding an adapter only once its copy has completed, so a copy that
fails half-way leaves an empty slot, never a slot that claims an adapter it only partly holds.
Knows shapes, slot indices and adapter ids; nothing of requests, names or files.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import torch

from gemlora.model.loader import PACKED_MODULES

if TYPE_CHECKING:
    from gemlora.lora.adapter import LoRAAdapter


class LoRASlots:
    def __init__(self, linears: dict[str, tuple[int, tuple[int, ...]]], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device | str):
        """linears: module key ("layers.3.self_attn.qkv_proj") -> (in_features, output_sizes)."""
        self.max_loras, self.max_rank = max_loras, max_rank
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.patched: dict[str, torch.Tensor] = {}
        self.part_offsets: dict[str, tuple[int, ...]] = {}
        for key, (in_features, sizes) in linears.items():
            n = len(sizes)
            # empty, not zeros: a slot is zeroed when an adapter is copied in, and only slots holding one
            # are ever read, so on the CPU a slot costs memory only once used (untouched pages are not
            # resident): 8 rank-32 slots of a 7B model would otherwise take 3.2 GB up front
            self.A[key] = torch.empty(max_loras, n, max_rank, in_features, dtype=dtype, device=device)
            self.B[key] = torch.empty(max_loras, max_rank, sum(sizes), dtype=dtype, device=device)
            self.patched[key] = torch.zeros(max_loras, n, dtype=torch.bool)
            self.part_offsets[key] = tuple(sum(sizes[:i]) for i in range(n + 1))
        self.rank = [0] * max_loras    # rank of the adapter in each slot (0 = empty)
        # per module and part, the slots holding weights there: parts nobody patches are skipped
        self.filled: dict[str, list[set[int]]] = {k: [set() for _ in range(len(v[1]))] for k, v in linears.items()}
        self._adapter: list[str | None] = [None] * max_loras    # adapter id per slot, once fully copied
        self._last_used = [0] * max_loras
        self._clock = 0
        self.loads = 0

    def slot_of(self, adapter_id: str) -> int | None:
        try:
            return self._adapter.index(adapter_id)
        except ValueError:
            return None

    @property
    def resident(self) -> int:
        return sum(a is not None for a in self._adapter)

    def activate(self, adapters: Mapping[str, LoRAAdapter], keep: Collection[str] = ()) -> dict[str, int]:
        """Make every adapter of this step resident: adapter id -> slot. Slots of adapters in `keep`
        (used by running requests not in this step) are taken only when nothing else is free."""
        if len(adapters) > self.max_loras:
            raise RuntimeError(f"{len(adapters)} adapters in one step, {self.max_loras} slots")
        self._clock += 1
        placed: dict[str, int] = {}
        for adapter_id in adapters:
            slot = self.slot_of(adapter_id)
            if slot is not None:
                placed[adapter_id] = slot
                self._last_used[slot] = self._clock
        for adapter_id, adapter in adapters.items():
            if adapter_id in placed:
                continue
            taken = set(placed.values())
            slot = min((s for s in range(self.max_loras) if s not in taken),
                       key=lambda s: (self._adapter[s] is not None, self._adapter[s] in keep, self._last_used[s]))
            self._load(slot, adapter_id, adapter)
            placed[adapter_id] = slot
            self._last_used[slot] = self._clock
        return placed

    def forget(self, adapter_id: str) -> None:
        """The adapter was unregistered: its slot is emptied and may never serve it again."""
        slot = self.slot_of(adapter_id)
        if slot is not None:
            self._clear(slot)

    def _load(self, slot: int, adapter_id: str, adapter: LoRAAdapter) -> None:
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter rank {adapter.rank} exceeds the slots' max rank {self.max_rank}")
        self._clear(slot)              # from here until the copy completes, the slot holds no adapter
        try:
            for (layer, module), w in adapter.weights.items():
                key, part = _packed_key(layer, module)
                lo, hi = self.part_offsets[key][part], self.part_offsets[key][part + 1]
                r = w.A.shape[0]
                self.A[key][slot, part, :r].copy_(w.A)
                self.B[key][slot, :r, lo:hi].copy_(w.B.T)
                self.filled[key][part].add(slot)
                self.patched[key][slot, part] = True
        except BaseException:
            self._clear(slot)
            raise
        self.rank[slot] = adapter.rank
        self._adapter[slot] = adapter_id
        self.loads += 1

    def _clear(self, slot: int) -> None:
        self._adapter[slot] = None
        self.rank[slot] = 0
        for key in self.A:
            self.A[key][slot].zero_()
            self.B[key][slot].zero_()
            self.patched[key][slot] = False
            for part in self.filled[key]:
                part.discard(slot)


def _packed_key(layer: int, module: str) -> tuple[str, int]:
    block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    packed, part = PACKED_MODULES.get(module, (module, 0))
    return f"layers.{layer}.{block}.{packed}", part
