"""LeastBusyScheduler: fewest requests in flight, then the key acquired
longest ago (never-used keys first), then the first candidate. The
original's algorithm; natively it is the pool's least_busy strategy."""
from __future__ import annotations

from typing import Optional, Sequence

from .base import BaseScheduler, SchedulerStrategy
from .view import KeyView


class LeastBusyScheduler(BaseScheduler):
    strategy = SchedulerStrategy.LEAST_BUSY

    def select(self, candidates: Sequence[KeyView]) -> Optional[KeyView]:
        if not candidates:
            return None
        return min(candidates, key=lambda k: (k.active_requests, k.last_used))


__all__ = ["LeastBusyScheduler"]
