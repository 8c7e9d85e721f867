"""Board: where engine replicas post their numbers and the ingress reads them.

A Ray actor holding, per replica, its latest EngineStats, adapter-registry counters and health, each
with the time it was posted. Replicas post every second; an entry not renewed for `STALE_S` is a
replica that died or hangs, and is left out. Knows plain numbers only.
"""

from __future__ import annotations

import time

STALE_S = 5.0
NAME = "gemlora-board"
NAMESPACE = "gemlora"


class Board:
    def __init__(self):
        self._posts: dict[str, tuple[float, dict]] = {}

    def post(self, replica: str, numbers: dict) -> None:
        self._posts[replica] = (time.monotonic(), numbers)

    def read(self) -> dict[str, dict]:
        """{replica: numbers} of the replicas that posted within STALE_S."""
        now = time.monotonic()
        return {r: n for r, (at, n) in self._posts.items() if now - at < STALE_S}
