"""SlotTable: which adapter sits in which slot, and who is using it.

Pure bookkeeping for the scheduler: an adapter used by a running request keeps its slot; a
request whose adapter has no slot gets a free one, or the least recently used one that no running
request needs, or waits. The copy into slot memory is the runner's job, so this knows ids only.
"""

from __future__ import annotations


class SlotTable:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._adapter: list[str | None] = [None] * num_slots   # adapter id per slot
        self._users = [0] * num_slots
        self._last_used = [0] * num_slots
        self._clock = 0
        self.loads = 0

    def slot_of(self, adapter_id: str) -> int | None:
        try:
            return self._adapter.index(adapter_id)
        except ValueError:
            return None

    def assign(self, adapter_id: str) -> tuple[int, bool] | None:
        """Pin a slot for one more user: (slot, must_load), or None when every slot is in use."""
        self._clock += 1
        slot = self.slot_of(adapter_id)
        must_load = slot is None
        if slot is None:
            idle = [s for s in range(self.num_slots) if self._users[s] == 0]
            if not idle:
                return None
            slot = min(idle, key=lambda s: (self._adapter[s] is not None, self._last_used[s]))
            self._adapter[slot] = adapter_id
            self.loads += 1
        self._users[slot] += 1
        self._last_used[slot] = self._clock
        return slot, must_load

    def release(self, slot: int) -> None:
        if self._users[slot] <= 0:
            raise RuntimeError(f"adapter slot {slot} released more often than assigned")
        self._users[slot] -= 1

    def forget(self, adapter_id: str) -> None:
        """The adapter was unregistered: its slot may no longer be reused for it."""
        slot = self.slot_of(adapter_id)
        if slot is not None:
            if self._users[slot]:
                raise RuntimeError(f"adapter {adapter_id} is still used by {self._users[slot]} requests")
            self._adapter[slot] = None

    @property
    def resident(self) -> int:
        return sum(a is not None for a in self._adapter)

    @property
    def in_use(self) -> int:
        return sum(u > 0 for u in self._users)
