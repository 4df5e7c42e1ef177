"""Progress plumbing shared by the adapters: stage callbacks and a rate limit."""

from __future__ import annotations

import time
from collections.abc import Callable

# progress(stage, completed, total): stage is "download" | "decode" | "separate" | "encode" |
# "upload"
ProgressFn = Callable[[str, int, int], None]


class Throttle:
    """Lets an event through at most every ``interval`` seconds (the last one always passes)."""

    def __init__(self, interval: float):
        self.interval = interval
        self._last = float("-inf")

    def ready(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False
